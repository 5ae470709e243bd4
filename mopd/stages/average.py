"""Stages that train nothing: weight averaging (a baseline), evaluation and HF export."""

from __future__ import annotations

import shutil
import time

import torch

from mopd.config import RunConfig, StageConfig
from mopd.errors import ConfigError
from mopd.stages.common import evaluate_hf_dir
from mopd.stages.context import RunContext, StageOutput, barrier
from mopd.stages.student import save_hf


def run_average(ctx: RunContext, stage: StageConfig, config: RunConfig) -> StageOutput:
    """The uniform average of the listed stages' weights (the 'merge the experts' baseline)."""
    start = time.perf_counter()
    out = ctx.stage_dir(stage) / "hf"
    if ctx.is_logger:
        from transformers import AutoModelForCausalLM

        dirs = [ctx.hf_dir_of(s) for s in stage.sources]
        merged = AutoModelForCausalLM.from_pretrained(dirs[0], dtype=torch.float32)
        total = {k: v.double().clone() for k, v in merged.state_dict().items()}
        for d in dirs[1:]:
            other = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).state_dict()
            if other.keys() != total.keys():
                raise ConfigError(f"stages[{stage.name}].sources: {d} has different tensors than {dirs[0]}")
            for k, v in other.items():
                total[k] += v.double()
        merged.load_state_dict({k: (v / len(dirs)).float() for k, v in total.items()})
        save_hf(merged, ctx.tokenizer, out)
    barrier()
    evaluation = evaluate_hf_dir(ctx, config, out) if stage.evaluate else {}
    return StageOutput(name=stage.name, kind=stage.kind.value, role=stage.role.value, hf_dir=str(out),
                       wall_s=time.perf_counter() - start, eval=evaluation)


def run_eval(ctx: RunContext, stage: StageConfig, config: RunConfig) -> StageOutput:
    """Evaluate ``init_from`` (a stage or an HF folder)."""
    start = time.perf_counter()
    if stage.init_from is None:
        raise ConfigError(f"stages[{stage.name}].init_from: an eval stage needs the stage or HF folder to evaluate")
    hf_dir = ctx.hf_dir_of(stage.init_from)
    evaluation = evaluate_hf_dir(ctx, config, hf_dir)
    return StageOutput(name=stage.name, kind=stage.kind.value, role=stage.role.value, hf_dir=None,
                       wall_s=time.perf_counter() - start, eval=evaluation)


def run_export(ctx: RunContext, stage: StageConfig, config: RunConfig) -> StageOutput:
    """Copy ``init_from``'s weights to ``<run>/export/<stage>`` as an HF folder (checked to load)."""
    start = time.perf_counter()
    if stage.init_from is None:
        raise ConfigError(f"stages[{stage.name}].init_from: an export stage needs the stage to export")
    src, out = ctx.hf_dir_of(stage.init_from), ctx.run_dir / "export" / stage.name
    if ctx.is_logger:
        from transformers import AutoModelForCausalLM

        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        AutoModelForCausalLM.from_pretrained(tmp)  # refuse to publish a folder transformers cannot load
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        print(f"[{stage.name}] exported {stage.init_from} to {out}", flush=True)
    barrier()
    return StageOutput(name=stage.name, kind=stage.kind.value, role=stage.role.value, hf_dir=str(out),
                       wall_s=time.perf_counter() - start)
