"""Prompt sources: synthetic domains, JSONL files and HuggingFace ``datasets``, all yielding ``Prompt``s.

A source is loaded once, eagerly: every record is validated, rendered with the tokenizer's chat
template when it has one (plain text plus ``<bos>`` otherwise), tokenised and length-checked, so a bad
file fails at start-up rather than hours into a run. ``PromptSampler`` (in ``mopd.data.sampler``)
draws batches from a source and can resume mid-epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from mopd.config.run import DataConfig
from mopd.data.records import BadReason, BadRecord, FieldNames, Record, RecordReport, parse_json_line, parse_record
from mopd.data.synthetic import PiMode, generate
from mopd.errors import DataError
from mopd.types import Prompt

logger = logging.getLogger(__name__)


class PromptRenderer:
    """Prompt text -> token ids, through the chat template when the tokenizer has one.

    ``chat_template_kwargs`` go to ``apply_chat_template`` (e.g. ``{"enable_thinking": False}`` for
    Qwen3-style templates).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_template_kwargs: Mapping[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

    @property
    def uses_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def __call__(self, prompt: str | Sequence[tuple[str, str]]) -> list[int]:
        """Ids of a prompt text (one user message) or of a conversation of ``(role, content)`` pairs."""
        if not self.uses_chat_template:
            if not isinstance(prompt, str):
                raise DataError("a prompt is a list of chat messages but the tokenizer has no chat template; "
                                "set one or give plain-text prompts")
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        messages = [("user", prompt)] if isinstance(prompt, str) else prompt
        rendered = self.tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages], tokenize=False,
            add_generation_prompt=True, **self.chat_template_kwargs,
        )
        # The template writes any <bos> itself; adding special tokens again would double it.
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class PromptSource:
    """An indexable, loaded set of prompts; ``prompts[i].index == i``."""

    name: str
    prompts: tuple[Prompt, ...]
    report: RecordReport | None = None
    """Bad records found while loading (None for synthetic sources, which cannot have any)."""

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    @property
    def domains(self) -> list[str]:
        """The domains present, in order of first appearance."""
        return list(dict.fromkeys(p.domain for p in self.prompts))


def _prompt(index: int, ids: list[int], record: Record) -> Prompt:
    return Prompt(index=index, ids=torch.tensor(ids, dtype=torch.int64), text=record.prompt, domain=record.domain,
                  pi=record.pi, reference=record.reference, metadata=record.metadata)


def _load_records(origin: str, unit: str, parsed: Iterable[Record | BadRecord], render: PromptRenderer,
                  max_prompt_tokens: int, max_bad_fraction: float) -> PromptSource:
    prompts: list[Prompt] = []
    bad: list[BadRecord] = []
    total = 0
    for item in parsed:
        total += 1
        if isinstance(item, BadRecord):
            bad.append(item)
            continue
        try:
            ids = render(item.prompt if item.messages is None else item.messages)
        except DataError as e:
            raise DataError(f"{origin} {unit} {item.location}: {e}") from None
        if len(ids) > max_prompt_tokens:
            bad.append(BadRecord(item.location, BadReason.too_long,
                                 f"{len(ids)} tokens > data.max_prompt_tokens={max_prompt_tokens}"))
            continue
        prompts.append(_prompt(len(prompts), ids, item))
    report = RecordReport(origin=origin, unit=unit, total=total, bad=tuple(bad))
    report.check(max_bad_fraction)
    if bad:
        logger.warning("%s (skipped)", report.summary())
    return PromptSource(name=origin, prompts=tuple(prompts), report=report)


def _fields(config: DataConfig) -> FieldNames:
    return FieldNames(prompt=config.prompt_field, domain=config.domain_field, pi=config.pi_field,
                      reference=config.reference_field)


def jsonl_source(path: str | Path, tokenizer: PreTrainedTokenizerBase, config: DataConfig,
                 chat_template_kwargs: Mapping[str, Any] | None = None) -> PromptSource:
    """Prompts from a JSONL file, one object per line; blank lines are skipped, bad ones reported."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path: JSONL file {str(path)!r} does not exist")
    fields, domains = _fields(config), frozenset(config.domains) or None

    def parsed() -> Iterator[Record | BadRecord]:
        with path.open("rb") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield parse_json_line(line, lineno, fields, domains)

    return _load_records(str(path), "line", parsed(), PromptRenderer(tokenizer, chat_template_kwargs),
                         config.max_prompt_tokens, config.max_bad_fraction)


_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _load_hf_dataset(path: str, split: str, cache_dir: str | None):
    import datasets  # imported here: it is heavy and only this source needs it

    local = Path(path)
    if local.is_dir() and any((local / f).exists() for f in ("state.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(local))  # written by save_to_disk
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"data.split: {split!r} is not a split of {path!r}; splits: {sorted(loaded)}")
            loaded = loaded[split]
        return loaded
    if local.is_file() and local.suffix in _DATA_FILE_BUILDERS:
        return datasets.load_dataset(_DATA_FILE_BUILDERS[local.suffix], data_files=str(local), split=split,
                                     cache_dir=cache_dir)
    return datasets.load_dataset(path, split=split, cache_dir=cache_dir)


def hf_source(path: str, tokenizer: PreTrainedTokenizerBase, config: DataConfig, cache_dir: str | None = None,
              chat_template_kwargs: Mapping[str, Any] | None = None) -> PromptSource:
    """Prompts from a HuggingFace dataset: a ``save_to_disk`` folder, a local data file, or a name that
    ``datasets.load_dataset`` resolves (a hub name needs network access)."""
    try:
        dataset = _load_hf_dataset(path, config.split, cache_dir)
    except DataError:
        raise
    except Exception as e:  # datasets raises many unrelated types for a missing/unreadable dataset
        raise DataError(f"data.path: cannot load dataset {path!r} (split {config.split!r}): {e}") from e
    fields, domains = _fields(config), frozenset(config.domains) or None
    parsed = (parse_record(row, i, fields, domains) for i, row in enumerate(dataset))
    return _load_records(f"{path}[{config.split}]", "row", parsed, PromptRenderer(tokenizer, chat_template_kwargs),
                         config.max_prompt_tokens, config.max_bad_fraction)


def synthetic_source(tokenizer: PreTrainedTokenizerBase, domains: Iterable[str], num_prompts: int,
                     split: str = "train", seed: int = 0, pi_mode: PiMode = PiMode.answer,
                     max_prompt_tokens: int = 512,
                     chat_template_kwargs: Mapping[str, Any] | None = None) -> PromptSource:
    """``num_prompts`` prompts per synthetic domain, interleaved round-robin (prompt i is from domain
    ``i % len(domains)``), so any prefix covers every domain."""
    domains = list(domains)
    if not domains:
        raise DataError("data.domains: a synthetic source needs at least one domain")
    per_domain = [generate(d, num_prompts, split, seed) for d in domains]
    render = PromptRenderer(tokenizer, chat_template_kwargs)
    prompts = []
    for i in range(num_prompts):
        for examples in per_domain:
            ex = examples[i]
            ids = render(ex.prompt)
            if len(ids) > max_prompt_tokens:
                raise DataError(f"synthetic domain {ex.domain!r}: prompt {ex.prompt!r} has {len(ids)} tokens > "
                                f"data.max_prompt_tokens={max_prompt_tokens}")
            record = Record(location=len(prompts), prompt=ex.prompt, domain=ex.domain, pi=ex.pi(pi_mode),
                            reference=ex.reference)
            prompts.append(_prompt(len(prompts), ids, record))
    return PromptSource(name=f"synthetic:{'+'.join(domains)}[{split}]", prompts=tuple(prompts))


def build_source(config: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0, split: str | None = None,
                 pi_mode: PiMode = PiMode.answer, cache_dir: str | None = None,
                 chat_template_kwargs: Mapping[str, Any] | None = None) -> PromptSource:
    """The source ``config`` describes; ``split`` overrides ``config.split`` (e.g. "eval" for evaluation).

    A JSONL file has no splits: ``split`` only applies to synthetic and HF sources, so evaluate JSONL
    prompts by pointing ``data.path`` at a separate file."""
    if split is not None and split != config.split:
        config = replace(config, split=split)
    if config.enable_thinking is not None:
        chat_template_kwargs = {"enable_thinking": config.enable_thinking, **(chat_template_kwargs or {})}
    if config.source == "synthetic":
        return synthetic_source(tokenizer, config.domains, config.num_prompts, config.split, seed, pi_mode,
                                config.max_prompt_tokens, chat_template_kwargs)
    if config.source == "jsonl":
        return jsonl_source(config.path, tokenizer, config, chat_template_kwargs)
    if config.source == "hf":
        return hf_source(config.path, tokenizer, config, cache_dir, chat_template_kwargs)
    raise DataError(f"data.source: {config.source!r} is not one of ['hf', 'jsonl', 'synthetic']")
