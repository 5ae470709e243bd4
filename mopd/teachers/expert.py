"""Expert teacher: another model with the student's tokenizer, scoring the student's exact tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mopd.config import TeacherConfig, TeacherKind
from mopd.errors import TeacherError
from mopd.rollout.engine import Engine, ScoreRequest
from mopd.teachers.base import Teacher
from mopd.types import Rollout


class ExpertTeacher(Teacher):
    """Context = the student's prompt ids, unchanged; the tokenizers were checked equal at start-up
    (``mopd.teachers.vocab.check_vocab``), so ids mean the same thing to both models."""

    def __init__(self, config: TeacherConfig, engine: Engine, vocab_size: int) -> None:
        if config.kind != TeacherKind.expert:
            raise TeacherError(f"teacher {config.name!r}: ExpertTeacher needs kind=expert, got {config.kind.value}")
        super().__init__(config, engine, vocab_size)

    def requests(self, rollouts: Sequence[Rollout]) -> list[ScoreRequest]:
        return [
            ScoreRequest(
                ids=torch.cat([r.prompt_ids.to(torch.int64), r.response_ids.to(torch.int64)]),
                response_start=int(r.prompt_ids.numel()),
            )
            for r in rollouts
        ]
