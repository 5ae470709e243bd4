"""One optimizer step of the student through Megatron's forward/backward schedules.

Reduction. The step minimises the mean over the valid response tokens of the GLOBAL batch::

    L = (1 / N) * sum_{d in DP ranks} sum_{m in micro-batches} s_{d,m}

where ``s_{d,m}`` is ``loss_fn``'s ``loss_sum`` for micro-batch ``m`` on data-parallel rank ``d``
and ``N = sum_{d,m} loss_mask_{d,m}.sum()`` (counted first: a local count all-reduced over DP).
Megatron then does two things to what the loss closure returns, ``out_{d,m}``:

* the schedule divides it by the number of micro-batches ``M`` before backward
  (``forward_step_calc_loss``, 2-tuple path, context parallel size 1), so rank ``d`` accumulates
  ``g_d = sum_m grad(out_{d,m}) / M``;
* DDP (``calculate_per_token_loss=False``, ``average_in_collective=False``) multiplies the gradient
  buffer by ``1 / dp`` and SUMs it over DP, so the optimizer sees ``g = (1 / dp) * sum_d g_d``.

Returning ``out_{d,m} = s_{d,m} * M * dp / N`` therefore gives ``g = grad(L)`` exactly, with unequal
token counts across micro-batches and ranks. The reported loss is ``L`` itself, summed in float64.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.distributed as dist

from mopd.errors import DataError, NonFiniteLossError
from mopd.parallel import ParallelLayout
from mopd.types import LossFn, TrainBatch

_PAD_VALUE = {"teacher_index": -1}
"""Padding per TrainBatch field (0 elsewhere; padded positions have loss_mask 0)."""


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one step did; identical on every rank."""

    loss: float
    """Mean loss over the valid response tokens of the global batch."""
    grad_norm: float
    """Global gradient norm before clipping."""
    lr: float
    """Learning rate the optimizer step used."""
    num_tokens: int
    """Valid response tokens in the global batch (all micro-batches, all data-parallel ranks)."""
    tokens_per_s: float
    """``num_tokens`` divided by the step's wall time."""
    metrics: dict[str, float]
    """``loss_fn``'s metric sums, summed over micro-batches and data-parallel ranks."""


def pad_batch(batch: TrainBatch, rows: int, length: int) -> TrainBatch:
    """Right-pad every field to ``rows`` sequences of ``length`` positions (masked, so inert)."""
    out = {}
    for f in fields(TrainBatch):
        t = getattr(batch, f.name)
        if t is None:
            out[f.name] = None
            continue
        shape = list(t.shape)
        shape[0] = rows
        if t.dim() > 1:
            shape[1] = length
        padded = torch.full(shape, _PAD_VALUE.get(f.name, 0), dtype=t.dtype, device=t.device)
        padded[tuple(slice(0, n) for n in t.shape[:2])] = t
        out[f.name] = padded
    return TrainBatch(**out)


def broadcast_micro_batches(micro_batches: list[TrainBatch] | None, layout: ParallelLayout) -> list[TrainBatch]:
    """Copy this DP replica's micro-batches from its first rank (TP 0 of stage 0) to all its TP/PP ranks.

    For callers whose data lives on one rank per replica; ``train_step`` needs them on every rank
    (the first stage embeds the tokens, the last computes the loss). Other ranks pass None.
    """
    if layout.tp * layout.pp == 1:
        return list(micro_batches or [])
    box = [None if micro_batches is None else [b.to("cpu") for b in micro_batches]]
    # The replica's lowest global rank is its TP 0 / stage 0 rank, and group rank 0 of mp_group.
    dist.broadcast_object_list(box, group=layout.mp_group, group_src=0)
    if box[0] is None:
        raise DataError("broadcast_micro_batches: the replica's first rank (TP 0, stage 0) passed no micro-batches")
    return box[0]


def length_multiple(rows: int, tp: int, sequence_parallel: bool, fp8_tokens: int | None) -> int:
    """What the padded sequence length must be a multiple of, for micro-batches of ``rows`` sequences.

    Sequence parallelism splits the sequence over the TP ranks: a multiple of ``tp``. Under FP8 each
    rank's linear layers see ``rows * length`` tokens (``rows * length / tp`` with SP, before the
    all-gather) and TE's FP8 GEMMs need that token count to be a multiple of ``fp8_tokens``
    (mopd.student.hardware.fp8_token_multiple: 16 for tensorwise/delayed scaling).
    """
    split = tp if sequence_parallel else 1
    if fp8_tokens is None:
        return split
    # rows * (length / split) % fp8_tokens == 0  <=>  length % (split * fp8_tokens / gcd(rows, fp8_tokens)) == 0
    return split * (fp8_tokens // math.gcd(rows, fp8_tokens))


def _common_shape(micro_batches: list[TrainBatch], layout: ParallelLayout, config) -> tuple[int, int]:
    """(rows, length) every micro-batch is padded to; ``config`` is the model's TransformerConfig."""
    from mopd.student.hardware import fp8_token_multiple

    rows = max(int(b.tokens.shape[0]) for b in micro_batches)
    length = max(int(b.tokens.shape[1]) for b in micro_batches)
    fp8_tokens = fp8_token_multiple(config.fp8_recipe) if config.fp8 else None
    multiple = length_multiple(rows, layout.tp, config.sequence_parallel, fp8_tokens)
    return rows, -(-length // multiple) * multiple


def _megatron_loss(batch: TrainBatch, loss_fn: LossFn, scale: float, logits: torch.Tensor):
    """The closure the schedule calls on the last stage: ``logits`` is [B, S, V_local]."""
    loss_sum, metric_sums = loss_fn(logits, batch)
    report = {name: value.detach().float() for name, value in metric_sums.items()}
    report["__loss_sum__"] = loss_sum.detach().float()
    return loss_sum * scale, report


def _forward_step(loss_fn: LossFn, scale: float, device: torch.device, data_iterator, model):
    batch = next(data_iterator).to(device)
    logits = model(batch.tokens, batch.position_ids, None)
    return logits, partial(_megatron_loss, batch, loss_fn, scale)


def _global_token_count(micro_batches: list[TrainBatch], layout: ParallelLayout) -> int:
    local = torch.tensor([sum(float(b.loss_mask.sum()) for b in micro_batches)], dtype=torch.float64,
                         device=layout.device)
    dist.all_reduce(local, group=layout.dp_group)
    return int(round(local.item()))


def _reduce_reports(reports: list[dict[str, torch.Tensor]], layout: ParallelLayout,
                    teacher_names: tuple[str, ...], micro_batches: list[TrainBatch]) -> dict:
    """Sum the last stage's per-micro-batch reports over DP; broadcast the result to every stage."""
    summary = None
    if layout.is_last_stage:
        local: dict[str, float] = {}
        bad_teachers: set[str] = set()
        for report, batch in zip(reports, micro_batches):
            for name, value in report.items():
                local[name] = local.get(name, 0.0) + float(value)
            if not math.isfinite(float(report["__loss_sum__"])):
                bad_teachers |= _teachers_in(batch, teacher_names)
        gathered = [None] * layout.dp
        dist.all_gather_object(gathered, (local, sorted(bad_teachers)), group=layout.dp_group)
        totals: dict[str, float] = {}
        for part, _ in gathered:
            for name, value in part.items():
                totals[name] = totals.get(name, 0.0) + value
        summary = {"totals": totals, "bad_teachers": sorted({t for _, ts in gathered for t in ts})}
    if layout.pp > 1:
        box = [summary]
        dist.broadcast_object_list(box, group=layout.pp_group, group_src=layout.pp - 1)
        summary = box[0]
    return summary


def _teachers_in(batch: TrainBatch, teacher_names: tuple[str, ...]) -> set[str]:
    ids = batch.teacher_index[batch.loss_mask > 0].unique().tolist()
    return {teacher_names[i] for i in ids if 0 <= i < len(teacher_names)}


def train_step(model_chunks: list[torch.nn.Module], optimizer, scheduler, micro_batches: list[TrainBatch],
               loss_fn: LossFn, layout: ParallelLayout, *, step: int,
               teacher_names: tuple[str, ...] = ()) -> StepResult:
    """Forward/backward over ``micro_batches`` (this DP rank's share), then one optimizer step.

    Every rank of a data-parallel replica (all its TP and PP ranks) passes the same micro-batches.
    Rows must start at position 0: Megatron's RoPE uses positions ``0..S-1`` of the padded rows.
    Raises NonFiniteLossError naming ``step`` (and the teachers of the offending micro-batches, when
    ``teacher_names`` maps ``teacher_index``) before the optimizer touches the weights.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        raise DataError(f"train_step(step={step}): no micro-batches")
    start = time.perf_counter()
    config = model_chunks[0].config
    rows, length = _common_shape(micro_batches, layout, config)
    padded = [pad_batch(b, rows, length) for b in micro_batches]
    num_tokens = _global_token_count(padded, layout)
    if num_tokens == 0:
        raise DataError(f"train_step(step={step}): the global batch has no valid response tokens (loss_mask is all 0)")
    scale = len(padded) * layout.dp / num_tokens

    for chunk in model_chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_fn, scale, layout.device),
        data_iterator=iter(padded), model=model_chunks, num_microbatches=len(padded),
        seq_length=length, micro_batch_size=rows, forward_only=False,
    )
    summary = _reduce_reports(reports, layout, teacher_names, padded)
    totals = summary["totals"]
    loss = totals.pop("__loss_sum__") / num_tokens
    found_inf, grad_norm = _checked_grad_norm(optimizer, loss, step, summary["bad_teachers"])
    _step_with_prepared_grads(optimizer, found_inf)
    lr = _current_lr(optimizer)
    scheduler.step(1)
    elapsed = time.perf_counter() - start
    return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, num_tokens=num_tokens,
                      tokens_per_s=num_tokens / elapsed, metrics=totals)


def _checked_grad_norm(optimizer, loss: float, step: int, bad_teachers: list[str]) -> tuple[bool, float]:
    """(fp16 overflow found, gradient norm) of the reduced gradients; raises on a non-finite loss or norm.

    ``optimizer.step()`` computes the norm and updates the weights in one call, so the gradients are
    prepared (copied to the main params, unscaled under fp16) and the norm computed here first.
    Under fp16 an overflow is the loss scaler's business: the step is skipped and the scale lowered.
    """
    who = f" (teachers {', '.join(bad_teachers)})" if bad_teachers else ""
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"step {step}: loss is {loss}{who}; the weights were not updated")
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm) and not found_inf:
        raise NonFiniteLossError(f"step {step}: gradient norm is {grad_norm}{who}; the weights were not updated")
    return found_inf, grad_norm


def _step_with_prepared_grads(optimizer, found_inf: bool) -> None:
    """``optimizer.step()`` without its own ``prepare_grads``: a second call would update the fp16
    loss scaler twice and unscale with the already-updated scale."""
    optimizer.prepare_grads = lambda: found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.prepare_grads


def _current_lr(optimizer) -> float:
    lr = optimizer.param_groups[0]["lr"]
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)
