"""The distillation loss the Megatron train step calls: ``LossFn(logits, batch) -> (loss_sum, metric_sums)``.

What is minimised (DESIGN.md §4), over the valid response tokens t of the GLOBAL batch:

    L = (1 / N_valid) * sum_t  m_t * c_{T(t)} * sum_j coef_j * loss_j(t)

- T(t) = ``batch.teacher_index`` at t: every token has exactly one teacher (per-prompt routing expanded
  to tokens, or per-token routing); c_T is that teacher's coef, and its terms j (objective, coef, options)
  come from its config (``objectives_per_teacher``). The objectives are in divergences.py and
  policy_gradient.py.
- m_t = ``batch.loss_mask`` (0/1 in practice; fractional values weight the token).
- Token-level mean: this function returns the numerator only; the train step divides by the number of
  valid tokens of the whole global batch (all micro-batches, all DP ranks), so the gradient scale does
  not depend on how tokens are split into micro-batches or across data-parallel ranks.
- Deliberately left out: sequence-level normalisation; per-token teacher mixtures (``Routing.weights``,
  one teacher per token here); a reference-model KL; student temperature (always 1).

The logits stay vocab-parallel: one chunked pass (vocab_parallel.py) gives the student's log p at the
teacher's top-K ids and the sampled token, and the exact tail mass; everything after that is [n, K].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from mopd.config import ObjectiveConfig, ObjectiveName
from mopd.errors import ObjectiveError
from mopd.objectives.divergences import Buckets
from mopd.objectives.metrics import teacher_metrics
from mopd.objectives.cross_vocab import ChunkInputs
from mopd.objectives.registry import InTrainerTeacher, ObjectiveInputs, check_objective, run_objective
from mopd.objectives.validation import validate_batch
from mopd.objectives.vocab_parallel import VocabShard, select_logprobs
from mopd.types import LossFn, TrainBatch


@dataclass(frozen=True, slots=True)
class TeacherPlan:
    """The loss terms of one teacher."""

    index: int
    """Index into the run's teacher list (the values of ``TrainBatch.teacher_index``)."""
    name: str
    coef: float
    terms: tuple[ObjectiveConfig, ...]

    @property
    def reads_teacher(self) -> bool:
        """False for a pure SFT teacher slot, whose teacher tensors may be placeholders."""
        return any(ObjectiveName(t.name) != ObjectiveName.cross_entropy for t in self.terms)

    @property
    def needs_behaviour(self) -> bool:
        return any(t.importance_ratio for t in self.terms)

    @property
    def needs_reward(self) -> bool:
        return any(ObjectiveName(t.name) == ObjectiveName.rlsd for t in self.terms)


@dataclass(frozen=True, slots=True)
class LossPlan:
    teachers: tuple[TeacherPlan, ...]
    shard: VocabShard
    chunk_tokens: int

    def teacher(self, index: int) -> TeacherPlan | None:
        return next((t for t in self.teachers if t.index == index), None)


def build_loss_fn(
    objectives_per_teacher: dict[int, list[ObjectiveConfig]], teacher_names: list[str] | tuple[str, ...], *,
    tp_group: dist.ProcessGroup | None, vocab_start: int, vocab_size: int, chunk_tokens: int = 1024,
    teacher_coefs: dict[int, float] | None = None,
) -> LossFn:
    """The LossFn for this rank's vocabulary slice ``[vocab_start, vocab_start + V_local)`` of ``tp_group``.

    objectives_per_teacher: teacher index -> its loss terms (a teacher absent here must not appear in a
    batch). teacher_coefs: teacher index -> scale of its loss (default 1). chunk_tokens bounds the fp32
    working set to [chunk_tokens, V_local].
    """
    if chunk_tokens < 1 or vocab_size < 1 or vocab_start < 0:
        raise ObjectiveError(f"build_loss_fn: chunk_tokens={chunk_tokens}, vocab_size={vocab_size}, "
                             f"vocab_start={vocab_start} must be >= 1, >= 1 and >= 0")
    coefs = teacher_coefs or {}
    plans = []
    for index, terms in sorted(objectives_per_teacher.items()):
        if not 0 <= index < len(teacher_names):
            raise ObjectiveError(f"objectives for teacher index {index}, but there are {len(teacher_names)} "
                                 f"teachers {list(teacher_names)}")
        if not terms:
            raise ObjectiveError(f"teacher {teacher_names[index]!r} has no objectives")
        for j, cfg in enumerate(terms):
            check_objective(cfg, f"teacher {teacher_names[index]!r} objectives[{j}]")
        plans.append(TeacherPlan(index, teacher_names[index], float(coefs.get(index, 1.0)), tuple(terms)))
    plan = LossPlan(tuple(plans), VocabShard(vocab_start, vocab_size, tp_group), chunk_tokens)
    return partial(distill_loss, plan=plan)


def distill_loss(logits: torch.Tensor, batch: TrainBatch, *,
                 plan: LossPlan) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """[B, S, V_local] logits -> (scalar loss SUM over valid tokens, metric sums). See the module docstring."""
    validate_batch(logits, batch, plan)
    mask = batch.loss_mask.reshape(-1)
    rows = (mask > 0).nonzero().squeeze(1)
    teacher_of = batch.teacher_index.reshape(-1)[rows]
    topk_ids = batch.topk_ids.reshape(-1, batch.topk_ids.shape[-1])[rows].long()
    targets = batch.targets.reshape(-1)[rows].long()
    k = topk_ids.shape[1]
    sel = select_logprobs(logits, rows, torch.cat([topk_ids, targets[:, None]], dim=1), plan.shard,
                          tail_cols=k, chunk_tokens=plan.chunk_tokens)
    seq_of = rows // batch.loss_mask.shape[1]
    # A zero on the graph even when no token is valid. Not a slice of the logits: its backward would
    # allocate a second full-size gradient.
    loss_sum = sel.logp[:, :0].sum()
    metrics: dict[str, torch.Tensor] = {}
    for tp in plan.teachers:
        pos = (teacher_of == tp.index).nonzero().squeeze(1)
        x = _inputs(batch, logits, rows, pos, seq_of, sel, k, plan)
        terms = [(ObjectiveName(cfg.name).value, run_objective(cfg, x, f"teacher {tp.name!r}")) for cfg in tp.terms]
        total = tp.coef * sum(cfg.coef * term.loss for cfg, (_, term) in zip(tp.terms, terms))
        weight = mask[rows[pos]].float()
        # where(): a token with weight 0 must not turn an infinite term into NaN.
        loss_sum = loss_sum + torch.where(weight > 0, weight * total, 0.0).sum()
        metrics.update(teacher_metrics(tp.name, x, weight, terms, total, with_teacher=tp.reads_teacher))
    return loss_sum, metrics


def _inputs(batch: TrainBatch, logits: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
            seq_of: torch.Tensor, sel, k: int, plan: LossPlan) -> ObjectiveInputs:
    """The n tokens ``rows[pos]`` of one teacher as ObjectiveInputs."""
    r = rows[pos]

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *t.shape[2:])[r]

    chunks = None
    if batch.chunk_index is not None:  # a cross-tokenizer teacher in the batch: its rows come in chunks
        chunks = ChunkInputs.build(flat(batch.chunk_index), flat(batch.chunk_teacher_tokens), seq_of[pos])

    return ObjectiveInputs(
        student=Buckets(sel.logp[pos, :k], sel.log_tail[pos]),
        student_sampled=sel.logp[pos, k],
        topk_logprobs=flat(batch.topk_logprobs),
        tail_logmass=flat(batch.tail_logmass).float(),
        sampled_logprob=flat(batch.sampled_logprob).float(),
        behaviour_logprobs=flat(batch.behaviour_logprobs).float(),
        reward=batch.reward.float()[seq_of[pos]],
        in_trainer=InTrainerTeacher(logits, batch.teacher_logits, r, plan.shard, plan.chunk_tokens),
        chunks=chunks,
    )
