"""Every objective against a float64 full-vocabulary reference written out plainly below (values and
gradients w.r.t. the logits), through the LossFn the train step calls, including the edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mopd.config import ObjectiveConfig, ObjectiveName
from mopd.objectives import build_loss_fn, mean_metrics
from mopd.types import TrainBatch

N_ = ObjectiveName
REL_TOL = 1e-5


# ----------------------------------------------------------------------------------------------------
# Test data: a [B, S] batch with a padded vocabulary, a full teacher distribution cut to top-K + tail.
# ----------------------------------------------------------------------------------------------------

def make_case(seed: int = 0, *, b: int = 2, s: int = 8, vocab_size: int = 21, v_pad: int = 24, k: int = 5,
              lp_dtype: torch.dtype = torch.float32, teachers: int = 1) -> tuple[torch.Tensor, TrainBatch]:
    """(student logits [B, S, v_pad] fp64, batch). Invalid positions hold garbage that must be ignored."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, s, v_pad, generator=g, dtype=torch.float64) * 2
    student[..., vocab_size:] = 6.0  # padding columns: larger than any real logit, must never count
    teacher = torch.randn(b, s, v_pad, generator=g, dtype=torch.float64) * 2.5
    teacher[..., vocab_size:] = 6.0
    t_lp = torch.log_softmax(teacher[..., :vocab_size], -1)
    top_lp, top_ids = t_lp.topk(k, dim=-1)
    tail = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1.0))
    s_p = torch.softmax(student[..., :vocab_size], -1)
    targets = torch.multinomial(s_p.reshape(-1, vocab_size), 1, generator=g).reshape(b, s)
    mask = torch.ones(b, s)
    mask[:, :2] = 0
    mask[-1, -3:] = 0
    tidx = torch.randint(0, teachers, (b, s), generator=g)
    s_lp = torch.log_softmax(student[..., :vocab_size], -1)
    behaviour = s_lp.gather(-1, targets[..., None])[..., 0] + 0.4 * torch.randn(b, s, generator=g, dtype=torch.float64)
    batch = TrainBatch(
        tokens=torch.zeros(b, s, dtype=torch.long), position_ids=torch.arange(s).expand(b, s).clone(),
        targets=targets, loss_mask=mask,
        topk_ids=torch.where(mask[..., None] > 0, top_ids, 10_000).int(),
        topk_logprobs=torch.where(mask[..., None] > 0, top_lp, float("nan")).to(lp_dtype),
        sampled_logprob=t_lp.gather(-1, targets[..., None])[..., 0].float(),
        tail_logmass=tail.float(), behaviour_logprobs=behaviour.float(),
        teacher_index=torch.where(mask > 0, tidx, -1),
        reward=torch.linspace(1.0, -0.5, b), teacher_logits=teacher.float(),
    )
    return student, batch


# ----------------------------------------------------------------------------------------------------
# The float64 reference: full-vocabulary softmax, then each formula as written in the papers.
# ----------------------------------------------------------------------------------------------------

def kl_terms(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p log(p/q) with 0 log 0 = 0 (the double where keeps 0/0 out of the gradient)."""
    live = p > 0
    p_, q_ = torch.where(live, p, 1.0), torch.where(live, q, 1.0)
    return torch.where(live, p_ * (p_.log() - q_.log()), 0.0)


def reference_token_losses(student64: torch.Tensor, batch: TrainBatch, rows: torch.Tensor, cfg: ObjectiveConfig,
                           vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, per-token forward-KL metric) at the flattened ``rows``, in float64."""
    flat = lambda t: t.reshape(-1, *t.shape[2:])[rows]  # noqa: E731
    logp = torch.log_softmax(flat(student64)[:, :vocab_size], -1)
    p = logp.exp()
    ids = flat(batch.topk_ids).long()
    tau = cfg.teacher_temperature
    a, b_ = flat(batch.topk_logprobs).double() / tau, flat(batch.tail_logmass).double() / tau
    log_z = torch.logsumexp(torch.cat([a, b_[:, None]], 1), 1)
    pt = torch.cat([(a - log_z[:, None]).exp(), (b_ - log_z).exp()[:, None]], 1)
    in_topk = torch.zeros_like(p, dtype=torch.bool).scatter_(1, ids, True)
    ps = torch.cat([p.gather(1, ids), (p * ~in_topk).sum(1, keepdim=True)], 1)
    y = flat(batch.targets)[:, None]
    ls_y = logp.gather(1, y)[:, 0]
    lt_y = flat(batch.sampled_logprob).double() / tau - log_z
    seq = rows // batch.loss_mask.shape[1]

    def clipped_sum(terms: torch.Tensor) -> torch.Tensor:
        if not cfg.tail_bucket:
            terms = terms[:, :-1]
        if cfg.entry_clip > 0:
            terms = terms.clamp(max=cfg.entry_clip)
        total = terms.sum(1)
        return total.clamp(max=cfg.token_clip) if cfg.token_clip > 0 else total

    def pg(adv: torch.Tensor, clip_adv: bool = True) -> torch.Tensor:
        adv = adv.detach()
        if cfg.token_clip > 0 and clip_adv:
            adv = adv.clamp(-cfg.token_clip, cfg.token_clip)
        if cfg.importance_ratio:
            beh = flat(batch.behaviour_logprobs).double()
            adv = adv * (ls_y.detach() - beh).exp().clamp(max=cfg.ratio_cap)
        return -adv * ls_y

    name = N_(cfg.name)
    fkl = clipped_sum(kl_terms(pt, ps))
    if name == N_.forward_kl_topk:
        loss = fkl
    elif name == N_.jsd:
        m = cfg.beta * pt + (1 - cfg.beta) * ps
        loss = clipped_sum(cfg.beta * kl_terms(pt, m) + (1 - cfg.beta) * kl_terms(ps, m))
    elif name == N_.skew_kl:
        loss = clipped_sum(kl_terms(pt, cfg.beta * pt + (1 - cfg.beta) * ps))
    elif name == N_.reverse_kl_sampled:
        loss = pg(lt_y - ls_y)
    elif name == N_.aopd:
        loss = torch.where(lt_y < ls_y, fkl, pg(lt_y - ls_y, clip_adv=False))
    elif name == N_.rlsd:
        r = batch.reward.double()[seq]
        credit = (torch.sign(r) * (lt_y - ls_y)).exp().clamp(1 - cfg.credit_clip, 1 + cfg.credit_clip)
        loss = pg(r * credit)
    elif name == N_.cross_entropy:
        loss = -ls_y
    elif name == N_.uld:  # acts only on cross-tokenizer chunks wider than one token (test_objectives_cross_vocab)
        loss = 0.0 * ls_y
    elif name == N_.reverse_kl_student_topk:
        t_logp = torch.log_softmax(flat(batch.teacher_logits).double()[:, :vocab_size] / tau, -1)
        sk = min(cfg.student_top_k, vocab_size)
        s_ids = flat(student64)[:, :vocab_size].topk(sk, dim=1).indices
        in_s = torch.zeros_like(p, dtype=torch.bool).scatter_(1, s_ids, True)
        q_s = torch.cat([p.gather(1, s_ids), (p * ~in_s).sum(1, keepdim=True)], 1)
        tp_ = t_logp.exp()
        q_t = torch.cat([tp_.gather(1, s_ids), (tp_ * ~in_s).sum(1, keepdim=True)], 1)
        loss = clipped_sum(kl_terms(q_s, q_t))
    else:
        raise AssertionError(name)
    a1, b1 = flat(batch.topk_logprobs).double(), flat(batch.tail_logmass).double()
    log_z1 = torch.logsumexp(torch.cat([a1, b1[:, None]], 1), 1)
    pt1 = torch.cat([(a1 - log_z1[:, None]).exp(), (b1 - log_z1).exp()[:, None]], 1)
    fkl_metric = kl_terms(pt1, ps).sum(1)
    return loss, fkl_metric


def reference_loss_sum(student64: torch.Tensor, batch: TrainBatch, objectives: dict[int, list[ObjectiveConfig]],
                       vocab_size: int, coefs: dict[int, float] | None = None) -> torch.Tensor:
    mask = batch.loss_mask.reshape(-1)
    tidx = batch.teacher_index.reshape(-1)
    total = student64.new_zeros(())
    for t, terms in objectives.items():
        rows = ((mask > 0) & (tidx == t)).nonzero()[:, 0]
        for cfg in terms:
            loss, _ = reference_token_losses(student64, batch, rows, cfg, vocab_size)
            total = total + (coefs or {}).get(t, 1.0) * cfg.coef * (mask[rows].double() * loss).sum()
    return total


# ----------------------------------------------------------------------------------------------------
# Comparison helpers
# ----------------------------------------------------------------------------------------------------

def ours(student64: torch.Tensor, batch: TrainBatch, objectives: dict[int, list[ObjectiveConfig]], vocab_size: int,
         *, dtype=torch.float32, chunk_tokens: int = 4, coefs=None, names=("math", "code"), device="cpu"):
    logits = student64.to(device=device, dtype=dtype).requires_grad_(True)
    batch = batch.to(device)
    loss_fn = build_loss_fn(objectives, list(names), tp_group=None, vocab_start=0, vocab_size=vocab_size,
                            chunk_tokens=chunk_tokens, teacher_coefs=coefs)
    loss, metrics = loss_fn(logits, batch)
    loss.backward()
    return loss.detach().cpu(), logits.grad.cpu(), {k: v.cpu() for k, v in metrics.items()}


def reference(student64: torch.Tensor, batch: TrainBatch, objectives, vocab_size: int, coefs=None):
    logits = student64.clone().requires_grad_(True)
    loss = reference_loss_sum(logits, batch, objectives, vocab_size, coefs)
    loss.backward()
    return loss.detach(), logits.grad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def assert_matches_reference(student64, batch, objectives, vocab_size, coefs=None, **kw):
    loss, grad, metrics = ours(student64, batch, objectives, vocab_size, coefs=coefs, **kw)
    ref_loss, ref_grad = reference(student64, batch, objectives, vocab_size, coefs)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert rel_err(loss, ref_loss) < REL_TOL, (float(loss), float(ref_loss))
    assert rel_err(grad, ref_grad) < REL_TOL, rel_err(grad, ref_grad)
    assert torch.count_nonzero(grad[..., vocab_size:]) == 0, "padding columns got gradient"
    return loss, grad, metrics


CASES = {
    "forward_kl_topk with tail": ObjectiveConfig(name=N_.forward_kl_topk),
    "forward_kl_topk without tail at temperature 0.7": ObjectiveConfig(name=N_.forward_kl_topk, tail_bucket=False,
                                                                       teacher_temperature=0.7),
    "forward_kl_topk with entry and token clips": ObjectiveConfig(name=N_.forward_kl_topk, entry_clip=1.5,
                                                                  token_clip=3.0),
    "reverse_kl_sampled": ObjectiveConfig(name=N_.reverse_kl_sampled),
    "reverse_kl_sampled with truncated importance ratio": ObjectiveConfig(
        name=N_.reverse_kl_sampled, importance_ratio=True, ratio_cap=1.2, token_clip=1.5, teacher_temperature=1.5),
    "reverse_kl_student_topk": ObjectiveConfig(name=N_.reverse_kl_student_topk, student_top_k=4,
                                               teacher_temperature=0.8),
    "reverse_kl_student_topk without tail, clipped": ObjectiveConfig(
        name=N_.reverse_kl_student_topk, student_top_k=6, tail_bucket=False, entry_clip=0.1),
    "jsd": ObjectiveConfig(name=N_.jsd, beta=0.3, teacher_temperature=1.2),
    "jsd with entry clip": ObjectiveConfig(name=N_.jsd, beta=0.7, entry_clip=0.02),
    "skew_kl": ObjectiveConfig(name=N_.skew_kl, beta=0.1),
    "aopd": ObjectiveConfig(name=N_.aopd, importance_ratio=True, ratio_cap=1.5),
    "rlsd": ObjectiveConfig(name=N_.rlsd, credit_clip=0.3),
    "cross_entropy": ObjectiveConfig(name=N_.cross_entropy),
    "uld without cross-tokenizer chunks": ObjectiveConfig(name=N_.uld),
}


@pytest.mark.parametrize("case", list(CASES))
def test_objective_equals_float64_full_vocabulary_reference_in_value_and_gradient(case):
    student, batch = make_case(seed=len(case))
    assert_matches_reference(student, batch, {0: [CASES[case]]}, vocab_size=21)


def test_every_registered_objective_has_a_reference_case():
    assert {N_(c.name) for c in CASES.values()} == set(ObjectiveName)


def test_bf16_teacher_logprobs_match_the_reference_on_the_same_rounded_values():
    student, batch = make_case(seed=3, lp_dtype=torch.bfloat16)
    for cfg in (CASES["forward_kl_topk with tail"], CASES["jsd"], CASES["aopd"]):
        assert_matches_reference(student, batch, {0: [cfg]}, vocab_size=21)


def test_two_teachers_with_several_terms_and_coefficients_sum_per_token():
    student, batch = make_case(seed=5, teachers=2)
    objectives = {0: [ObjectiveConfig(name=N_.forward_kl_topk, coef=0.5), ObjectiveConfig(name=N_.rlsd)],
                  1: [ObjectiveConfig(name=N_.reverse_kl_sampled, coef=2.0)]}
    _, _, metrics = assert_matches_reference(student, batch, objectives, vocab_size=21, coefs={0: 1.0, 1: 0.25})
    valid = batch.loss_mask > 0
    assert float(metrics["teacher/math/tokens"]) == float((valid & (batch.teacher_index == 0)).sum())
    assert float(metrics["teacher/code/tokens"]) == float((valid & (batch.teacher_index == 1)).sum())


def test_metrics_equal_reference_forward_kl_reverse_kl_estimate_and_coverage():
    student, batch = make_case(seed=6)
    cfg = ObjectiveConfig(name=N_.forward_kl_topk, entry_clip=0.03)
    _, _, sums = ours(student, batch, {0: [cfg]}, 21)
    rows = (batch.loss_mask.reshape(-1) > 0).nonzero()[:, 0]
    loss, fkl = reference_token_losses(student, batch, rows, ObjectiveConfig(), 21)
    logp = torch.log_softmax(student.reshape(-1, 24)[rows, :21], -1)
    y = batch.targets.reshape(-1)[rows]
    rkl = logp.gather(1, y[:, None])[:, 0] - batch.sampled_logprob.reshape(-1)[rows].double()
    coverage = logp.exp().gather(1, batch.topk_ids.reshape(-1, 5)[rows].long()).sum(1)
    m = mean_metrics(sums)
    assert m["teacher/math/tokens"] == len(rows)
    assert math.isclose(m["teacher/math/forward_kl"], float(fkl.mean()), rel_tol=1e-5)
    assert math.isclose(m["teacher/math/reverse_kl_est"], float(rkl.mean()), rel_tol=1e-4)
    assert math.isclose(m["teacher/math/topk_coverage"], float(coverage.mean()), rel_tol=1e-5)
    assert 0 < m["teacher/math/clipped_fraction"] <= 1
    assert m["teacher/math/loss/forward_kl_topk"] < float(loss.mean())  # the entry clip lowered it


def test_top_k_covering_the_whole_vocabulary_gives_the_exact_full_kl():
    student, batch = make_case(seed=7, k=21)
    batch = _with(batch, tail_logmass=torch.full_like(batch.tail_logmass, float("-inf")))
    loss, grad, _ = assert_matches_reference(student, batch, {0: [ObjectiveConfig()]}, vocab_size=21)
    valid = batch.loss_mask > 0
    t_lp = batch.topk_logprobs.double()[valid]
    t_full = torch.full((int(valid.sum()), 21), float("-inf"), dtype=torch.float64)
    t_full.scatter_(1, batch.topk_ids[valid].long(), t_lp)
    s_lp = torch.log_softmax(student[valid][:, :21], -1)
    exact = F.kl_div(s_lp, t_full - torch.logsumexp(t_full, 1, keepdim=True), log_target=True, reduction="sum")
    assert rel_err(loss, exact) < REL_TOL


def _with(batch: TrainBatch, **fields) -> TrainBatch:
    return TrainBatch(**{f: fields.get(f, getattr(batch, f)) for f in batch.__dataclass_fields__})


def test_teacher_mass_fully_inside_top_k_gives_finite_loss_and_gradient():
    student, batch = make_case(seed=8)
    # Renormalise the teacher onto its top-K: tail mass exactly 0 (logmass -inf).
    lp = batch.topk_logprobs.double()
    lp = lp - torch.logsumexp(torch.nan_to_num(lp, nan=0.0), -1, keepdim=True)
    batch = _with(batch, topk_logprobs=lp.float(), tail_logmass=torch.full_like(batch.tail_logmass, float("-inf")))
    for cfg in (ObjectiveConfig(), ObjectiveConfig(name=N_.jsd), ObjectiveConfig(name=N_.skew_kl, beta=0.2),
                ObjectiveConfig(name=N_.aopd), ObjectiveConfig(teacher_temperature=0.5)):
        assert_matches_reference(student, batch, {0: [cfg]}, vocab_size=21)


def test_student_probability_near_zero_on_a_teacher_top_k_token():
    student, batch = make_case(seed=9)
    ids = batch.topk_ids.long().clamp(max=20)
    student = student.scatter(-1, ids[..., :1], -40.0)  # p_s ~ 1e-18 on the teacher's top-1 token
    for cfg in (ObjectiveConfig(), ObjectiveConfig(name=N_.jsd), ObjectiveConfig(name=N_.skew_kl, beta=0.1)):
        loss, _, _ = assert_matches_reference(student, batch, {0: [cfg]}, vocab_size=21)
        assert loss > 0


def test_all_masked_rows_get_zero_gradient_and_an_all_masked_batch_gives_zero_loss():
    student, batch = make_case(seed=10)
    mask = batch.loss_mask.clone()
    mask[0] = 0
    batch = _with(batch, loss_mask=mask, teacher_index=torch.where(mask > 0, batch.teacher_index, -1))
    _, grad, _ = assert_matches_reference(student, batch, {0: [ObjectiveConfig()]}, vocab_size=21)
    assert torch.count_nonzero(grad[0]) == 0
    empty = _with(batch, loss_mask=torch.zeros_like(mask))
    loss, grad, metrics = ours(student, empty, {0: [ObjectiveConfig(), ObjectiveConfig(name=N_.rlsd)]}, 21)
    assert float(loss) == 0.0 and torch.count_nonzero(grad) == 0
    assert float(metrics["teacher/math/tokens"]) == 0 and all(torch.isfinite(v) for v in metrics.values())


def test_bf16_student_logits_upcast_per_chunk_match_the_reference_on_the_rounded_logits():
    student, batch = make_case(seed=11)
    student = student.to(torch.bfloat16).double()
    loss, grad, _ = ours(student, batch, {0: [ObjectiveConfig()]}, 21, dtype=torch.bfloat16)
    ref_loss, ref_grad = reference(student, batch, {0: [ObjectiveConfig()]}, 21)
    assert grad.dtype == torch.bfloat16
    assert rel_err(loss, ref_loss) < REL_TOL
    assert rel_err(grad, ref_grad) < 1e-2  # the gradient itself is rounded to bf16


def test_chunk_size_does_not_change_the_result():
    student, batch = make_case(seed=12)
    objectives = {0: [ObjectiveConfig(), ObjectiveConfig(name=N_.reverse_kl_student_topk, student_top_k=3)]}
    a = ours(student, batch, objectives, 21, chunk_tokens=1)
    b = ours(student, batch, objectives, 21, chunk_tokens=1000)
    assert torch.allclose(a[0], b[0], rtol=1e-6) and torch.allclose(a[1], b[1], rtol=1e-6, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_objectives_on_cuda_match_the_float64_reference():
    student, batch = make_case(seed=13)
    for cfg in (CASES["forward_kl_topk with tail"], CASES["reverse_kl_student_topk"], CASES["jsd"], CASES["rlsd"]):
        loss, grad, _ = ours(student, batch, {0: [cfg]}, 21, device="cuda")
        ref_loss, ref_grad = reference(student, batch, {0: [cfg]}, 21)
        assert rel_err(loss, ref_loss) < REL_TOL and rel_err(grad, ref_grad) < REL_TOL, cfg.name
