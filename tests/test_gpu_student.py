"""The student's CUDA path on one GPU: NCCL, bf16 (and FP8 through Transformer Engine on Hopper).

Marked `gpu`: skipped on CPU machines (tests/conftest.py). Run on a GPU node with
`pytest -m gpu tests/test_gpu_student.py`.
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


def train_losses(overrides: list[str], steps: int = 6) -> list[float]:
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
        batches = build_train_batches(rollouts, scores, routing, 8, tokenizer.pad_token_id)
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


@pytest.mark.gpu
def test_bf16_student_trains_over_nccl_on_one_gpu():
    losses = train_losses(["student.precision.dtype=bf16"])
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


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
    losses = train_losses(["student.precision.dtype=bf16", "student.precision.fp8=tensorwise"])
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
