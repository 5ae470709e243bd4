"""The student's CUDA path on one GPU: NCCL, bf16 (and FP8 through Transformer Engine on Hopper), the
FP8 padding rule at one row per micro-batch, MXFP8 refused before Blackwell, and the CPU test tiers'
gloo ranks staying on the CPU while this process sees the GPU.

Marked `gpu`: skipped on CPU machines (tests/conftest.py). Run on a GPU node with
`pytest -m gpu tests/test_gpu_student.py` (bench/gpu_check.sh runs every gpu test).
"""

import math
import os
import socket

import pytest
import torch

from mopd.config import load_config

TINY = ["student.model.num_layers=2", "student.model.hidden_size=128", "student.model.num_attention_heads=4",
        "student.model.num_query_groups=2", "student.model.ffn_hidden_size=256", "student.model.vocab_size=100",
        "student.model.make_vocab_size_divisible_by=64", "student.train.global_batch_size=16",
        "student.train.micro_batch_size=8", "student.optimizer.lr=2e-3", "data.domains=[reverse]", "data.num_prompts=64"]


def train_losses(overrides: list[str], steps: int = 6, micro_batch_size: int = 8) -> list[float]:
    from mopd.data.sources import build_source
    from mopd.data.tokenizer import build_char_tokenizer
    from mopd.parallel import destroy_parallel, init_parallel
    from mopd.stages.batches import one_hot_scores, reference_rollout, sft_loss_fn
    from mopd.student import build_model, build_optimizer, train_step
    from mopd.teachers import build_train_batches

    config = load_config(None, TINY + overrides)
    layout = init_parallel(config.student.parallel, seed=0)
    try:
        assert layout.device.type == "cuda"
        chunks = build_model(config.student, layout)
        optimizer, scheduler = build_optimizer(config.student, chunks)
        tokenizer = build_char_tokenizer()
        prompts = list(build_source(config.data, tokenizer))[:16]
        rollouts = [reference_rollout(p, tokenizer, 12) for p in prompts]
        routing, scores = one_hot_scores(rollouts)
        batches = build_train_batches(rollouts, scores, routing, micro_batch_size, tokenizer.pad_token_id)
        loss_fn = sft_loss_fn(config.student, layout)
        return [train_step(chunks, optimizer, scheduler, batches, loss_fn, layout, step=s).loss for s in range(steps)]
    finally:
        destroy_parallel(process_group=True)


@pytest.fixture(autouse=True)
def single_process_world(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setitem(os.environ, key, value)
    monkeypatch.delenv("MOPD_FORCE_CPU", raising=False)


@pytest.mark.gpu
def test_bf16_student_trains_over_nccl_on_one_gpu():
    """Six bf16 steps track the fp32 run step by step (the reference), within bf16 rounding."""
    bf16 = train_losses(["student.precision.dtype=bf16"])
    fp32 = train_losses(["student.precision.dtype=fp32"])
    assert all(math.isfinite(x) for x in bf16)
    assert all(abs(b - f) / f < 3e-2 for b, f in zip(bf16, fp32)), (bf16, fp32)
    assert fp32[-1] < 0.9 * fp32[0]


@pytest.mark.gpu
def test_bf16_matches_fp32_on_the_first_step_within_bf16_rounding():
    fp32 = train_losses(["student.precision.dtype=fp32"], steps=1)[0]
    bf16 = train_losses(["student.precision.dtype=bf16"], steps=1)[0]
    assert abs(bf16 - fp32) / fp32 < 2e-2


@pytest.mark.gpu
def test_fp8_tensorwise_through_transformer_engine_trains_on_hopper():
    from mopd.student.model import have_transformer_engine

    if not have_transformer_engine() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FP8 needs Transformer Engine and a Hopper (sm_90) or newer GPU")
    fp8 = train_losses(["student.precision.dtype=bf16", "student.precision.fp8=tensorwise"])
    bf16 = train_losses(["student.precision.dtype=bf16"])
    assert all(math.isfinite(x) for x in fp8)
    assert all(abs(a - b) / b < 5e-2 for a, b in zip(fp8, bf16)), (fp8, bf16)  # FP8 tracks the bf16 run


@pytest.mark.gpu
def test_fp8_with_one_row_per_micro_batch_pads_each_length_to_a_multiple_of_16_tokens():
    """Review item 5: without the padding rule TE raises at the first forward for 15 of 16 lengths."""
    from mopd.student.model import have_transformer_engine

    if not have_transformer_engine() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FP8 needs Transformer Engine and a Hopper (sm_90) or newer GPU")
    one_row = train_losses(["student.precision.dtype=bf16", "student.precision.fp8=tensorwise",
                            "student.train.micro_batch_size=1"], steps=3, micro_batch_size=1)
    eight_rows = train_losses(["student.precision.dtype=bf16", "student.precision.fp8=tensorwise"], steps=3)
    # the loss is a mean over the global batch's tokens, so splitting it into 16 micro-batches changes
    # nothing but FP8/bf16 rounding and the padding the rule adds
    assert all(abs(a - b) / b < 5e-2 for a, b in zip(one_row, eight_rows)), (one_row, eight_rows)


@pytest.mark.gpu
def test_mxfp8_is_refused_on_a_gpu_before_blackwell_naming_the_key():
    from mopd.errors import ConfigError
    from mopd.parallel import destroy_parallel, init_parallel
    from mopd.student import transformer_config

    if torch.cuda.get_device_capability() >= (10, 0):
        pytest.skip("this GPU is Blackwell or newer: MXFP8 is allowed")
    config = load_config(None, TINY + ["student.precision.dtype=bf16", "student.precision.fp8=mxfp8"])
    layout = init_parallel(config.student.parallel, seed=0)
    try:
        with pytest.raises(ConfigError, match=r"student\.precision\.fp8=mxfp8"):
            transformer_config(config.student, layout)
    finally:
        destroy_parallel(process_group=True)


@pytest.mark.gpu
def test_fast_paths_and_fusions_follow_what_this_gpu_has():
    from mopd.parallel import destroy_parallel, init_parallel
    from mopd.student import transformer_config
    from mopd.student.hardware import probe_capabilities

    config = load_config(None, TINY + ["student.precision.dtype=bf16"])
    layout = init_parallel(config.student.parallel, seed=0)
    try:
        caps = probe_capabilities(layout.device)
        tc = transformer_config(config.student, layout)
        assert tc.apply_rope_fusion == caps.transformer_engine
        assert tc.masked_softmax_fusion == (caps.transformer_engine or caps.apex_softmax)
        assert tc.gradient_accumulation_fusion == caps.apex_grad_accum
    finally:
        destroy_parallel(process_group=True)


def _where_gloo_ranks_run(rank: int, world: int) -> tuple[bool, str]:
    from mopd.config import ParallelConfig
    from mopd.parallel import destroy_parallel, init_parallel

    layout = init_parallel(ParallelConfig(), seed=0)
    destroy_parallel()
    return torch.cuda.is_available(), layout.device.type


@pytest.mark.gpu
def test_the_cpu_tiers_gloo_ranks_stay_on_the_cpu_on_a_gpu_node():
    """Review B8: `bash launch/test.sh` on a GPU node runs the multi-process tests on the CPU."""
    from dist_utils import run_on_ranks

    assert torch.cuda.is_available()
    assert run_on_ranks(_where_gloo_ranks_run, 2, timeout=240) == [(False, "cpu"), (False, "cpu")]
