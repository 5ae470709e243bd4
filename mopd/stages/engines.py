"""The student's rollout engine, built from config on global rank 0, and in-process HF models of it.

``rollout.engine: embedded`` is a transformers model of the student's architecture in this process
(the laptop/CI default); ``sglang`` connects to ``rollout.sglang.endpoints`` or launches servers
(``launch: true``) and syncs weights into them over an NCCL group (``weight_sync: distributed``) or
through safetensors files (``disk``). The same engine generates rollouts during opd and serves every
stage-end evaluation of the student, so a cluster run never evaluates on a CPU copy of the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mopd.config import EngineKind, ModelConfig, RunConfig
from mopd.hf import hf_config_from_model
from mopd.rollout.embedded import EmbeddedEngine
from mopd.rollout.engine import Engine

if TYPE_CHECKING:
    from mopd.stages.training import StageRun


def rollout_engine(run: StageRun) -> Engine | None:
    """The rollout engine (rank 0; None elsewhere), loaded with the student's current weights
    (version = step). Collective: every rank streams its share of the weights."""
    engine = new_rollout_engine(run.config, run.ctx.tokenizer, run.dir) if run.ctx.is_logger else None
    run.student.sync_into([engine], version=run.step)
    return engine


def new_rollout_engine(config: RunConfig, tokenizer, stage_dir) -> Engine:
    if config.rollout.engine == EngineKind.sglang:
        from mopd.rollout.sglang_client import WeightSyncOptions
        from mopd.rollout.sglang_launcher import sglang_engine

        sync = WeightSyncOptions(disk_dir=str(stage_dir / "weight_sync"), base_model_path=config.rollout.sglang.model_path,
                                 model=config.student.model)
        return sglang_engine(config.rollout.sglang, name="rollout", sync=sync)
    return hf_engine(config.student.model, tokenizer, name="rollout")


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
