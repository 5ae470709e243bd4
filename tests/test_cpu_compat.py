"""The CPU compatibility layer: what it patches, that it undoes itself, reproducible RNG tracker forks,
and a TP=2 GPTModel forward equal to TP=1. One 2-rank spawn runs every check (activation is
process-wide, so it never runs in the pytest process)."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_on_ranks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is inactive when CUDA is available")


def _raises(fn) -> bool:
    try:
        fn()
    except (RuntimeError, AssertionError, AttributeError):
        return True
    return False


def _patch_checks() -> dict:
    import megatron.core.optimizer as moptimizer
    from megatron.core.distributed import param_and_grad_buffer as buffers
    from megatron.core.tensor_parallel import random as mrandom

    from mopd.parallel import cpu_compat

    original_current_device = torch.cuda.current_device
    original_builder = moptimizer._get_megatron_optimizer_based_on_param_groups
    original_reduce_scatter = buffers.dist_reduce_scatter_func
    out = {"before_cuda_tensor_raises": _raises(lambda: torch.zeros(1, device="cuda")),
           "before_current_device_raises": _raises(torch.cuda.current_device)}
    depth = torch._C._len_torch_function_stack()
    out["activated"] = cpu_compat.activate()
    out["activated_again"] = cpu_compat.activate()
    out["mode_pushed_once"] = torch._C._len_torch_function_stack() == depth + 1
    out["cuda_zeros_device"] = str(torch.zeros(2, device="cuda").device)
    out["to_cuda_device"] = str(torch.ones(2).to("cuda").device)
    out["dot_cuda_device"] = str(torch.ones(2).cuda().device)
    out["current_device"] = torch.cuda.current_device()
    out["float_type"] = torch.ones(1).type()
    out["bf16_type"] = torch.ones(1, dtype=torch.bfloat16).type()
    out["type_with_dtype_still_converts"] = torch.ones(1).type(torch.float64).dtype == torch.float64
    out["reduce_scatter_wrapped"] = buffers.dist_reduce_scatter_func.__wrapped__ is original_reduce_scatter
    out["builder_wrapped"] = moptimizer._get_megatron_optimizer_based_on_param_groups.__wrapped__ is original_builder
    cpu_compat.deactivate()
    out["after_cuda_tensor_raises"] = _raises(lambda: torch.zeros(1, device="cuda"))
    out["current_device_restored"] = torch.cuda.current_device is original_current_device
    out["reduce_scatter_restored"] = buffers.dist_reduce_scatter_func is original_reduce_scatter
    out["builder_restored"] = moptimizer._get_megatron_optimizer_based_on_param_groups is original_builder
    out["tracker_add_restored"] = mrandom.CudaRNGStatesTracker.add.__module__ == mrandom.__name__
    out["mode_popped"] = torch._C._len_torch_function_stack() == depth
    return out


def _rng_checks(tp_rank: int) -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    def draw(seed: int) -> dict:
        model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
        torch.manual_seed(seed)
        tracker = get_cuda_rng_tracker()
        with tracker.fork():
            tp_mask = torch.nn.functional.dropout(torch.ones(64), p=0.5)
        with tracker.fork("data-parallel-rng"):
            dp_mask = torch.nn.functional.dropout(torch.ones(64), p=0.5)
        with tracker.fork():
            tp_mask2 = torch.nn.functional.dropout(torch.ones(64), p=0.5)
        return {"tp": tp_mask, "dp": dp_mask, "tp2": tp_mask2, "default_after": torch.rand(4)}

    first, again = draw(5), draw(5)
    torch.manual_seed(5)
    return {"first": first, "again": again, "default_without_forks": torch.rand(4), "tp_rank": tp_rank}


def _tiny_gpt(dropout: float):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.parallel_state import get_tensor_model_parallel_world_size
    from megatron.core.transformer import TransformerConfig

    tp = get_tensor_model_parallel_world_size()
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                            normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
                            hidden_dropout=dropout, attention_dropout=dropout, use_cpu_initialization=True,
                            tensor_model_parallel_size=tp, pipeline_dtype=torch.float32,
                            bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=128, max_sequence_length=32, position_embedding_type="rope")


def _gpt_logits(tp: int) -> dict:
    """Full logits of a fixed batch at this TP; and two dropout forwards from the same seed."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from mopd.config import ParallelConfig
    from mopd.parallel import destroy_parallel, init_parallel

    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(12).expand(2, 12)
    init_parallel(ParallelConfig(tensor_parallel=tp), seed=21)
    model = _tiny_gpt(0.0).eval()
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens, positions, None))
    dropped = []
    for _ in range(2):
        init_parallel(ParallelConfig(tensor_parallel=tp), seed=21)
        model = _tiny_gpt(0.3).train()
        with torch.no_grad():
            dropped.append(gather_from_tensor_model_parallel_region(model(tokens, positions, None)))
    destroy_parallel()
    return {"logits": logits, "dropout_runs": dropped}


def _worker(rank: int, world: int) -> dict:
    out = {"patches": _patch_checks()}
    from mopd.parallel import cpu_compat

    cpu_compat.activate()
    from mopd.config import ParallelConfig
    from mopd.parallel import init_parallel

    layout = init_parallel(ParallelConfig(tensor_parallel=2), seed=0)
    out["rng"] = _rng_checks(layout.tp_rank)
    out["tp1"], out["tp2"] = _gpt_logits(1), _gpt_logits(2)
    return out


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_worker, 2, timeout=240)


def test_activation_turns_cuda_requests_into_cpu_tensors_and_deactivation_undoes_it(results):
    for p in (r["patches"] for r in results):
        assert p["before_cuda_tensor_raises"] and p["before_current_device_raises"]
        assert p["activated"] and p["activated_again"] and p["mode_pushed_once"]
        assert p["cuda_zeros_device"] == p["to_cuda_device"] == p["dot_cuda_device"] == "cpu"
        assert p["current_device"] == "cpu"
        assert p["float_type"] == "torch.cuda.FloatTensor" and p["bf16_type"] == "torch.cuda.BFloat16Tensor"
        assert p["type_with_dtype_still_converts"]
        assert p["after_cuda_tensor_raises"] and p["current_device_restored"]
        assert p["tracker_add_restored"] and p["mode_popped"]
        assert p["builder_wrapped"] and p["builder_restored"]
        assert p["reduce_scatter_wrapped"] and p["reduce_scatter_restored"]


def test_rng_tracker_forks_are_reproducible_per_tp_rank_and_leave_the_default_stream_alone(results):
    rngs = [r["rng"] for r in results]
    for rng in rngs:
        for key in ("tp", "dp", "tp2", "default_after"):
            assert torch.equal(rng["first"][key], rng["again"][key]), key
        assert not torch.equal(rng["first"]["tp"], rng["first"]["tp2"]), "a fork must advance its own state"
        # Forked draws do not consume the default generator.
        assert torch.equal(rng["first"]["default_after"], rng["default_without_forks"])
    assert not torch.equal(rngs[0]["first"]["tp"], rngs[1]["first"]["tp"]), "TP ranks need different dropout"
    assert torch.equal(rngs[0]["first"]["dp"], rngs[1]["first"]["dp"]), "the data-parallel state is shared"


def test_a_tp2_gpt_forward_on_cpu_equals_tp1(results):
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["tp2"]["logits"], r["tp1"]["logits"], rtol=1e-5, atol=1e-5,
                                   msg=f"rank {rank}")
        assert r["tp1"]["logits"].shape == (2, 12, 128)
    torch.testing.assert_close(results[0]["tp2"]["logits"], results[1]["tp2"]["logits"], rtol=0, atol=0)


def test_dropout_under_tp2_is_reproducible_from_the_seed_and_actually_drops(results):
    for r in results:
        first, second = r["tp2"]["dropout_runs"]
        assert torch.equal(first, second)
        assert (first - r["tp2"]["logits"]).abs().max() > 1e-3


def test_cpu_adam_is_switched_to_the_fused_kernel_and_takes_the_adam_step():
    """The optimizer Megatron wraps becomes fused=True; its first step equals Adam's float64 formula."""
    from types import SimpleNamespace

    from mopd.parallel.cpu_compat import _fuse_cpu_adam

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(300, generator=gen), torch.randn(7, 5, generator=gen)]
    grads = [torch.randn(w.shape, generator=gen) for w in weights]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    adam = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    _fuse_cpu_adam(SimpleNamespace(optimizer=adam))
    assert all(g["fused"] is True and g["foreach"] is False for g in adam.param_groups)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    adam.step()
    for p, w, g in zip(params, weights, grads):
        # First step with bias correction: m_hat = g, v_hat = g**2, so the update is lr * g / (|g| + eps).
        g64 = g.double()
        expected = w.double() - 1e-2 * g64 / (g64.abs() + 1e-8)
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-6)
    assert adam.state[params[0]]["step"].item() == 1
