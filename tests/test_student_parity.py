"""The Megatron student trains identically at every parallel layout.

A one-rank run (TP=1, PP=1, DP=1) is the reference: it saves its initial weights, checks its first
loss against a float64 full-vocabulary formula, and trains 3 steps. One 4-rank spawn then loads the
same weights at TP=2, PP=2, TP=2xPP=2 and TP=1xPP=1 (DP=4) and trains 3 steps on the same global
batch split over its data-parallel ranks (fewer micro-batches per rank as DP grows, unequal token
counts everywhere). Last, it feeds a NaN loss and a NaN gradient and checks the step refuses both
before the weights change.
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import run_on_ranks

from mopd.config import ModelConfig, OptimizerConfig, ParallelConfig, StudentConfig, TrainConfig
from mopd.config.model import FastPathConfig
from mopd.types import TrainBatch

VOCAB, SEQS, STEPS = 128, 8, 3
LAYOUTS = ((2, 1), (1, 2), (2, 2), (1, 1))
REL_TOL = 1e-5


def student_config(tp: int = 1, pp: int = 1, tied: bool = False) -> StudentConfig:
    return StudentConfig(
        model=ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=64, vocab_size=VOCAB, make_vocab_size_divisible_by=64,
                          max_position_embeddings=64, tie_word_embeddings=tied),
        parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp),
        optimizer=OptimizerConfig(lr=3e-3, clip_grad=1.0, use_distributed_optimizer=True),
        train=TrainConfig(steps=10, micro_batch_size=2),
    )


def make_sequence(seed: int, length: int, prompt: int, teacher: int) -> TrainBatch:
    """One row: random tokens, the response starts after ``prompt`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (length + 1,), generator=gen)
    mask = torch.zeros(length)
    mask[prompt - 1:] = 1.0
    zeros = torch.zeros(1, length)
    return TrainBatch(
        tokens=ids[:-1][None], position_ids=torch.arange(length)[None], targets=ids[1:][None],
        loss_mask=mask[None], topk_ids=torch.zeros(1, length, 1, dtype=torch.int32),
        topk_logprobs=torch.zeros(1, length, 1), sampled_logprob=zeros, tail_logmass=zeros,
        behaviour_logprobs=zeros, teacher_index=torch.full((1, length), teacher), reward=torch.zeros(1),
    )


def global_batch(step: int, teacher_blocks: bool = False) -> list[TrainBatch]:
    """SEQS rows of different lengths (6..13) and prompt lengths, so token counts are unequal.

    Rows alternate teachers 0 and 1, or with ``teacher_blocks`` the first half is teacher 0."""
    def teacher(i: int) -> int:
        return i // (SEQS // 2) if teacher_blocks else i % 2

    return [make_sequence(1000 * step + i, 6 + (3 * i + step) % 8, 2 + i % 3, teacher(i)) for i in range(SEQS)]


def stack(rows: list[TrainBatch]) -> TrainBatch:
    from mopd.student.train_step import pad_batch

    length = max(r.tokens.shape[1] for r in rows)
    padded = [pad_batch(r, 1, length) for r in rows]
    return TrainBatch(**{f: torch.cat([getattr(p, f) for p in padded]) if getattr(padded[0], f) is not None
                         else None for f in TrainBatch.__dataclass_fields__})


def shard(rows: list[TrainBatch], dp: int, dp_rank: int, micro_batch_size: int = 2) -> list[TrainBatch]:
    """Contiguous blocks of rows per data-parallel rank, cut into micro-batches."""
    per_rank = len(rows) // dp
    mine = rows[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return [stack(mine[i:i + micro_batch_size]) for i in range(0, len(mine), micro_batch_size)]


def cross_entropy_loss(logits: torch.Tensor, batch: TrainBatch):
    """Masked sum of Megatron's vocab-parallel cross entropy: logits [B, S, V_local]."""
    from megatron.core import tensor_parallel

    ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch.targets)
    loss_sum = (ce * batch.loss_mask).sum()
    return loss_sum, {"ce_sum": loss_sum.detach(), "tokens": batch.loss_mask.sum()}


def float64_reference_loss(chunk: torch.nn.Module, rows: list[TrainBatch]) -> float:
    """Mean masked cross entropy over the whole batch, from full logits in float64 (TP=1 model)."""
    total, count = 0.0, 0.0
    with torch.no_grad():
        for row in rows:
            logits = chunk(row.tokens, row.position_ids, None).double()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, row.targets[..., None])[..., 0]
            total += float(-(logp * row.loss_mask).sum())
            count += float(row.loss_mask.sum())
    return total / count


def _train(cfg: StudentConfig, layout, weights: str, steps: int = STEPS):
    from mopd.student import build_model, build_optimizer, load_model_weights, train_step

    chunks = build_model(cfg, layout)
    load_model_weights(weights, chunks)
    optimizer, scheduler = build_optimizer(cfg, chunks)
    history = []
    for step in range(steps):
        batches = shard(global_batch(step), layout.dp, layout.dp_rank)
        r = train_step(chunks, optimizer, scheduler, batches, cross_entropy_loss, layout, step=step)
        history.append((r.loss, r.grad_norm, r.num_tokens, r.metrics["tokens"], r.lr))
    return chunks, optimizer, scheduler, history


def _reference_worker(rank: int, world: int, weights: str) -> dict:
    from mopd.parallel import init_parallel
    from mopd.student import build_model, load_model_weights, save_model_weights

    cfg = student_config()
    layout = init_parallel(cfg.parallel, seed=7)
    save_model_weights(weights, build_model(cfg, layout))
    _, _, _, history = _train(cfg, layout, weights)
    fresh = build_model(cfg, layout, wrap_ddp=False)
    load_model_weights(weights, fresh)
    tied = student_config(tied=True)
    save_model_weights(weights + "_tied", build_model(tied, layout))
    return {"history": history, "float64_loss": float64_reference_loss(fresh[0], global_batch(0)),
            "tied": _train(tied, layout, weights + "_tied")[3], "recompute": _recompute_runs(cfg, layout, weights),
            **_mixed_precision_runs(weights)}


def _recompute_runs(cfg: StudentConfig, layout, weights: str) -> dict:
    """The same 3 steps with Megatron's selective (MLP) and full activation recomputation."""
    from dataclasses import replace

    from mopd.config.model import Recompute

    return {r.value: _train(replace(cfg, train=replace(cfg.train, recompute=r)), layout, weights)[3]
            for r in (Recompute.selective, Recompute.full)}


def _mixed_precision_runs(weights: str) -> dict:
    """The same 3 steps under bf16 (Float16Module, fp32 main weights) and fp16 (dynamic loss scale)."""
    from dataclasses import replace

    from mopd.config import Dtype, PrecisionConfig
    from mopd.parallel import init_parallel

    out = {}
    for dtype in (Dtype.bf16, Dtype.fp16):
        cfg = replace(student_config(), precision=PrecisionConfig(dtype=dtype))
        layout = init_parallel(cfg.parallel, seed=7)
        chunks, optimizer, _, history = _train(cfg, layout, weights)
        out[dtype.value] = {"history": history, "loss_scale": float(optimizer.get_loss_scale()),
                            "dtype": next(chunks[0].parameters()).dtype}
    return out


class NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _nan_loss_at_teacher_one(logits, batch):
    loss_sum, metrics = cross_entropy_loss(logits, batch)
    if bool((batch.teacher_index[batch.loss_mask > 0] == 1).any()):
        loss_sum = loss_sum * float("nan")
    return loss_sum, metrics


def _nan_grad(logits, batch):
    return cross_entropy_loss(NanGrad.apply(logits), batch)


def _refusal(chunks, optimizer, scheduler, layout, loss_fn) -> dict:
    from mopd.errors import NonFiniteLossError
    from mopd.student import train_step

    before = [p.detach().clone() for p in chunks[0].parameters()]
    try:
        train_step(chunks, optimizer, scheduler, shard(global_batch(5, True), layout.dp, layout.dp_rank), loss_fn,
                   layout, step=41, teacher_names=("math", "code"))
        message = None
    except NonFiniteLossError as e:
        message = str(e)
    unchanged = all(torch.equal(a, b.detach()) for a, b in zip(before, chunks[0].parameters()))
    return {"message": message, "unchanged": unchanged}


def _groups(layout) -> dict:
    import torch.distributed as dist

    return {"coords": (layout.tp_rank, layout.pp_rank, layout.dp_rank), "stages": layout.ranks_per_stage,
            "edges": (layout.is_first_stage, layout.is_last_stage),
            **{name: dist.get_process_group_ranks(getattr(layout, f"{name}_group")) for name in ("tp", "pp", "dp")}}


def _broadcast_check(layout) -> bool:
    from mopd.student import broadcast_micro_batches

    want = shard(global_batch(3), layout.dp, layout.dp_rank)
    got = broadcast_micro_batches(want if layout.tp_rank == 0 and layout.pp_rank == 0 else None, layout)
    return len(got) == len(want) and all(torch.equal(g.tokens, w.tokens) and torch.equal(g.loss_mask, w.loss_mask)
                                         for g, w in zip(got, want))


def _timeout_minutes(group) -> float:
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds() / 60


def _placement(layout) -> dict:
    """Where this rank runs and the groups' timeouts (the layout's control group is gloo)."""
    import os

    import torch.distributed as dist

    return {"env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "MOPD_FORCE_CPU")},
            "cuda_visible": torch.cuda.is_available(), "device": layout.device.type,
            "control_ranks": dist.get_process_group_ranks(layout.control_group),
            "control_backend": dist.get_backend(layout.control_group),
            "timeouts": [_timeout_minutes(g) for g in (layout.control_group, layout.tp_group, layout.dp_group)]}


def _layouts_worker(rank: int, world: int, weights: str) -> dict:
    from dataclasses import replace

    from mopd.parallel import destroy_parallel, init_parallel

    out = {}
    for tp, pp in LAYOUTS:
        cfg = student_config(tp, pp)
        if (tp, pp) == (2, 2):
            cfg = replace(cfg, parallel=replace(cfg.parallel, distributed_timeout_minutes=37.0))
        layout = init_parallel(cfg.parallel, seed=7)
        out[("groups", tp, pp)] = _groups(layout)
        if (tp, pp) == (2, 2):
            out["placement"] = _placement(layout)
        chunks, optimizer, scheduler, history = _train(cfg, layout, weights)
        out[(tp, pp)] = history
        if (tp, pp) == (1, 2):  # DP=2, two micro-batches per rank: buckets reduced during backward
            overlap = replace(cfg, fast_paths=FastPathConfig(overlap_grad_reduce=True))
            out["overlap_grad_reduce"] = _train(overlap, layout, weights)[3]
        if (tp, pp) == (2, 2):
            out["broadcast"] = _broadcast_check(layout)
            out["nan_loss"] = _refusal(chunks, optimizer, scheduler, layout, _nan_loss_at_teacher_one)
            out["nan_grad"] = _refusal(chunks, optimizer, scheduler, layout, _nan_grad)
        destroy_parallel()
    # Tied embeddings across stages: the output layer on stage 1 shares the stage-0 embedding.
    cfg = student_config(1, 2, tied=True)
    layout = init_parallel(cfg.parallel, seed=7)
    out["tied"] = _train(cfg, layout, weights + "_tied")[3]
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    weights = str(tmp_path_factory.mktemp("parity") / "init")
    reference = run_on_ranks(_reference_worker, 1, weights, timeout=240)[0]
    layouts = run_on_ranks(_layouts_worker, 4, weights, timeout=420)
    return reference, layouts


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_first_loss_equals_the_float64_masked_cross_entropy_of_the_whole_batch(runs):
    reference, _ = runs
    loss0 = reference["history"][0][0]
    assert _rel(loss0, reference["float64_loss"]) < REL_TOL, (loss0, reference["float64_loss"])
    tokens = sum(float(r.loss_mask.sum()) for r in global_batch(0))
    assert reference["history"][0][2] == tokens
    assert reference["history"][0][3] == tokens


def test_selective_and_full_recompute_repeat_the_losses_and_grad_norms_of_keeping_activations(runs):
    reference, _ = runs
    for mode, history in reference["recompute"].items():
        for step, (got, want) in enumerate(zip(history, reference["history"])):
            assert _rel(got[0], want[0]) < REL_TOL and _rel(got[1], want[1]) < REL_TOL, (mode, step, got, want)


def test_bf16_follows_the_fp32_losses_and_fp16_skips_overflowing_steps_halving_its_scale(runs):
    reference, _ = runs
    bf16, fp16 = reference["bf16"], reference["fp16"]
    assert bf16["dtype"] == torch.bfloat16 and fp16["dtype"] == torch.float16
    for got, want in zip(bf16["history"], reference["history"]):
        assert _rel(got[0], want[0]) < 1e-3 and _rel(got[1], want[1]) < 2e-2, (got, want)
    # Megatron starts at scale 2**32 with hysteresis 2: three overflowing steps halve it twice, once
    # per step after the first (a second scaler update per step would halve it more often).
    assert fp16["loss_scale"] == 2.0**30
    assert all(math.isnan(h[1]) or math.isinf(h[1]) for h in fp16["history"])
    assert _rel(fp16["history"][0][0], reference["history"][0][0]) < 1e-3


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}xpp{p}" for t, p in LAYOUTS])
def test_every_layout_matches_one_rank_loss_and_grad_norm_for_three_steps(runs, tp, pp):
    reference, layouts = runs
    for rank, out in enumerate(layouts):
        for step, (got, want) in enumerate(zip(out[(tp, pp)], reference["history"])):
            where = f"tp{tp}xpp{pp} rank {rank} step {step}"
            assert _rel(got[0], want[0]) < REL_TOL, (where, "loss", got[0], want[0])
            assert _rel(got[1], want[1]) < REL_TOL, (where, "grad norm", got[1], want[1])
            assert got[2] == want[2] and got[3] == want[3] and got[4] == want[4], where


def test_gradient_reduction_overlapped_with_backward_matches_one_rank(runs):
    reference, layouts = runs
    for rank, out in enumerate(layouts):
        for step, (got, want) in enumerate(zip(out["overlap_grad_reduce"], reference["history"])):
            assert _rel(got[0], want[0]) < REL_TOL and _rel(got[1], want[1]) < REL_TOL, (rank, step, got, want)


def test_tied_embeddings_split_over_two_pipeline_stages_match_one_rank(runs):
    reference, layouts = runs
    for rank, out in enumerate(layouts):
        for step, (got, want) in enumerate(zip(out["tied"], reference["tied"])):
            assert _rel(got[0], want[0]) < REL_TOL and _rel(got[1], want[1]) < REL_TOL, (rank, step, got, want)
    assert reference["tied"][0][0] != reference["history"][0][0], "tied and untied models differ"


def test_four_data_parallel_ranks_equal_four_micro_batches_with_unequal_token_counts(runs):
    """DP=4 with one micro-batch each vs DP=1 with four: the mean is over the global valid tokens."""
    reference, layouts = runs
    counts = [float(shard(global_batch(0), 4, r)[0].loss_mask.sum()) for r in range(4)]
    assert max(counts) / min(counts) > 1.2, f"the check needs unequal token counts, got {counts}"
    for step in range(STEPS):
        dp4, dp1 = layouts[0][(1, 1)][step], reference["history"][step]
        assert _rel(dp4[0], dp1[0]) < REL_TOL and _rel(dp4[1], dp1[1]) < REL_TOL, (step, dp4, dp1)


def test_micro_batches_broadcast_from_the_first_rank_reach_every_tp_and_pp_rank(runs):
    _, layouts = runs
    assert all(out["broadcast"] for out in layouts)


def test_a_nan_loss_raises_naming_the_step_and_teacher_before_the_weights_change(runs):
    _, layouts = runs
    for rank, out in enumerate(layouts):
        result = out["nan_loss"]
        assert result["message"] is not None, f"rank {rank} did not raise"
        assert "step 41" in result["message"] and "code" in result["message"], result["message"]
        assert "math" not in result["message"], result["message"]
        assert result["unchanged"], f"rank {rank}: weights changed"


def test_a_nan_gradient_with_a_finite_loss_raises_before_the_weights_change(runs):
    _, layouts = runs
    for rank, out in enumerate(layouts):
        result = out["nan_grad"]
        assert result["message"] is not None and "gradient norm" in result["message"], result
        assert "step 41" in result["message"]
        assert result["unchanged"], f"rank {rank}: weights changed"
    assert not math.isnan(layouts[0][(1, 1)][0][0])


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}xpp{p}" for t, p in LAYOUTS])
def test_megatron_process_groups_agree_with_the_pure_layout_plan(runs, tp, pp):
    from mopd.parallel import plan_layout

    _, layouts = runs
    plan = plan_layout(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp), 4)
    coords = {r: plan.coordinates(r) for r in range(4)}
    for rank, out in enumerate(layouts):
        g = out[("groups", tp, pp)]
        t, p, d = coords[rank]
        assert g["coords"] == (t, p, d) and g["stages"] == plan.ranks_per_stage
        assert g["edges"] == (p == 0, p == pp - 1)
        assert g["tp"] == [r for r in range(4) if coords[r][1:] == (p, d)]
        assert g["pp"] == [r for r in range(4) if (coords[r][0], coords[r][2]) == (t, d)]
        assert g["dp"] == [r for r in range(4) if coords[r][:2] == (t, p)]


def test_gloo_ranks_run_on_the_cpu_with_cuda_hidden_and_groups_take_the_configured_timeout(runs):
    _, layouts = runs
    for rank, out in enumerate(layouts):
        placed = out["placement"]
        assert placed["env"] == {"CUDA_VISIBLE_DEVICES": "", "MOPD_FORCE_CPU": "1"}, rank
        assert not placed["cuda_visible"] and placed["device"] == "cpu", rank
        assert placed["control_ranks"] == [0, 1, 2, 3] and placed["control_backend"] == "gloo"
        assert placed["timeouts"] == [37.0, 37.0, 37.0], placed["timeouts"]


def _cpu_layout(tp: int = 1, pp: int = 1):
    from mopd.parallel import ParallelLayout

    stages = tuple(tuple(range(s * tp, (s + 1) * tp)) for s in range(pp))
    return ParallelLayout(tp=tp, pp=pp, dp=1, world_size=tp * pp, rank=0, tp_rank=0, pp_rank=0, dp_rank=0,
                          is_first_stage=True, is_last_stage=pp == 1, ranks_per_stage=stages,
                          device=torch.device("cpu"), tp_group=None, pp_group=None, dp_group=None,
                          mp_group=None, pgs=None)


def test_vocabulary_pads_to_the_same_size_at_every_tp_that_divides_the_divisor():
    from mopd.student import padded_vocab_size

    assert padded_vocab_size(ModelConfig(vocab_size=151936, make_vocab_size_divisible_by=128), 8) == 151936
    assert padded_vocab_size(ModelConfig(vocab_size=151937, make_vocab_size_divisible_by=128), 8) == 152064
    assert padded_vocab_size(ModelConfig(vocab_size=100, make_vocab_size_divisible_by=64), 3) == 192
    assert padded_vocab_size(ModelConfig(vocab_size=128, make_vocab_size_divisible_by=64), 2) == 128
    assert padded_vocab_size(ModelConfig(vocab_size=129, make_vocab_size_divisible_by=64), 1) == 192


def test_transformer_config_carries_the_qwen_fields():
    from dataclasses import replace

    from mopd.config import Dtype, Family, PrecisionConfig
    from mopd.student import transformer_config

    model = ModelConfig(family=Family.qwen3, num_layers=4, hidden_size=64, num_attention_heads=8,
                        num_query_groups=2, head_dim=16, qk_layernorm=True, add_qkv_bias=True,
                        rms_norm_eps=1e-5, ffn_hidden_size=96)
    cfg = replace(student_config(2, 2), model=model, precision=PrecisionConfig(dtype=Dtype.bf16))
    tc = transformer_config(cfg, _cpu_layout(2, 2))
    assert (tc.num_query_groups, tc.kv_channels, tc.qk_layernorm, tc.add_qkv_bias) == (2, 16, True, True)
    assert (tc.normalization, tc.layernorm_epsilon, tc.gated_linear_unit, tc.add_bias_linear) == ("RMSNorm", 1e-5, True, False)
    assert tc.activation_func is torch.nn.functional.silu
    assert (tc.tensor_model_parallel_size, tc.pipeline_model_parallel_size) == (2, 2)
    assert tc.bf16 and tc.params_dtype == torch.bfloat16 and tc.pipeline_dtype == torch.bfloat16
    assert tc.hidden_dropout == 0.0 and tc.attention_dropout == 0.0 and tc.fp8 is None


def test_an_fp8_recipe_without_transformer_engine_names_the_config_key():
    from dataclasses import replace

    from mopd.config import Dtype, Fp8Recipe, PrecisionConfig
    from mopd.errors import ConfigError
    from mopd.student import transformer_config
    from mopd.student.model import have_transformer_engine

    if have_transformer_engine():
        pytest.skip("Transformer Engine is importable here")
    cfg = replace(student_config(), precision=PrecisionConfig(dtype=Dtype.bf16, fp8=Fp8Recipe.blockwise))
    with pytest.raises(ConfigError, match=r"student\.precision\.fp8=blockwise"):
        transformer_config(cfg, _cpu_layout())


def test_sequence_parallel_without_transformer_engine_names_the_config_key():
    from dataclasses import replace

    from mopd.errors import ConfigError
    from mopd.student import transformer_config

    cfg = replace(student_config(2, 1), parallel=ParallelConfig(tensor_parallel=2, sequence_parallel=True))
    with pytest.raises(ConfigError, match=r"student\.parallel\.sequence_parallel"):
        transformer_config(cfg, _cpu_layout(2, 1))


def test_a_cuda_machine_without_te_or_apex_gets_no_fused_softmax_and_no_fast_path_kernels():
    from mopd.student import transformer_config
    from mopd.student.hardware import Capabilities

    bare_cuda = Capabilities(cuda=True, transformer_engine=False, apex_softmax=False, apex_grad_accum=False,
                             compute_capability=(9, 0))
    tc = transformer_config(student_config(), _cpu_layout(), caps=bare_cuda)
    assert (tc.masked_softmax_fusion, tc.bias_activation_fusion, tc.bias_dropout_fusion) == (False, True, True)
    assert (tc.apply_rope_fusion, tc.gradient_accumulation_fusion) == (False, False)
    cpu = transformer_config(student_config(), _cpu_layout())
    assert not (cpu.masked_softmax_fusion or cpu.bias_activation_fusion or cpu.apply_rope_fusion
                or cpu.gradient_accumulation_fusion)


@pytest.mark.parametrize("recompute,want", [
    ("none", (None, None, None)), ("selective", ("selective", None, None)), ("full", ("full", "uniform", 1))])
def test_the_recompute_setting_reaches_megatron(recompute, want):
    from dataclasses import replace

    from mopd.config.model import Recompute
    from mopd.student import transformer_config

    cfg = student_config()
    cfg = replace(cfg, train=replace(cfg.train, recompute=Recompute(recompute)))
    tc = transformer_config(cfg, _cpu_layout())
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == want
    if recompute == "selective":
        assert tc.recompute_modules == ["mlp"]
