"""The Megatron student of one stage: model chunks, optimizer, scheduler, and its ways out.

Weights leave the student in two forms: Megatron dist_checkpointing folders (resumable, loadable at
any TP/PP) and HF-named tensors streamed through ``mopd.hf.megatron_to_hf`` (weight sync into the
rollout engine and tracking teachers; HF folders written tensor by tensor by ``HFFolderWriter``, in
the student's parameter dtype, so an export never builds a model on rank 0).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mopd.config import Dtype, StudentConfig
from mopd.hf.folder import HFFolderWriter
from mopd.parallel import ParallelLayout
from mopd.stages.context import barrier
from mopd.sync import WeightSync
from mopd.student import (
    build_model,
    build_optimizer,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
    save_model_weights,
)


@dataclass
class Student:
    cfg: StudentConfig
    layout: ParallelLayout
    chunks: list[torch.nn.Module]
    optimizer: Any
    scheduler: Any

    @classmethod
    def build(cls, cfg: StudentConfig, layout: ParallelLayout, init_weights: Path | None) -> Student:
        """A fresh student; ``init_weights`` is a Megatron weights folder (any TP/PP) or None for random init."""
        chunks = build_model(cfg, layout)
        if init_weights is not None:
            load_model_weights(init_weights, chunks)  # before the optimizer copies fp32 main weights
        optimizer, scheduler = build_optimizer(cfg, chunks)
        return cls(cfg, layout, chunks, optimizer, scheduler)

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, directory: Path, step: int, extra: dict, keep_last: int) -> Path:
        path = save_checkpoint(directory / f"step_{step:06d}", self.chunks, self.optimizer, self.scheduler,
                               step=step, extra=extra)
        if self.layout.rank == 0:
            _prune(directory, keep_last)
        barrier()
        return path

    def resume(self, directory: Path) -> dict | None:
        """Load the latest complete checkpoint under ``directory``; its ``extra`` plus ``step``, or None."""
        path = latest_checkpoint(directory)
        if path is None:
            return None
        return load_checkpoint(path, self.chunks, self.optimizer, self.scheduler)

    def save_weights(self, path: Path) -> Path:
        return save_model_weights(path, self.chunks)

    # -- HF stream -----------------------------------------------------------------------------

    def sync_into(self, consumers: list, version: int) -> None:
        """Stream the weights (HF names, unsharded) into consumers held by global rank 0. Collective:
        every rank calls it; other ranks' consumers are ignored. Any TP/PP layout (mopd.sync)."""
        WeightSync(self.chunks, self.cfg.model, self.layout, consumers if self.layout.rank == 0 else []).sync(version)

    def export_hf(self, out: Path, tokenizer) -> Path:
        """Write the weights as an HF folder on rank 0, streamed tensor by tensor in the parameter
        dtype (atomically: temporary folder, then rename). Collective."""
        self.sync_into([HFFolderWriter(out, self.cfg.model, dtype=self.param_dtype, tokenizer=tokenizer)], version=0)
        barrier()
        return out

    @property
    def param_dtype(self) -> torch.dtype:
        return {Dtype.bf16: torch.bfloat16, Dtype.fp16: torch.float16}.get(self.cfg.precision.dtype, torch.float32)


class Recorder:
    """A weight consumer that keeps what it is sent (a frozen copy of the student)."""

    name = "recorder"

    def __init__(self) -> None:
        self.tensors: list[tuple[str, torch.Tensor]] = []

    def update_weights(self, named_tensors, version: int) -> None:
        self.tensors = [(name, t.detach().clone()) for name, t in named_tensors]


def _prune(directory: Path, keep_last: int) -> None:
    complete = sorted(p for p in directory.glob("step_*") if p.is_dir())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
