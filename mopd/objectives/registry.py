"""The objectives by name (``mopd.config.ObjectiveName``): each maps one teacher's tokens to [n] losses.

An objective is ``fn(inputs: ObjectiveInputs, cfg: ObjectiveConfig) -> TermOutput``. The math of each lives
in divergences.py (bucketed divergences) and policy_gradient.py (sampled-token losses).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from mopd.config import ObjectiveConfig, ObjectiveName
from mopd.errors import ObjectiveError
from mopd.objectives import cross_vocab as xv
from mopd.objectives import policy_gradient as pg
from mopd.objectives.divergences import Buckets, TermOutput, bucket_divergence, teacher_at_temperature
from mopd.objectives.vocab_parallel import VocabShard, global_topk_ids, select_logprobs


@dataclass(frozen=True, slots=True)
class InTrainerTeacher:
    """Full-vocabulary access for teachers that run inside the trainer (student-top-K objectives)."""

    student_logits: torch.Tensor
    """[..., V_local] the student's logits slice (differentiable); leading dims flatten to N rows."""
    teacher_logits: torch.Tensor | None
    """[..., V_local] the teacher's logits slice, same layout (None: no in-trainer teacher in this batch)."""
    rows: torch.Tensor
    """[n] int64 rows of the two logits tensors that belong to this teacher's tokens."""
    shard: VocabShard
    chunk_tokens: int


@dataclass(frozen=True, slots=True)
class ObjectiveInputs:
    """Everything an objective may read for the n response tokens routed to one teacher."""

    student: Buckets
    """Student log p at the teacher's top-K ids [n, K] and its tail log-mass [n] (differentiable)."""
    student_sampled: torch.Tensor
    """[n] fp32 student log p(y) of the sampled token (differentiable)."""
    topk_logprobs: torch.Tensor
    """[n, K] teacher top-K logprobs at temperature 1 (bf16/fp16/fp32)."""
    tail_logmass: torch.Tensor
    """[n] fp32 teacher log-mass outside its top-K."""
    sampled_logprob: torch.Tensor
    """[n] fp32 teacher log p(y)."""
    behaviour_logprobs: torch.Tensor
    """[n] fp32 log p(y) under the weights that sampled y."""
    reward: torch.Tensor
    """[n] fp32 the verifier reward of each token's sequence."""
    in_trainer: InTrainerTeacher | None = None
    chunks: xv.ChunkInputs | None = None
    """Cross-tokenizer alignment chunks of these tokens (None: every token is its own 1:1 chunk)."""

    def teacher(self, temperature: float) -> tuple[Buckets, torch.Tensor]:
        """(teacher buckets at ``temperature``, [n] teacher log p(y) at the same temperature)."""
        buckets, log_z = teacher_at_temperature(self.topk_logprobs, self.tail_logmass, temperature)
        return buckets, self.sampled_logprob.float() / temperature - log_z


Objective = Callable[[ObjectiveInputs, ObjectiveConfig], TermOutput]


def _bucketed(kind: str) -> Objective:
    def objective(x: ObjectiveInputs, cfg: ObjectiveConfig) -> TermOutput:
        if x.chunks is not None:
            return xv.one_to_one_divergence(kind, x, cfg)
        teacher, _ = x.teacher(cfg.teacher_temperature)
        return bucket_divergence(kind, teacher, x.student, tail=cfg.tail_bucket, beta=cfg.beta,
                                 entry_clip=cfg.entry_clip, token_clip=cfg.token_clip)
    objective.__name__ = f"{kind}_topk"
    return objective


def _behaviour(x: ObjectiveInputs, cfg: ObjectiveConfig) -> torch.Tensor | None:
    return x.behaviour_logprobs if cfg.importance_ratio else None


def reverse_kl_sampled(x: ObjectiveInputs, cfg: ObjectiveConfig) -> TermOutput:
    if x.chunks is not None:
        return xv.chunk_reverse_kl(x, cfg)
    _, teacher_y = x.teacher(cfg.teacher_temperature)
    return pg.reverse_kl_sampled(x.student_sampled, teacher_y, behaviour_logp=_behaviour(x, cfg),
                                 ratio_cap=cfg.ratio_cap, token_clip=cfg.token_clip)


def rlsd(x: ObjectiveInputs, cfg: ObjectiveConfig) -> TermOutput:
    _, teacher_y = x.teacher(cfg.teacher_temperature)
    return pg.rlsd(x.student_sampled, teacher_y, x.reward, credit_clip=cfg.credit_clip,
                   behaviour_logp=_behaviour(x, cfg), ratio_cap=cfg.ratio_cap, token_clip=cfg.token_clip)


def aopd(x: ObjectiveInputs, cfg: ObjectiveConfig) -> TermOutput:
    teacher, teacher_y = x.teacher(cfg.teacher_temperature)
    fkl = bucket_divergence("forward_kl", teacher, x.student, tail=cfg.tail_bucket,
                            entry_clip=cfg.entry_clip, token_clip=cfg.token_clip)
    # The token clip already capped the KL branch; the PG branch takes no advantage clip here.
    return pg.aopd(x.student_sampled, teacher_y, fkl, behaviour_logp=_behaviour(x, cfg), ratio_cap=cfg.ratio_cap)


def cross_entropy(x: ObjectiveInputs, cfg: ObjectiveConfig) -> TermOutput:
    return pg.cross_entropy(x.student_sampled)


def reverse_kl_student_topk(x: ObjectiveInputs, cfg: ObjectiveConfig) -> TermOutput:
    """Reverse KL over the student's own top-k (+ tail); the teacher is read exactly from its logits."""
    it = x.in_trainer
    if it is not None and it.rows.numel() == 0:
        empty = x.student_sampled.new_zeros(0)
        return TermOutput(loss=empty, clipped=empty.bool())
    if it is None or it.teacher_logits is None:
        raise ObjectiveError("reverse_kl_student_topk needs an in-trainer teacher: TrainBatch.teacher_logits is "
                             "None (remote teachers only send their own top-K; use forward_kl_topk or jsd)")
    ids = global_topk_ids(it.student_logits, it.rows, cfg.student_top_k, it.shard, chunk_tokens=it.chunk_tokens)
    k = ids.shape[1]
    student = select_logprobs(it.student_logits, it.rows, ids, it.shard, tail_cols=k, chunk_tokens=it.chunk_tokens)
    with torch.no_grad():
        teacher = select_logprobs(it.teacher_logits.detach(), it.rows, ids, it.shard, tail_cols=k,
                                  temperature=cfg.teacher_temperature, chunk_tokens=it.chunk_tokens)
    return bucket_divergence("reverse_kl", Buckets(teacher.logp, teacher.log_tail),
                             Buckets(student.logp, student.log_tail), tail=cfg.tail_bucket,
                             entry_clip=cfg.entry_clip, token_clip=cfg.token_clip)


OBJECTIVES: dict[ObjectiveName, Objective] = {
    ObjectiveName.forward_kl_topk: _bucketed("forward_kl"),
    ObjectiveName.reverse_kl_sampled: reverse_kl_sampled,
    ObjectiveName.reverse_kl_student_topk: reverse_kl_student_topk,
    ObjectiveName.jsd: _bucketed("jsd"),
    ObjectiveName.skew_kl: _bucketed("skew_kl"),
    ObjectiveName.aopd: aopd,
    ObjectiveName.rlsd: rlsd,
    ObjectiveName.cross_entropy: cross_entropy,
    ObjectiveName.uld: xv.uld,
}

CROSS_VOCAB = frozenset({ObjectiveName.reverse_kl_sampled, ObjectiveName.forward_kl_topk, ObjectiveName.jsd,
                         ObjectiveName.skew_kl, ObjectiveName.uld, ObjectiveName.cross_entropy})
"""Objectives defined for a teacher of another tokenizer (cross_vocab.py); the others read per-token
teacher values that only a same-vocabulary teacher has."""

_NO_ENTRY_CLIP = {ObjectiveName.reverse_kl_sampled, ObjectiveName.rlsd, ObjectiveName.cross_entropy,
                  ObjectiveName.uld}


def run_objective(cfg: ObjectiveConfig, x: ObjectiveInputs, where: str) -> TermOutput:
    """``cfg``'s objective on ``x``; an objective outside CROSS_VOCAB meeting real (not all 1:1) chunks is
    an ObjectiveError naming ``where`` (the teacher), never a silent misreading of placeholder rows."""
    name = ObjectiveName(cfg.name)
    ch = x.chunks
    if ch is not None and name not in CROSS_VOCAB:
        if bool(ch.one_to_one.all()):
            x = replace(x, chunks=None)  # every token is 1:1: exactly the same-vocabulary case
        else:
            raise ObjectiveError(f"{where}: {name.value} is not defined for a cross-tokenizer teacher; use one of "
                                 f"{sorted(n.value for n in CROSS_VOCAB)}")
    return get_objective(name)(x, cfg)


def get_objective(name: ObjectiveName | str) -> Objective:
    """The objective called ``name``; an unknown name raises ObjectiveError listing the valid ones."""
    try:
        return OBJECTIVES[ObjectiveName(name)]
    except ValueError:
        raise ObjectiveError(f"unknown objective {name!r}; valid: {sorted(n.value for n in OBJECTIVES)}") from None


def check_objective(cfg: ObjectiveConfig, where: str) -> None:
    """Reject settings an objective cannot honour; ``where`` names the teacher/term in the message."""
    get_objective(cfg.name)
    problems = [f"{p.key}={p.value!r} {p.reason}" for p in cfg.problems()]
    if cfg.entry_clip > 0 and ObjectiveName(cfg.name) in _NO_ENTRY_CLIP:
        problems.append(f"entry_clip={cfg.entry_clip} has no vocabulary entries to clip in {cfg.name.value}; "
                        "use token_clip (advantage clamp)")
    if problems:
        raise ObjectiveError(f"{where} ({ObjectiveName(cfg.name).value}): " + "; ".join(problems))
