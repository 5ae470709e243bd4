"""Teachers from config: one Teacher per ``distill.teachers`` entry, tokenizers checked at start-up, and
every prompt routed to a PI self-teacher checked for its PI before the first step."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mopd.config import ObjectiveConfig, ObjectiveName, TeacherConfig, TeacherKind
from mopd.errors import TeacherError
from mopd.rollout.engine import Engine
from mopd.types import Prompt, Rollout
from mopd.teachers.base import Teacher
from mopd.teachers.router import Router
from mopd.teachers.expert import ExpertTeacher
from mopd.teachers.self_pi import SelfPITeacher
from mopd.objectives.registry import CROSS_VOCAB
from mopd.teachers.cross import CrossTokenizerTeacher
from mopd.teachers.vocab import check_vocab, vocab_differences

if TYPE_CHECKING:  # transformers is heavy to import; only its type is needed here
    from transformers import PreTrainedTokenizerBase

def build_teachers(
    configs: Sequence[TeacherConfig],
    engines: Mapping[str, Engine],
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizers: Mapping[str, PreTrainedTokenizerBase] | None = None,
    initial_weights: Iterable[tuple[str, torch.Tensor]] | None = None,
    enable_thinking: bool | None = None,
    default_objectives: Mapping[str, Sequence[ObjectiveConfig]] | None = None,
) -> list[Teacher]:
    """Teachers in config order (the order routing indices refer to).

    ``engines`` and ``teacher_tokenizers`` are keyed by teacher name. An expert must come with its
    tokenizer, which must equal the student's (``check_vocab``); a self-PI teacher uses the student
    tokenizer by construction. ``initial_weights`` (HF-named) seed the EMA of EMA self-teachers.
    ``enable_thinking`` is ``data.enable_thinking`` (self-teachers re-render the student's conversation).
    An expert whose tokenizer differs and whose config sets ``tokenizer`` becomes a CrossTokenizerTeacher;
    ``default_objectives`` (by teacher name: the objectives it trains with, ``distill.objectives`` when it
    has none of its own) are checked to be defined across vocabularies.
    """
    teacher_tokenizers = teacher_tokenizers or {}
    out: list[Teacher] = []
    for cfg in configs:
        if cfg.name not in engines:
            raise TeacherError(f"teacher {cfg.name!r}: no engine was built for it (engines for {sorted(engines)})")
        engine = engines[cfg.name]
        if cfg.kind == TeacherKind.self_pi:
            weights = list(initial_weights) if initial_weights is not None and cfg.ema_decay > 0 else None
            out.append(SelfPITeacher(cfg, engine, student_tokenizer, initial_weights=weights,
                                     enable_thinking=enable_thinking))
            continue
        if cfg.name not in teacher_tokenizers:
            raise TeacherError(
                f"teacher {cfg.name!r}: its tokenizer is needed for the start-up vocabulary check "
                f"(load it from {cfg.checkpoint or cfg.endpoint or 'its checkpoint'})"
            )
        out.append(_expert(cfg, engine, student_tokenizer, teacher_tokenizers[cfg.name], enable_thinking,
                           (default_objectives or {}).get(cfg.name, cfg.objectives)))
    return out


def configured_tokenizer(cfg: TeacherConfig, checkpoint_tokenizer: PreTrainedTokenizerBase | None,
                         folder_of: Callable[[str], Path]) -> PreTrainedTokenizerBase:
    """``distill.teachers[name].tokenizer`` loaded: "char", an earlier stage's name or an HF folder
    (``folder_of`` resolves both). It must be the tokenizer the teacher's checkpoint ships, when it ships one."""
    key = f"distill.teachers[{cfg.name}].tokenizer"
    if cfg.tokenizer == "char":
        from mopd.data.tokenizer import build_char_tokenizer

        tokenizer = build_char_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder_of(cfg.tokenizer)))
        except Exception as exc:  # a missing folder, no tokenizer files, a broken tokenizer.json
            raise TeacherError(f"teacher {cfg.name!r}: {key}={cfg.tokenizer!r} cannot be loaded as a tokenizer "
                               f"({type(exc).__name__}: {exc})") from None
    if checkpoint_tokenizer is not None and vocab_differences(tokenizer, checkpoint_tokenizer):
        raise TeacherError(f"teacher {cfg.name!r}: {key}={cfg.tokenizer!r} is not the tokenizer its checkpoint "
                           f"{cfg.checkpoint!r} ships (vocabularies differ); point it at the checkpoint's own")
    return tokenizer


def _expert(cfg: TeacherConfig, engine: Engine, student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase,
            enable_thinking: bool | None, objectives: Sequence[ObjectiveConfig]) -> Teacher:
    """Same vocabulary: the student's ids are scored (ExpertTeacher). Another vocabulary with
    ``tokenizer`` set: cross-tokenizer (DESIGN.md §13). Another without it: today's refusal."""
    if not vocab_differences(student, teacher):
        print(f"[teachers] teacher {cfg.name!r}: same vocabulary as the student ({len(student)} tokens): "
              "scores the student's token ids", flush=True)
        return ExpertTeacher(cfg, engine, len(student))
    if cfg.tokenizer is None:
        check_vocab(cfg.name, student, teacher, hint=f"or set distill.teachers[{cfg.name}].tokenizer to distil "
                                                      "across tokenizers")
    bad = [o.name.value for o in objectives if o.name not in CROSS_VOCAB]
    if bad:
        raise TeacherError(f"teacher {cfg.name!r} has another tokenizer than the student, and objectives {bad} are "
                           f"not defined across vocabularies; use {sorted(n.value for n in CROSS_VOCAB)}")
    if any(o.name == ObjectiveName.reverse_kl_sampled and o.teacher_temperature != 1.0 for o in objectives):
        raise TeacherError(f"teacher {cfg.name!r}: reverse_kl_sampled across tokenizers scores whole chunks and "
                           "needs teacher_temperature=1")
    teacher_obj = CrossTokenizerTeacher(cfg, engine, student, teacher, enable_thinking=enable_thinking)
    print(f"[teachers] {teacher_obj.describe()}", flush=True)
    return teacher_obj


def check_pi_coverage(prompts: Sequence[Prompt], configs: Sequence[TeacherConfig], router: Router,
                      shown: int = 5) -> None:
    """Raise TeacherError before the first step when a prompt that can reach a PI self-teacher has no PI.

    Per-prompt routing: the teacher the router picks for the prompt. Per-token routing: every candidate
    teacher scores every token, so every prompt reaches every self-teacher among the candidates. A
    self-teacher with ``shared_pi`` needs nothing from the prompts.
    """
    needy = {i for i, c in enumerate(configs) if c.kind == TeacherKind.self_pi and c.shared_pi is None}
    if not needy:
        return
    missing = [p for p in prompts if p.pi is None]
    if not missing:
        return
    if router.per_token:
        reached = [(p, i) for p in missing for i in router.candidates() if i in needy]
    else:
        probes = [_unsampled(p) for p in missing]
        chosen = router.route_prompts(probes, prompts={p.index: p for p in missing})
        reached = [(p, i) for p, i in zip(missing, chosen) if i in needy]
    if reached:
        first = configs[reached[0][1]].name
        where = ", ".join(f"{p.index} (domain {p.domain!r})" for p, i in reached[:shown] if configs[i].name == first)
        count = sum(1 for _, i in reached if configs[i].name == first)
        raise TeacherError(
            f"teacher {first!r}: {count} of {len(prompts)} prompts routed to it have no PI text, e.g. prompt {where}; "
            f"give them a PI field (data.pi_field), set distill.teachers[{first}].shared_pi, or route them elsewhere"
        )


def _unsampled(prompt: Prompt) -> Rollout:
    """A rollout of ``prompt`` with no response tokens: what the router needs to place it."""
    return Rollout(prompt_ids=prompt.ids, response_ids=torch.zeros(0, dtype=torch.int64),
                   behaviour_logprobs=torch.zeros(0), finish="length", weight_version=0, domain=prompt.domain,
                   prompt_index=prompt.index, pi=prompt.pi, reference=prompt.reference, messages=prompt.messages)
