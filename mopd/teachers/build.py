"""Teachers from config: one Teacher per ``distill.teachers`` entry, tokenizers checked at start-up."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from mopd.config import TeacherConfig, TeacherKind
from mopd.errors import TeacherError
from mopd.rollout.engine import Engine
from mopd.teachers.base import Teacher
from mopd.teachers.expert import ExpertTeacher
from mopd.teachers.self_pi import SelfPITeacher
from mopd.teachers.vocab import check_vocab

if TYPE_CHECKING:  # transformers is heavy to import; only its type is needed here
    from transformers import PreTrainedTokenizerBase

def build_teachers(
    configs: Sequence[TeacherConfig],
    engines: Mapping[str, Engine],
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizers: Mapping[str, PreTrainedTokenizerBase] | None = None,
    initial_weights: Iterable[tuple[str, torch.Tensor]] | None = None,
) -> list[Teacher]:
    """Teachers in config order (the order routing indices refer to).

    ``engines`` and ``teacher_tokenizers`` are keyed by teacher name. An expert must come with its
    tokenizer, which must equal the student's (``check_vocab``); a self-PI teacher uses the student
    tokenizer by construction. ``initial_weights`` (HF-named) seed the EMA of EMA self-teachers.
    """
    teacher_tokenizers = teacher_tokenizers or {}
    out: list[Teacher] = []
    for cfg in configs:
        if cfg.name not in engines:
            raise TeacherError(f"teacher {cfg.name!r}: no engine was built for it (engines for {sorted(engines)})")
        engine = engines[cfg.name]
        if cfg.kind == TeacherKind.self_pi:
            weights = list(initial_weights) if initial_weights is not None and cfg.ema_decay > 0 else None
            out.append(SelfPITeacher(cfg, engine, student_tokenizer, initial_weights=weights))
            continue
        if cfg.name not in teacher_tokenizers:
            raise TeacherError(
                f"teacher {cfg.name!r}: its tokenizer is needed for the start-up vocabulary check "
                f"(load it from {cfg.checkpoint or cfg.endpoint or 'its checkpoint'})"
            )
        check_vocab(cfg.name, student_tokenizer, teacher_tokenizers[cfg.name])
        out.append(ExpertTeacher(cfg, engine, len(student_tokenizer)))
    return out
