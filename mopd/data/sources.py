"""Prompt sources: synthetic domains, JSONL files and HuggingFace ``datasets``, all yielding ``Prompt``s.

A source is loaded once, eagerly: every record is validated, rendered with the tokenizer's chat
template when it has one (plain text plus ``<bos>`` otherwise), tokenised and length-checked, so a bad
file fails at start-up rather than hours into a run. ``PromptSampler`` (in ``mopd.data.sampler``)
draws batches from a source and can resume mid-epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from mopd.config.run import DataConfig
from mopd.data.chat import Messages, check_takes_system_message, conversation, has_chat_template, render_chat
from mopd.data.records import BadReason, BadRecord, FieldNames, Record, RecordReport, parse_json_line, parse_record
from mopd.data.synthetic import PiMode, generate
from mopd.errors import DataError
from mopd.types import Prompt

logger = logging.getLogger(__name__)


class PromptRenderer:
    """A prompt (text, or a conversation of ``{"role", "content"}`` messages) -> its token ids and the
    conversation they render, through the tokenizer's chat template when it has one
    (``mopd.data.chat.render_chat``); plain text plus ``<bos>`` otherwise.

    ``system_prompt`` (``data.system_prompt``) starts the conversation of every plain-string prompt;
    ``enable_thinking`` (``data.enable_thinking``) goes to Qwen3-style templates.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, enable_thinking: bool | None = None,
                 system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.enable_thinking = enable_thinking
        self.system_prompt = system_prompt
        if system_prompt is not None:
            if not self.uses_chat_template:
                raise DataError("data.system_prompt is set, but the tokenizer has no chat template to put a "
                                "system message in; unset it or use a tokenizer with a chat template")
            check_takes_system_message(tokenizer, "data.system_prompt")

    @property
    def uses_chat_template(self) -> bool:
        return has_chat_template(self.tokenizer)

    def render(self, prompt: str | Messages) -> tuple[list[int], tuple[dict[str, str], ...] | None]:
        """``(ids, messages)``; ``messages`` is None exactly when the tokenizer has no chat template."""
        if not self.uses_chat_template:
            if not isinstance(prompt, str):
                raise DataError("a prompt is a list of chat messages but the tokenizer has no chat template; "
                                "set one or give plain-text prompts")
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"]), None
        messages = (conversation(prompt, self.system_prompt) if isinstance(prompt, str)
                    else tuple({"role": m["role"], "content": m["content"]} for m in prompt))
        return render_chat(self.tokenizer, messages, enable_thinking=self.enable_thinking), messages

    def __call__(self, prompt: str | Messages) -> list[int]:
        """The ids of ``render(prompt)``."""
        return self.render(prompt)[0]


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


def _prompt(index: int, ids: list[int], messages: tuple[dict[str, str], ...] | None, record: Record) -> Prompt:
    return Prompt(index=index, ids=torch.tensor(ids, dtype=torch.int64), text=record.prompt, domain=record.domain,
                  pi=record.pi, reference=record.reference, metadata=record.metadata, messages=messages)


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
            ids, messages = render.render(item.prompt if item.messages is None else item.messages)
        except DataError as e:
            raise DataError(f"{origin} {unit} {item.location}: {e}") from None
        if len(ids) > max_prompt_tokens:
            bad.append(BadRecord(item.location, BadReason.too_long,
                                 f"{len(ids)} tokens > data.max_prompt_tokens={max_prompt_tokens}"))
            continue
        prompts.append(_prompt(len(prompts), ids, messages, item))
    report = RecordReport(origin=origin, unit=unit, total=total, bad=tuple(bad))
    report.check(max_bad_fraction)
    if bad:
        logger.warning("%s (skipped)", report.summary())
    return PromptSource(name=origin, prompts=tuple(prompts), report=report)


def _fields(config: DataConfig) -> FieldNames:
    return FieldNames(prompt=config.prompt_field, messages=config.messages_field, domain=config.domain_field,
                      pi=config.pi_field, reference=config.reference_field)


def _renderer(tokenizer: PreTrainedTokenizerBase, config: DataConfig) -> PromptRenderer:
    return PromptRenderer(tokenizer, enable_thinking=config.enable_thinking, system_prompt=config.system_prompt)


def jsonl_source(path: str | Path, tokenizer: PreTrainedTokenizerBase, config: DataConfig) -> PromptSource:
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

    return _load_records(str(path), "line", parsed(), _renderer(tokenizer, config),
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


def hf_source(path: str, tokenizer: PreTrainedTokenizerBase, config: DataConfig,
              cache_dir: str | None = None) -> PromptSource:
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
    return _load_records(f"{path}[{config.split}]", "row", parsed, _renderer(tokenizer, config),
                         config.max_prompt_tokens, config.max_bad_fraction)


def synthetic_source(tokenizer: PreTrainedTokenizerBase, domains: Iterable[str], num_prompts: int,
                     split: str = "train", seed: int = 0, pi_mode: PiMode = PiMode.answer,
                     max_prompt_tokens: int = 512, enable_thinking: bool | None = None,
                     system_prompt: str | None = None) -> PromptSource:
    """``num_prompts`` prompts per synthetic domain, interleaved round-robin (prompt i is from domain
    ``i % len(domains)``), so any prefix covers every domain."""
    domains = list(domains)
    if not domains:
        raise DataError("data.domains: a synthetic source needs at least one domain")
    per_domain = [generate(d, num_prompts, split, seed) for d in domains]
    render = PromptRenderer(tokenizer, enable_thinking=enable_thinking, system_prompt=system_prompt)
    prompts = []
    for i in range(num_prompts):
        for examples in per_domain:
            ex = examples[i]
            ids, messages = render.render(ex.prompt)
            if len(ids) > max_prompt_tokens:
                raise DataError(f"synthetic domain {ex.domain!r}: prompt {ex.prompt!r} has {len(ids)} tokens > "
                                f"data.max_prompt_tokens={max_prompt_tokens}")
            record = Record(location=len(prompts), prompt=ex.prompt, domain=ex.domain, pi=ex.pi(pi_mode),
                            reference=ex.reference)
            prompts.append(_prompt(len(prompts), ids, messages, record))
    return PromptSource(name=f"synthetic:{'+'.join(domains)}[{split}]", prompts=tuple(prompts))


def build_source(config: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0, split: str | None = None,
                 pi_mode: PiMode = PiMode.answer, cache_dir: str | None = None) -> PromptSource:
    """The source ``config`` describes; ``split`` overrides ``config.split`` (e.g. "eval" for evaluation).

    A JSONL file has no splits: ``split="eval"`` reads ``data.eval_path`` when it is set (the held-out
    file), else ``data.path`` itself; other splits only apply to synthetic and HF sources."""
    if split is not None and split != config.split:
        config = replace(config, split=split)
    if config.source == "jsonl" and config.split == "eval" and config.eval_path is not None:
        if not Path(config.eval_path).is_file():
            raise DataError(f"data.eval_path: JSONL file {config.eval_path!r} does not exist")
        config = replace(config, path=config.eval_path)
    if config.source == "synthetic":
        return synthetic_source(tokenizer, config.domains, config.num_prompts, config.split, seed, pi_mode,
                                config.max_prompt_tokens, config.enable_thinking, config.system_prompt)
    if config.source == "jsonl":
        return jsonl_source(config.path, tokenizer, config)
    if config.source == "hf":
        return hf_source(config.path, tokenizer, config, cache_dir)
    raise DataError(f"data.source: {config.source!r} is not one of ['hf', 'jsonl', 'synthetic']")
