"""Divergences between teacher and student over a bucketed support: top-K entries plus one tail bucket.

Notation per response token (one row): S = the K ids of the support (the teacher's top-K, or the
student's own top-k for ``reverse_kl_student_topk``); the buckets are the K entries of S and, when the
tail bucket is on, one extra bucket ``tail = V \\ S``. ``p_s`` is the student's full-vocabulary softmax
(exact: ``p_s(tail)`` is summed over the complement, never ``1 - sum``), ``p_t`` the teacher's.

Teacher temperature tau (remote teachers send log p_t at tau = 1 over the full vocabulary):

    p_t^tau(v)    = p_t(v)^(1/tau) / Z,   v in S
    p_t^tau(tail) = p_t(tail)^(1/tau) / Z,   Z makes the K + 1 buckets sum to 1.

The tail line is the approximation: it treats the tail as ONE token, p_t(tail)^(1/tau), while the exact
unnormalised value is ``sum_{v in tail} p_t(v)^(1/tau)`` (unknown: the teacher did not send those
entries). By the power-mean inequality, for tau < 1 the approximation over-estimates the tail's weight
by a factor in [1, |tail|^(1/tau - 1)], for tau > 1 it under-estimates it by a factor in
[1, |tail|^(1 - 1/tau)]; at tau = 1 it is exact and Z only removes the bf16 rounding of the transported
logprobs. In-trainer teachers (full logits, ``reverse_kl_student_topk``) apply tau exactly.

Per-bucket contributions c_b, summed over buckets b (K entries, plus the tail when enabled):

    forward KL   c_b = p_t(b) (log p_t(b) - log p_s(b))
    reverse KL   c_b = p_s(b) (log p_s(b) - log p_t(b))
    JSD(beta)    c_b = beta p_t(b) log(p_t(b)/m(b)) + (1 - beta) p_s(b) log(p_s(b)/m(b)),
                 m = beta p_t + (1 - beta) p_s, 0 < beta < 1 (TRL's orientation: beta -> 0 is forward KL
                 scaled by beta, so the endpoints are the explicit forward/reverse modes, not beta = 0/1)
    skew KL(a)   c_b = p_t(b) log(p_t(b) / (a p_t(b) + (1 - a) p_s(b))), 0 < a < 1 (DistiLLM's SKL)

with 0 log 0 = 0. Clipping (OPSD): ``entry_clip`` replaces each c_b by min(c_b, entry_clip) before the
sum (the gradient of a clipped entry is zero); ``token_clip`` replaces the per-token sum D by
min(D, token_clip). Both only cap from above: negative contributions (possible for single buckets of a
KL) are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Buckets:
    """Log-probabilities of one distribution over the K + 1 buckets of each row."""

    logp: torch.Tensor
    """[n, K] fp32 log p at the support ids."""
    log_tail: torch.Tensor
    """[n] fp32 log p(V \\ S) (-inf when the support holds all the mass)."""

    def columns(self, tail: bool) -> torch.Tensor:
        """[n, K + tail] the bucket log-probabilities, tail last."""
        return torch.cat([self.logp, self.log_tail[:, None]], dim=1) if tail else self.logp


@dataclass(frozen=True, slots=True)
class TermOutput:
    """What one objective returns for n tokens."""

    loss: torch.Tensor
    """[n] fp32 per-token loss (differentiable w.r.t. the student logits)."""
    clipped: torch.Tensor
    """[n] bool: a clip (entry, token, importance ratio or advantage) changed this token's value."""


def teacher_at_temperature(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor,
                           temperature: float) -> tuple[Buckets, torch.Tensor]:
    """Renormalised teacher buckets at ``temperature`` and the [n] log-normaliser log Z.

    topk_logprobs: [n, K] any float dtype (upcast to fp32); tail_logmass: [n]. The sampled token's
    logprob at temperature is ``sampled_logprob / temperature - log Z`` (same normaliser).
    """
    cols = torch.cat([topk_logprobs.float(), tail_logmass.float()[:, None]], dim=1) / temperature
    log_z = torch.logsumexp(cols, dim=1)
    cols = cols - log_z[:, None]
    return Buckets(logp=cols[:, :-1], log_tail=cols[:, -1]), log_z


def _plogratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a (log a - log b) elementwise, 0 where a = 0, NaN-free in value and gradient."""
    live = log_a > float("-inf")
    a = torch.where(live, log_a, 0.0)
    b = torch.where(live, log_b, 0.0)
    return torch.where(live, a.exp() * (a - b), 0.0)


def _log_mix(weight: float, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """log(weight a + (1 - weight) b); -inf where a = b = 0 without NaN gradients."""
    dead = (log_a == float("-inf")) & (log_b == float("-inf"))
    a = torch.where(dead, 0.0, log_a) + math.log(weight)
    b = torch.where(dead, 0.0, log_b) + math.log1p(-weight)
    return torch.where(dead, float("-inf"), torch.logaddexp(a, b))


def forward_kl_terms(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return _plogratio(teacher, student)


def reverse_kl_terms(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return _plogratio(student, teacher)


def jsd_terms(teacher: torch.Tensor, student: torch.Tensor, beta: float) -> torch.Tensor:
    log_m = _log_mix(beta, teacher, student)
    return beta * _plogratio(teacher, log_m) + (1.0 - beta) * _plogratio(student, log_m)


def skew_kl_terms(teacher: torch.Tensor, student: torch.Tensor, alpha: float) -> torch.Tensor:
    return _plogratio(teacher, _log_mix(alpha, teacher, student))


def clip_and_sum(terms: torch.Tensor, entry_clip: float, token_clip: float) -> TermOutput:
    """Per-token sum of [n, B] bucket contributions with the optional OPSD entry cap and token cap."""
    clipped = torch.zeros(terms.shape[0], dtype=torch.bool, device=terms.device)
    if entry_clip > 0:
        clipped |= (terms > entry_clip).any(dim=1)
        terms = terms.clamp(max=entry_clip)
    total = terms.sum(dim=1)
    if token_clip > 0:
        clipped |= total > token_clip
        total = total.clamp(max=token_clip)
    return TermOutput(loss=total, clipped=clipped)


def bucket_divergence(kind: str, teacher: Buckets, student: Buckets, *, tail: bool, beta: float = 0.5,
                      entry_clip: float = 0.0, token_clip: float = 0.0) -> TermOutput:
    """``kind`` in forward_kl / reverse_kl / jsd / skew_kl over the K (+ tail) buckets of each row."""
    t, s = teacher.columns(tail), student.columns(tail)
    if kind == "forward_kl":
        terms = forward_kl_terms(t, s)
    elif kind == "reverse_kl":
        terms = reverse_kl_terms(t, s)
    elif kind == "jsd":
        terms = jsd_terms(t, s, beta)
    elif kind == "skew_kl":
        terms = skew_kl_terms(t, s, beta)
    else:
        raise ValueError(f"unknown bucket divergence {kind!r}; expected forward_kl, reverse_kl, jsd or skew_kl")
    return clip_and_sum(terms, entry_clip, token_clip)
