"""The optimizer settings the recipes rely on, against closed-form references, through ``train_step``.

- the learning rate of every step (``StepResult.lr``, logged as ``train/lr``) under constant, linear
  and cosine decay with warmup and ``min_lr``, against the formulas written out here;
- weight decay: one step against a float64 AdamW step computed from the weights and gradients
  (decoupled decay on matrices, none on 1-D parameters, as Megatron groups them);
- fp16: the dynamic loss scale backs off until a step applies, and that step's gradient norm is the
  fp32 gradient norm of the same weights and batch.

One single-rank spawn runs all of them (tiny model from tests/test_student_parity.py).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from dist_utils import run_on_ranks
from test_student_parity import cross_entropy_loss, global_batch, shard, student_config

from mopd.config import Dtype, LrSchedule, OptimizerConfig, PrecisionConfig, TrainConfig

LR, MIN_LR, STEPS = 1e-3, 1e-4, 10
SCHEDULES = {
    "constant_warmup": dict(lr_schedule=LrSchedule.constant, warmup_steps=2),
    "linear": dict(lr_schedule=LrSchedule.linear, warmup_steps=3, min_lr=MIN_LR),
    "cosine": dict(lr_schedule=LrSchedule.cosine, warmup_steps=3, min_lr=MIN_LR),
    "cosine_no_warmup": dict(lr_schedule=LrSchedule.cosine, warmup_steps=0, min_lr=MIN_LR),
}
FP16_STEPS = 24


def expected_lr(step: int, schedule: LrSchedule, warmup: int, min_lr: float = 0.0, lr: float = LR,
                steps: int = STEPS) -> float:
    """The lr of 0-based optimizer step ``step``: linear warmup from 0 over ``warmup`` steps, then
    decay from ``lr`` to ``min_lr`` over the rest of the ``steps`` (constant: stays at ``lr``)."""
    if warmup and step <= warmup:
        return lr * step / warmup
    if schedule == LrSchedule.constant:
        return lr
    ratio = min((step - warmup) / (steps - warmup), 1.0)
    coeff = 1.0 - ratio if schedule == LrSchedule.linear else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return min_lr + coeff * (lr - min_lr)


def _config(**optimizer):
    base = student_config()
    opt = {"lr": LR, "clip_grad": 1.0, "use_distributed_optimizer": True, **optimizer}
    return replace(base, optimizer=OptimizerConfig(**opt), train=TrainConfig(steps=STEPS, micro_batch_size=2))


def _fresh(cfg, layout, weights):
    from mopd.student import build_model, build_optimizer, load_model_weights

    chunks = build_model(cfg, layout)
    load_model_weights(weights, chunks)
    optimizer, scheduler = build_optimizer(cfg, chunks)
    return chunks, optimizer, scheduler


def _step(chunks, optimizer, scheduler, layout, step: int):
    from mopd.student import train_step

    return train_step(chunks, optimizer, scheduler, shard(global_batch(step), 1, 0), cross_entropy_loss, layout,
                      step=step)


def _params(chunks) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in chunks[0].named_parameters()}


def _worker(rank: int, world: int, weights: str) -> dict:
    from mopd.parallel import init_parallel
    from mopd.student import build_model, save_model_weights

    layout = init_parallel(student_config().parallel, seed=7)
    save_model_weights(weights, build_model(student_config(), layout))
    out: dict = {"lrs": {}}
    for name, opts in SCHEDULES.items():
        chunks, optimizer, scheduler = _fresh(_config(**opts), layout, weights)
        out["lrs"][name] = [_step(chunks, optimizer, scheduler, layout, s).lr for s in range(STEPS)]
        # Past the decay horizon the schedule holds min_lr.
        for _ in range(3):
            scheduler.step(1)
        out["lrs"][name].append(float(optimizer.param_groups[0]["lr"]))

    # Weight decay: the weights before, the gradient the step used (main_grad; no clipping), after.
    wd_cfg = _config(lr=1e-2, weight_decay=0.1, clip_grad=0.0)
    chunks, optimizer, scheduler = _fresh(wd_cfg, layout, weights)
    before = _params(chunks)
    result = _step(chunks, optimizer, scheduler, layout, 0)
    grads = {n: p.main_grad.detach().double().clone() for n, p in chunks[0].named_parameters()}
    out["wd"] = {"before": before, "grads": grads, "after": _params(chunks), "lr": result.lr}

    # fp16 from the default scale 2**32: overflowing steps are skipped until the scale fits.
    fp16_cfg = replace(_config(), precision=PrecisionConfig(dtype=Dtype.fp16),
                       train=TrainConfig(steps=FP16_STEPS, micro_batch_size=2))
    chunks, optimizer, scheduler = _fresh(fp16_cfg, layout, weights)
    initial = _params(chunks)
    history = []
    for s in range(FP16_STEPS):
        r = _step(chunks, optimizer, scheduler, layout, s)
        history.append((r.loss, r.grad_norm, float(optimizer.get_loss_scale())))
        if math.isfinite(r.grad_norm):
            break
    applied = len(history) - 1
    changed = max(float((p - initial[n]).abs().max()) for n, p in _params(chunks).items())
    # fp32 on the same (initial) weights and the applied step's batch.
    chunks, optimizer, scheduler = _fresh(_config(lr=0.0), layout, weights)
    reference = _step(chunks, optimizer, scheduler, layout, applied)
    out["fp16"] = {"history": history, "changed": changed, "fp32_grad_norm": reference.grad_norm,
                   "fp32_loss": reference.loss}
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    weights = str(tmp_path_factory.mktemp("optimizer") / "init")
    return run_on_ranks(_worker, 1, weights, timeout=300)[0]


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_step_lr_follows_the_closed_form_schedule(result, name):
    opts = SCHEDULES[name]
    want = [expected_lr(s, opts["lr_schedule"], opts["warmup_steps"], opts.get("min_lr", 0.0))
            for s in range(STEPS + 3)]
    got = result["lrs"][name]
    assert len(got) == STEPS + 1
    for step, value in enumerate(got[:STEPS]):
        assert value == pytest.approx(want[step], rel=1e-9, abs=1e-15), (name, step, value, want[step])
    assert got[-1] == pytest.approx(opts.get("min_lr", LR) if opts["lr_schedule"] != LrSchedule.constant else LR,
                                    rel=1e-9)


def test_the_schedules_differ_where_their_formulas_do(result):
    lrs = result["lrs"]
    assert lrs["linear"][5] != pytest.approx(lrs["cosine"][5], rel=1e-3)
    assert lrs["constant_warmup"][0] == 0.0 and lrs["cosine_no_warmup"][0] == LR


def test_weight_decay_step_equals_a_float64_adamw_step(result):
    wd = result["wd"]
    lr, decay, eps = wd["lr"], 0.1, 1e-8
    assert lr == pytest.approx(1e-2)
    decayed = 0
    for name, p0 in wd["before"].items():
        g = wd["grads"][name]
        # Adam's first step with bias correction: m_hat = g, v_hat = g**2.
        factor = 0.0 if p0.dim() == 1 or name.endswith(".bias") else decay
        want = p0 * (1.0 - lr * factor) - lr * g / (g.abs() + eps)
        assert torch.allclose(wd["after"][name], want, rtol=1e-5, atol=1e-7), name
        decayed += factor > 0
        if factor > 0:
            # The decay is visible at this tolerance: without it the weights would differ by lr*wd*p.
            assert not torch.allclose(wd["after"][name], p0 - lr * g / (g.abs() + eps), rtol=1e-5, atol=1e-7), name
    assert decayed >= 4


def test_fp16_backs_off_its_loss_scale_until_a_step_applies_with_the_fp32_gradient(result):
    fp16 = result["fp16"]
    history = fp16["history"]
    loss, grad_norm, scale = history[-1]
    assert math.isfinite(grad_norm), f"no fp16 step applied in {FP16_STEPS} steps: {history}"
    assert len(history) > 1 and not math.isfinite(history[0][1])  # 2**32 overflows at first
    assert scale < 2.0**32
    assert all(b[2] <= a[2] for a, b in zip(history, history[1:]))  # the scale only backs off
    assert fp16["changed"] > 0.0  # the applied step moved the weights
    assert abs(grad_norm - fp16["fp32_grad_norm"]) / fp16["fp32_grad_norm"] < 2e-2
    assert abs(loss - fp16["fp32_loss"]) / fp16["fp32_loss"] < 1e-3
