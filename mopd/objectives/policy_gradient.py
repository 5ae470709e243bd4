"""Objectives that read the teacher at the sampled token only: REINFORCE-style losses and SFT.

Per response token with sampled id y, student log p_s(y) (differentiable), teacher log p_t(y) at the
teacher temperature (see divergences.py), behaviour log p_b(y) (the weights that sampled y):

    reverse_kl_sampled   A = sg[log p_t(y) - log p_s(y)],           loss = -w A log p_s(y)
        Its gradient, E_y[-A grad log p_s(y)], is the gradient of the reverse KL(p_s || p_t) on policy
        (the log-ratio is the per-token reward; no baseline, no future-token credit).
    rlsd (RLSD, arXiv 2604.03128)
        Delta = sg[log p_t(y) - log p_s(y)],  c = clip(exp(sign(r) Delta), 1 - eps, 1 + eps),
        A = r c,  loss = -w A log p_s(y).  The verifier reward r of the sequence (an advantage: normalise
        it upstream, e.g. against a group baseline) sets the sign and scale; the teacher only moves credit
        between tokens, by at most eps (``credit_clip``). r = 0 gives zero loss.
    aopd                 where sg[log p_t(y) < log p_s(y)] (the teacher likes y less than the student):
        top-K forward KL with tail (divergences.py); elsewhere the reverse_kl_sampled loss, whose
        advantage there is >= 0.
    cross_entropy        loss = -log p_s(y)  (SFT; teacher unused)

Importance weight (TIS, truncated importance sampling): w = min(sg[p_s(y) / p_b(y)], ratio_cap) when
``importance_ratio`` is on, else 1. ``token_clip`` > 0 clamps the advantage A to [-token_clip, token_clip]
(symmetric, because a policy-gradient advantage has either sign). Tokens where w or A was clipped count
as clipped.
"""

from __future__ import annotations

import torch

from mopd.objectives.divergences import TermOutput


def importance_weight(student_logp: torch.Tensor, behaviour_logp: torch.Tensor,
                      ratio_cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """([n] detached truncated ratio min(p_s/p_b, ratio_cap), [n] bool truncated)."""
    # Clamping the log-ratio keeps exp finite for stale or garbage behaviour logprobs.
    ratio = (student_logp.detach() - behaviour_logp.float()).clamp(-20.0, 20.0).exp()
    return ratio.clamp(max=ratio_cap), ratio > ratio_cap


def policy_gradient(student_logp: torch.Tensor, advantage: torch.Tensor, *, behaviour_logp: torch.Tensor | None,
                    ratio_cap: float, token_clip: float) -> TermOutput:
    """-w A log p_s(y) for a detached advantage A [n]; the shared tail of every sampled-token objective."""
    advantage = advantage.detach()
    clipped = torch.zeros_like(advantage, dtype=torch.bool)
    if token_clip > 0:
        clipped |= advantage.abs() > token_clip
        advantage = advantage.clamp(-token_clip, token_clip)
    if behaviour_logp is not None:
        w, truncated = importance_weight(student_logp, behaviour_logp, ratio_cap)
        advantage, clipped = advantage * w, clipped | truncated
    return TermOutput(loss=-advantage * student_logp, clipped=clipped)


def reverse_kl_sampled(student_logp: torch.Tensor, teacher_logp: torch.Tensor, *,
                       behaviour_logp: torch.Tensor | None = None, ratio_cap: float = 2.0,
                       token_clip: float = 0.0) -> TermOutput:
    """Sampled-token reverse KL as a policy gradient. All inputs [n] fp32; behaviour None: no IS weight."""
    return policy_gradient(student_logp, teacher_logp - student_logp, behaviour_logp=behaviour_logp,
                           ratio_cap=ratio_cap, token_clip=token_clip)


def rlsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, reward: torch.Tensor, *, credit_clip: float,
         behaviour_logp: torch.Tensor | None = None, ratio_cap: float = 2.0,
         token_clip: float = 0.0) -> TermOutput:
    """Verifier-directed self-distillation: reward [n] (per token, the sequence's) sets sign and scale."""
    delta = (teacher_logp - student_logp).detach()
    credit = (torch.sign(reward) * delta).exp().clamp(1.0 - credit_clip, 1.0 + credit_clip)
    return policy_gradient(student_logp, reward * credit, behaviour_logp=behaviour_logp,
                           ratio_cap=ratio_cap, token_clip=token_clip)


def aopd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, forward_kl: TermOutput, *,
         behaviour_logp: torch.Tensor | None = None, ratio_cap: float = 2.0,
         token_clip: float = 0.0) -> TermOutput:
    """Gate per token between the top-K forward KL ``forward_kl`` (already clipped) and the log-ratio PG.

    token_clip here clamps the PG branch's advantage; the registry passes 0, because the config's
    token_clip already capped the KL branch (one knob, one meaning per objective).
    """
    use_kl = (teacher_logp < student_logp).detach()
    pg = reverse_kl_sampled(student_logp, teacher_logp, behaviour_logp=behaviour_logp, ratio_cap=ratio_cap,
                            token_clip=token_clip)
    return TermOutput(loss=torch.where(use_kl, forward_kl.loss, pg.loss),
                      clipped=torch.where(use_kl, forward_kl.clipped, pg.clipped))


def cross_entropy(student_logp: torch.Tensor) -> TermOutput:
    """SFT: -log p_s(y) [n]."""
    return TermOutput(loss=-student_logp, clipped=torch.zeros_like(student_logp, dtype=torch.bool))
