"""Pack rollouts and their teacher scores into TrainBatches (the alignment rule of ``TrainBatch``).

For a rollout with ``P`` prompt and ``T`` response tokens, ``tokens = prompt + response`` and
position ``s`` predicts token ``s + 1``. Response token ``t`` (sequence index ``P + t``) is therefore
predicted at position ``P - 1 + t``: that position gets ``loss_mask = 1``, ``targets = response[t]``,
the teacher's row ``t`` of the scores, the behaviour logprob ``t`` and the routed teacher index.

Positions outside the response hold a finite placeholder distribution (ids ``0..K-1`` and the tail,
each with probability ``1/(K+1)``), so that an objective evaluated densely before masking never
meets ``0 * inf``; ``teacher_index`` is -1 there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mopd.errors import TeacherError
from mopd.types import Rollout, Routing, TeacherScores, TrainBatch


def build_train_batches(
    rollouts: Sequence[Rollout],
    scores: TeacherScores,
    routing: Routing,
    micro_batch_size: int,
    pad_id: int,
    rewards: Sequence[float] | torch.Tensor | None = None,
    seq_length: int | None = None,
    pad_to_multiple: int = 1,
) -> list[TrainBatch]:
    """Micro-batches of ``micro_batch_size`` rollouts, in order, all padded to one length ``S``.

    ``scores``/``routing`` cover the packed response tokens (``N = sum T``, rollout order).
    ``S`` is ``seq_length`` if given (a longer sequence is an error), else the longest sequence,
    rounded up to ``pad_to_multiple`` (sequence parallelism needs S divisible by TP). Every
    micro-batch has the same [B, S] shape because pipeline parallelism sends fixed-shape tensors;
    the last one is filled with fully masked rows of ``pad_id``.
    """
    lengths = [int(r.response_ids.numel()) for r in rollouts]
    _check_inputs(rollouts, scores, routing, micro_batch_size, lengths)
    reward = torch.zeros(len(rollouts)) if rewards is None else torch.as_tensor(rewards, dtype=torch.float32)
    if reward.shape != (len(rollouts),):
        raise TeacherError(f"build_train_batches: rewards has shape {tuple(reward.shape)}, expected ({len(rollouts)},)")
    s_len = _sequence_length(rollouts, seq_length, pad_to_multiple)
    offsets = [0]
    for t in lengths:
        offsets.append(offsets[-1] + t)
    batches = []
    for start in range(0, len(rollouts), micro_batch_size):
        rows = list(range(start, min(start + micro_batch_size, len(rollouts))))
        batches.append(_micro_batch(rollouts, scores, routing, reward, rows, offsets, micro_batch_size, s_len, pad_id))
    return batches


def _micro_batch(
    rollouts: Sequence[Rollout], scores: TeacherScores, routing: Routing, reward: torch.Tensor,
    rows: list[int], offsets: list[int], b: int, s: int, pad_id: int,
) -> TrainBatch:
    k = scores.k
    placeholder = -math.log(k + 1)
    out = dict(
        tokens=torch.full((b, s), pad_id, dtype=torch.int64),
        targets=torch.full((b, s), pad_id, dtype=torch.int64),
        loss_mask=torch.zeros(b, s),
        topk_ids=torch.arange(k, dtype=torch.int32).expand(b, s, k).clone(),
        topk_logprobs=torch.full((b, s, k), placeholder, dtype=scores.topk_logprobs.dtype),
        sampled_logprob=torch.full((b, s), placeholder),
        tail_logmass=torch.full((b, s), placeholder),
        behaviour_logprobs=torch.zeros(b, s),
        teacher_index=torch.full((b, s), -1, dtype=torch.int64),
        reward=torch.zeros(b),
    )
    if scores.chunks is not None:  # a cross-tokenizer teacher in the batch (DESIGN.md §13)
        out["chunk_index"] = torch.full((b, s), -1, dtype=torch.int64)
        out["chunk_teacher_tokens"] = torch.zeros((b, s), dtype=torch.int32)
    for row, i in enumerate(rows):
        r = rollouts[i]
        p, t = int(r.prompt_ids.numel()), int(r.response_ids.numel())
        seq = torch.cat([r.prompt_ids.to(torch.int64), r.response_ids.to(torch.int64)])
        out["tokens"][row, : p + t] = seq
        out["targets"][row, : p + t - 1] = seq[1:]
        pos = slice(p - 1, p - 1 + t)  # position s predicts token s+1: response token j sits at p-1+j
        tok = slice(offsets[i], offsets[i] + t)
        out["loss_mask"][row, pos] = 1.0
        out["topk_ids"][row, pos] = scores.topk_ids[tok].to(torch.int32)
        out["topk_logprobs"][row, pos] = scores.topk_logprobs[tok]
        out["sampled_logprob"][row, pos] = scores.sampled_logprob[tok].float()
        out["tail_logmass"][row, pos] = scores.tail_logmass[tok].float()
        out["behaviour_logprobs"][row, pos] = r.behaviour_logprobs.float()
        out["teacher_index"][row, pos] = routing.index[tok]
        if scores.chunks is not None:
            out["chunk_index"][row, pos] = scores.chunks.chunk[tok]
            out["chunk_teacher_tokens"][row, pos] = scores.chunks.teacher_tokens[tok]
        out["reward"][row] = reward[i]
    position_ids = torch.arange(s, dtype=torch.int64).expand(b, s).clone()
    return TrainBatch(position_ids=position_ids, **out)


def _check_inputs(
    rollouts: Sequence[Rollout], scores: TeacherScores, routing: Routing, micro_batch_size: int, lengths: list[int]
) -> None:
    if not rollouts:
        raise TeacherError("build_train_batches: no rollouts")
    if micro_batch_size < 1:
        raise TeacherError(f"build_train_batches: micro_batch_size={micro_batch_size} must be >= 1")
    n = sum(lengths)
    if scores.num_tokens != n or routing.index.numel() != n:
        raise TeacherError(
            f"build_train_batches: {len(rollouts)} rollouts have {n} response tokens but scores cover "
            f"{scores.num_tokens} and routing covers {routing.index.numel()}"
        )
    for i, r in enumerate(rollouts):
        if r.prompt_ids.numel() < 1:
            raise TeacherError(f"build_train_batches: rollout {i} (prompt {r.prompt_index}) has an empty prompt; "
                               f"the first response token needs a position to be predicted from")
        if r.behaviour_logprobs.shape != r.response_ids.shape:
            raise TeacherError(
                f"build_train_batches: rollout {i} (prompt {r.prompt_index}) has behaviour_logprobs of shape "
                f"{tuple(r.behaviour_logprobs.shape)} for response_ids of shape {tuple(r.response_ids.shape)}"
            )


def _sequence_length(rollouts: Sequence[Rollout], seq_length: int | None, multiple: int) -> int:
    longest = max(int(r.prompt_ids.numel() + r.response_ids.numel()) for r in rollouts)
    if seq_length is not None:
        if longest > seq_length:
            i = max(range(len(rollouts)), key=lambda j: rollouts[j].prompt_ids.numel() + rollouts[j].response_ids.numel())
            raise TeacherError(
                f"build_train_batches: rollout {i} (prompt {rollouts[i].prompt_index}) has {longest} tokens, "
                f"longer than seq_length={seq_length}"
            )
        longest = seq_length
    return -(-longest // multiple) * multiple
