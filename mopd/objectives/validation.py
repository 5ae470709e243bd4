"""Input checks for the distillation loss: clear ObjectiveErrors naming the tensor, teacher, id and position.

Only valid positions (``loss_mask > 0``) are checked for values; tensors elsewhere may hold anything.
Teacher top-K log-probabilities may be ``-inf`` (an entry of probability 0, e.g. a padded top-K); NaN and
``+inf`` are rejected, as are non-finite sampled-token logprobs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mopd.errors import ObjectiveError
from mopd.types import TrainBatch

if TYPE_CHECKING:
    from mopd.objectives.loss import LossPlan, TeacherPlan


def _first(bad: torch.Tensor) -> tuple[int, ...]:
    """Coordinates of the first True entry."""
    return tuple(int(i) for i in bad.nonzero()[0])


def _at(b: int, s: int) -> str:
    return f"sequence {b}, position {s}"


def check_shapes(logits: torch.Tensor, batch: TrainBatch) -> None:
    if batch.loss_mask.dim() != 2:
        raise ObjectiveError(f"loss_mask has shape {tuple(batch.loss_mask.shape)}, expected [B, S]")
    b, s = batch.loss_mask.shape
    if batch.topk_ids.dim() != 3 or batch.topk_ids.shape[-1] < 1:
        raise ObjectiveError(f"topk_ids has shape {tuple(batch.topk_ids.shape)}, expected [B, S, K] with K >= 1")
    k = batch.topk_ids.shape[-1]
    v = logits.shape[-1]
    expected = {
        "logits": (logits, (b, s, v)), "targets": (batch.targets, (b, s)),
        "teacher_index": (batch.teacher_index, (b, s)), "topk_ids": (batch.topk_ids, (b, s, k)),
        "topk_logprobs": (batch.topk_logprobs, (b, s, k)), "sampled_logprob": (batch.sampled_logprob, (b, s)),
        "tail_logmass": (batch.tail_logmass, (b, s)), "behaviour_logprobs": (batch.behaviour_logprobs, (b, s)),
        "reward": (batch.reward, (b,)),
    }
    if batch.teacher_logits is not None:
        expected["teacher_logits"] = (batch.teacher_logits, (b, s, v))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ObjectiveError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} to match "
                                 f"loss_mask {(b, s)}, topk_ids [B, S, K] and logits [B, S, V_local={v}]")


def check_teacher_scores(tp: TeacherPlan, batch: TrainBatch, at: torch.Tensor, vocab_size: int) -> None:
    """Teacher tensors at the [B, S] bool positions ``at`` routed to teacher ``tp``."""
    who = f"teacher {tp.name!r}"
    ids = batch.topk_ids
    bad = at[..., None] & ((ids < 0) | (ids >= vocab_size))
    if bad.any():
        b, s, j = _first(bad)
        raise ObjectiveError(f"{who}: top-K id {int(ids[b, s, j])} at {_at(b, s)} (entry {j}) is outside "
                             f"the vocabulary [0, {vocab_size})")
    lp = batch.topk_logprobs.float()
    bad = at[..., None] & (torch.isnan(lp) | (lp == float("inf")))
    if bad.any():
        b, s, j = _first(bad)
        raise ObjectiveError(f"{who}: non-finite topk_logprobs ({float(lp[b, s, j])}) at {_at(b, s)} (entry {j})")
    for name, t in (("sampled_logprob", batch.sampled_logprob), ("tail_logmass", batch.tail_logmass)):
        t = t.float()
        bad = at & (torch.isnan(t) | (t == float("inf")) | ((t == float("-inf")) & (name == "sampled_logprob")))
        if bad.any():
            b, s = _first(bad)
            raise ObjectiveError(f"{who}: non-finite {name} ({float(t[b, s])}) at {_at(b, s)}")
    empty = at & (lp == float("-inf")).all(dim=-1) & (batch.tail_logmass == float("-inf"))
    if empty.any():
        b, s = _first(empty)
        raise ObjectiveError(f"{who}: zero total mass (every top-K logprob and the tail are -inf) at {_at(b, s)}")
    _check_distinct(who, ids, lp, at)


def _check_distinct(who: str, ids: torch.Tensor, lp: torch.Tensor, at: torch.Tensor) -> None:
    """A repeated id with probability > 0 would count its bucket twice."""
    live = lp > float("-inf")
    k = ids.shape[-1]
    # Give dead entries distinct negative ids so only live repeats collide.
    keyed = torch.where(live, ids.long(), -1 - torch.arange(k, device=ids.device))
    sorted_ids, _ = keyed.sort(dim=-1)
    dup = at & (sorted_ids[..., 1:] == sorted_ids[..., :-1]).any(dim=-1)
    if dup.any():
        b, s = _first(dup)
        row = sorted_ids[b, s]
        repeated = int(row[1:][row[1:] == row[:-1]][0])
        raise ObjectiveError(f"{who}: top-K id {repeated} appears twice at {_at(b, s)}")


def validate_batch(logits: torch.Tensor, batch: TrainBatch, plan: LossPlan) -> None:
    """Raise ObjectiveError on the first inconsistency; see the module docstring for what is allowed."""
    check_shapes(logits, batch)
    valid = batch.loss_mask > 0
    vocab = plan.shard.vocab_size
    known = {tp.index for tp in plan.teachers}
    tidx = batch.teacher_index
    unknown = valid & ~torch.isin(tidx, torch.tensor(sorted(known), dtype=tidx.dtype, device=tidx.device))
    if unknown.any():
        b, s = _first(unknown)
        names = {tp.index: tp.name for tp in plan.teachers}
        raise ObjectiveError(f"{_at(b, s)} is routed to teacher index {int(tidx[b, s])}, which has no "
                             f"objectives (configured: {names})")
    bad = valid & ((batch.targets < 0) | (batch.targets >= vocab))
    if bad.any():
        b, s = _first(bad)
        raise ObjectiveError(f"target id {int(batch.targets[b, s])} at {_at(b, s)} is outside the vocabulary "
                             f"[0, {vocab})")
    for tp in plan.teachers:
        at = valid & (tidx == tp.index)
        if tp.reads_teacher:
            check_teacher_scores(tp, batch, at, vocab)
        if tp.needs_behaviour:
            _check_finite(f"teacher {tp.name!r} (importance ratio)", "behaviour_logprobs",
                          batch.behaviour_logprobs, at)
        if tp.needs_reward:
            _check_finite(f"teacher {tp.name!r} (rlsd)", "reward", batch.reward[:, None].expand_as(at), at)


def _check_finite(who: str, name: str, t: torch.Tensor, at: torch.Tensor) -> None:
    bad = at & ~torch.isfinite(t.float())
    if bad.any():
        b, s = _first(bad)
        raise ObjectiveError(f"{who}: non-finite {name} ({float(t[b, s])}) at {_at(b, s)}")
