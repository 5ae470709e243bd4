"""The ``export`` stage: publish an earlier stage's HF folder under ``<run>/export/<stage>``.

The copy is checked without loading the model (a 70B load would need its whole size in host RAM):
config.json must parse as a transformers config, and the safetensors headers must hold every tensor
the config implies, with its shape.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from mopd.config import RunConfig, StageConfig
from mopd.errors import CheckpointError, ConfigError
from mopd.hf.families import model_config_from_hf
from mopd.hf.mapping import expected_hf_shapes
from mopd.hf.stream import HFReader
from mopd.stages.context import RunContext, StageOutput, barrier


def run_export(ctx: RunContext, stage: StageConfig, config: RunConfig) -> StageOutput:
    start = time.perf_counter()
    if stage.init_from is None:
        raise ConfigError(f"stages[{stage.name}].init_from: an export stage needs the stage to export")
    src, out = ctx.hf_dir_of(stage.init_from), ctx.run_dir / "export" / stage.name
    if ctx.is_logger:
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        check_hf_folder(tmp)  # refuse to publish a folder transformers could not load
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        print(f"[{stage.name}] exported {stage.init_from} to {out}", flush=True)
    barrier()
    return StageOutput(name=stage.name, kind=stage.kind.value, role=stage.role.value, hf_dir=str(out),
                       wall_s=time.perf_counter() - start)


def check_hf_folder(folder: Path) -> None:
    """config.json parses, and the weights hold exactly the tensors (and shapes) it implies."""
    from transformers import AutoConfig

    AutoConfig.from_pretrained(folder)
    cfg = model_config_from_hf(json.loads((folder / "config.json").read_text()))
    reader = HFReader(folder)
    expected, present = expected_hf_shapes(cfg), set(reader.names())
    missing = sorted(set(expected) - present)
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} tensors the config implies are missing (first: {missing[0]})")
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise CheckpointError(f"{folder}: tensor {name} is {reader.shape(name)}, config.json implies {shape}")
