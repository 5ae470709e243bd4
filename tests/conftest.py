"""Test-wide settings: `@pytest.mark.gpu` tests skip cleanly on machines without a CUDA device; the
real-model fixtures (tests/real_models.py) are built once per machine and shared by every test."""

import os
from pathlib import Path

import pytest
import torch

# The CPU tiers stay on the CPU on a GPU node too: every `mopd` process and gloo rank a test starts
# inherits this (mopd.cli and init_parallel hide the devices); gpu-marked tests drop it (fixture below).
os.environ.setdefault("MOPD_FORCE_CPU", "1")

from real_models import r1_qwen_tokenizer_dir, smollm2_hf_dir, smollm2_megatron_dir


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _gpu_tests_use_the_gpu(request, monkeypatch):
    if "gpu" in request.keywords:
        monkeypatch.delenv("MOPD_FORCE_CPU", raising=False)


# --- real-model fixtures (session-scoped; the folders are read-only: copy before modifying) ---

@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    """SmolLM2-135M-Instruct as an HF folder (bf16 safetensors, tokenizer, ChatML chat template)."""
    return smollm2_hf_dir()


@pytest.fixture(scope="session")
def smollm2_megatron_tp1() -> Path:
    """SmolLM2-135M-Instruct imported by `convert_hf.py import --tp 1`."""
    return smollm2_megatron_dir(1)


@pytest.fixture(scope="session")
def smollm2_megatron_tp3() -> Path:
    """SmolLM2-135M-Instruct imported by `convert_hf.py import --tp 3`."""
    return smollm2_megatron_dir(3)


@pytest.fixture(scope="session")
def r1_qwen_tokenizer() -> Path:
    """The DeepSeek-R1-Distill-Qwen tokenizer folder (a second family: Qwen2 BPE, R1 chat template)."""
    return r1_qwen_tokenizer_dir()
