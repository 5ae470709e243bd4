"""Inputs for a teacher that runs inside the trainer (the frozen PI self-teacher on the student's ranks).

Such a teacher reads its own sequence (for a PI self-teacher: PI context + the student's response),
so its logits sit at other positions than the student's. ``TeacherInputs`` carries the teacher's
tokens for one micro-batch and, for every student position, the teacher position whose logits predict
the same token; ``align`` moves the teacher's [B, S_t, V_local] logits onto the student's [B, S]
grid, which is what ``TrainBatch.teacher_logits`` expects. Works on a vocabulary shard (gather along
the sequence only), so each tensor-parallel rank aligns its own slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mopd.errors import TeacherError
from mopd.teachers.base import Teacher
from mopd.types import Rollout


@dataclass(frozen=True, slots=True)
class TeacherInputs:
    """One micro-batch of the in-trainer teacher's sequences (rows in ``build_train_batches`` order)."""

    tokens: torch.Tensor
    """[B, S_t] int64 teacher input ids (its context + the student's response, right-padded)."""
    position_ids: torch.Tensor
    """[B, S_t] int64."""
    source: torch.Tensor
    """[B, S] int64: teacher position predicting the same token as student position s (0 off the response)."""

    def align(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """[B, S_t, V_local] teacher logits -> [B, S, V_local] at the student's positions."""
        b, s = self.source.shape
        index = self.source[:, :, None].expand(b, s, teacher_logits.shape[-1])
        return teacher_logits.gather(1, index)


def build_teacher_inputs(
    rollouts: Sequence[Rollout],
    teacher: Teacher,
    micro_batch_size: int,
    pad_id: int,
    student_seq_length: int,
    pad_to_multiple: int = 1,
) -> list[TeacherInputs]:
    """Micro-batches matching ``build_train_batches(rollouts, ..., micro_batch_size)`` row for row.

    ``student_seq_length`` is the S of those TrainBatches. The teacher's own length S_t is its
    longest sequence rounded up to ``pad_to_multiple``; filler rows are all ``pad_id``.
    """
    if micro_batch_size < 1:
        raise TeacherError(f"build_teacher_inputs: micro_batch_size={micro_batch_size} must be >= 1")
    requests = teacher.requests(rollouts)
    longest = max(int(r.ids.numel()) for r in requests)
    s_t = -(-longest // pad_to_multiple) * pad_to_multiple
    out = []
    for start in range(0, len(rollouts), micro_batch_size):
        tokens = torch.full((micro_batch_size, s_t), pad_id, dtype=torch.int64)
        source = torch.zeros(micro_batch_size, student_seq_length, dtype=torch.int64)
        for row, i in enumerate(range(start, min(start + micro_batch_size, len(rollouts)))):
            req, r = requests[i], rollouts[i]
            p, t = int(r.prompt_ids.numel()), int(r.response_ids.numel())
            if p + t > student_seq_length:
                raise TeacherError(f"build_teacher_inputs: rollout {i} has {p + t} tokens > student_seq_length="
                                   f"{student_seq_length}")
            tokens[row, : req.ids.numel()] = req.ids
            # Student position p-1+j and teacher position response_start-1+j both predict response token j.
            source[row, p - 1 : p - 1 + t] = torch.arange(t) + req.response_start - 1
        positions = torch.arange(s_t, dtype=torch.int64).expand(micro_batch_size, s_t).clone()
        out.append(TeacherInputs(tokens=tokens, position_ids=positions, source=source))
    return out
