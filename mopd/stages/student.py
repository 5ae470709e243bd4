"""The Megatron student of one stage: model chunks, optimizer, scheduler, and its ways out.

Weights leave the student in two forms: Megatron dist_checkpointing folders (resumable, loadable at
any TP/PP) and HF-named tensors streamed through ``mopd.hf.megatron_to_hf`` (weight sync into the
rollout engine, HF folders for teachers and eval). The HF model that receives them is built from the
same ModelConfig with transformers, so an exported folder is a plain ``from_pretrained`` folder.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mopd.config import ModelConfig, StudentConfig
from mopd.hf import hf_config_from_model
from mopd.parallel import ParallelLayout
from mopd.rollout.embedded import EmbeddedEngine
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
        """Write the weights as an HF folder on rank 0 (atomically: temporary folder, then rename)."""
        engine = hf_engine(self.cfg.model, tokenizer, name="export") if self.layout.rank == 0 else None
        self.sync_into([engine], version=0)
        if engine is not None:
            save_hf(engine.model, tokenizer, out)
        barrier()
        return out


class Recorder:
    """A weight consumer that keeps what it is sent (a frozen copy of the student)."""

    name = "recorder"

    def __init__(self) -> None:
        self.tensors: list[tuple[str, torch.Tensor]] = []

    def update_weights(self, named_tensors, version: int) -> None:
        self.tensors = [(name, t.detach().clone()) for name, t in named_tensors]


def hf_engine(cfg: ModelConfig, tokenizer, name: str) -> EmbeddedEngine:
    """An embedded engine around a fresh transformers model of the student's architecture."""
    return EmbeddedEngine(hf_model(cfg, tokenizer), eos_token_ids=[tokenizer.eos_token_id],
                          pad_token_id=tokenizer.pad_token_id, name=name, tokenizer=tokenizer)


def hf_model(cfg: ModelConfig, tokenizer=None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised transformers model of the same architecture (weights come by sync)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {}
    if tokenizer is not None:
        extra = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                 if getattr(tokenizer, k, None) is not None}
    config = hf_config_from_model(cfg, dtype="float32", extra=extra)
    model_type = config.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **config)
    return AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()


def save_hf(model: torch.nn.Module, tokenizer, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _prune(directory: Path, keep_last: int) -> None:
    complete = sorted(p for p in directory.glob("step_*") if p.is_dir())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
