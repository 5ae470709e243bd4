"""The decisions mopd makes from a machine's kernels, shown with made-up capabilities: fused softmax
only with TE or Apex, fast paths auto/required/off, FP8 recipes per GPU generation, TE's FP8 shape
rules and the padding that meets them, RNG states that resume across device types."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from mopd.config import Dtype, Fp8Recipe, ModelConfig, PrecisionConfig
from mopd.config.model import FastPathConfig
from mopd.errors import ConfigError
from mopd.student.hardware import (
    CPU,
    Capabilities,
    fp8_problems,
    fp8_shape_problems,
    kernel_fusions,
    resolve_fast_paths,
)
from mopd.student.train_step import length_multiple

HOPPER_TE = Capabilities(cuda=True, transformer_engine=True, apex_softmax=False, apex_grad_accum=False,
                         compute_capability=(9, 0))
NGC_HOPPER = Capabilities(cuda=True, transformer_engine=True, apex_softmax=True, apex_grad_accum=True,
                          compute_capability=(9, 0))
BARE_CUDA = Capabilities(cuda=True, transformer_engine=False, apex_softmax=False, apex_grad_accum=False,
                         compute_capability=(9, 0))


def test_fused_softmax_needs_transformer_engine_or_the_apex_kernel():
    assert kernel_fusions(BARE_CUDA) == dict(bias_activation_fusion=True, bias_dropout_fusion=True,
                                             masked_softmax_fusion=False)
    assert kernel_fusions(HOPPER_TE)["masked_softmax_fusion"]
    assert kernel_fusions(Capabilities(cuda=True, transformer_engine=False, apex_softmax=True,
                                       apex_grad_accum=False))["masked_softmax_fusion"]
    assert not any(kernel_fusions(CPU).values())


def test_auto_fast_paths_follow_the_machine_off_on_the_cpu_on_with_the_kernels():
    auto = FastPathConfig()
    cpu = resolve_fast_paths(auto, CPU, data_parallel=4)
    assert (cpu.gradient_accumulation_fusion, cpu.overlap_grad_reduce, cpu.rope_fusion) == (False, False, False)
    ngc = resolve_fast_paths(auto, NGC_HOPPER, data_parallel=2)
    assert (ngc.gradient_accumulation_fusion, ngc.overlap_grad_reduce, ngc.rope_fusion) == (True, True, True)
    pip_te = resolve_fast_paths(auto, HOPPER_TE, data_parallel=1)
    assert (pip_te.gradient_accumulation_fusion, pip_te.overlap_grad_reduce, pip_te.rope_fusion) == (False, False, True)
    # gloo overlaps too: asked for explicitly, the CPU runs it (test_student_parity checks it is exact)
    assert resolve_fast_paths(FastPathConfig(overlap_grad_reduce=True), CPU, data_parallel=2).overlap_grad_reduce


@pytest.mark.parametrize("key,caps,dp,missing", [
    ("gradient_accumulation_fusion", HOPPER_TE, 2, "fused_weight_gradient_mlp_cuda"),
    ("gradient_accumulation_fusion", CPU, 2, "CUDA"),
    ("rope_fusion", BARE_CUDA, 2, "Transformer Engine"),
    ("overlap_grad_reduce", NGC_HOPPER, 1, "more than one data-parallel rank"),
])
def test_a_fast_path_asked_for_where_it_cannot_run_is_refused_naming_the_key(key, caps, dp, missing):
    with pytest.raises(ConfigError, match=rf"student\.fast_paths\.{key}=true needs .*{missing}"):
        resolve_fast_paths(FastPathConfig(**{key: True}), caps, data_parallel=dp)
    off = resolve_fast_paths(FastPathConfig(**{key: False}), NGC_HOPPER, data_parallel=2)
    assert getattr(off, key) is False


def test_deferred_param_gather_tp_comm_overlap_and_fp8_params_are_refused_at_load():
    from mopd.config import load_config

    for override, key in (("student.fast_paths.overlap_param_gather=true", "overlap_param_gather"),
                          ("student.fast_paths.tp_comm_overlap=true", "tp_comm_overlap"),
                          ("student.precision.fp8_param_gather=true", "fp8_param_gather")):
        with pytest.raises(ConfigError, match=rf"student\.\w+\.{key}"):
            load_config(None, ["student.precision.dtype=bf16", override])


def test_mxfp8_is_refused_before_blackwell_and_fp8_before_ada():
    mx = PrecisionConfig(dtype=Dtype.bf16, fp8=Fp8Recipe.mxfp8)
    [why] = fp8_problems(mx, HOPPER_TE)
    assert "student.precision.fp8=mxfp8" in why and "Blackwell" in why and "sm_90" in why
    assert fp8_problems(mx, Capabilities(True, True, False, False, (10, 0))) == []
    tensorwise = PrecisionConfig(dtype=Dtype.bf16, fp8=Fp8Recipe.tensorwise)
    assert fp8_problems(tensorwise, HOPPER_TE) == []
    assert "sm_80" in fp8_problems(tensorwise, Capabilities(True, True, False, False, (8, 0)))[0]
    assert "Transformer Engine" in fp8_problems(tensorwise, BARE_CUDA)[0]


def test_fp8_shape_rules_name_the_width_that_is_not_a_multiple_of_16():
    model = ModelConfig(hidden_size=8192, num_attention_heads=64, num_query_groups=8, ffn_hidden_size=28672)
    assert fp8_shape_problems(model, 8, Fp8Recipe.tensorwise) == []
    odd = ModelConfig(hidden_size=96, num_attention_heads=4, ffn_hidden_size=200)
    [why] = fp8_shape_problems(odd, 1, Fp8Recipe.tensorwise)
    assert "ffn_hidden_size / tensor_parallel = 200" in why


@pytest.mark.parametrize("rows,tp,sp,fp8,multiple", [
    (1, 8, True, None, 8),       # SP alone: a multiple of TP
    (1, 8, True, 16, 128),       # 70B recipe: S/8 local rows must be a multiple of 16
    (2, 8, True, 16, 64),        # two rows share the 16: 2 * S/8 % 16 == 0
    (8, 1, False, 16, 2),        # the GPU test's shape: 8 * S % 16 == 0
    (3, 2, True, 16, 32),        # odd rows take the whole 16
    (1, 4, True, 32, 128),       # MXFP8 blocks of 32
])
def test_padded_length_keeps_every_ranks_fp8_tokens_a_multiple_of_what_te_needs(rows, tp, sp, fp8, multiple):
    assert length_multiple(rows, tp, sp, fp8) == multiple
    for length in range(multiple, 4 * multiple + 1, multiple):
        local_tokens = rows * length // (tp if sp else 1)
        assert length % (tp if sp else 1) == 0
        assert fp8 is None or local_tokens % fp8 == 0


def _rng_snapshot():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


@pytest.mark.parametrize("saved_on,resumed_on", [("cpu", "cuda"), ("cuda", "cpu")])
def test_rng_states_saved_on_one_device_type_resume_the_host_rngs_only_on_the_other(
        monkeypatch, caplog, saved_on, resumed_on):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from mopd.student import checkpoint

    device_state = torch.zeros(16 if saved_on == "cuda" else 5056, dtype=torch.uint8)
    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": {"model-parallel-rng": device_state}}
    if saved_on == "cuda":
        state["cuda"] = device_state  # a checkpoint from before the device tag: "cuda" marks a GPU save
    else:
        state["device_type"] = "cpu"
    expected = _rng_snapshot()
    device_calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a, **k: device_calls.append("cuda"))
    monkeypatch.setattr(get_cuda_rng_tracker(), "set_states", lambda s: device_calls.append("tracker"))
    with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
        restored = checkpoint._restore_rng(state, device_type=resumed_on)
    assert restored is False and device_calls == []
    assert _rng_snapshot() == expected  # python, numpy and torch CPU generators resume exactly
    assert f"saved on {saved_on} and this run is on {resumed_on}" in caplog.text


def test_rng_states_resume_in_full_on_the_device_type_that_saved_them(monkeypatch):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from mopd.student import checkpoint

    tracker_states = {"model-parallel-rng": torch.Generator().manual_seed(3).get_state()}
    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tracker_states, "device_type": "cpu"}
    got = []
    monkeypatch.setattr(get_cuda_rng_tracker(), "set_states", got.append)
    assert checkpoint._restore_rng(state, device_type="cpu") is True
    assert got == [tracker_states]
