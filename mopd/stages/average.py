"""The ``average`` stage: the uniform average of earlier stages' weights (the 'merge the experts' baseline).

Streams tensor by tensor (``HFReader`` -> float64 sum -> ``ShardedSafetensorsWriter``), so it holds
one tensor per source at a time whatever the model's size; the result keeps the first source's
dtype, config and tokenizer files.
"""

from __future__ import annotations

import os
import shutil
import time

import torch

from mopd.config import RunConfig, StageConfig
from mopd.errors import ConfigError
from mopd.hf.stream import HFReader, ShardedSafetensorsWriter, TensorSpec
from mopd.stages.context import RunContext, StageOutput, barrier
from mopd.stages.evaluate import evaluate_hf_dir

_WEIGHT_FILES = (".safetensors",)


def run_average(ctx: RunContext, stage: StageConfig, config: RunConfig) -> StageOutput:
    start = time.perf_counter()
    out = ctx.stage_dir(stage) / "hf"
    if ctx.is_logger:
        average_folders([ctx.hf_dir_of(s) for s in stage.sources], out, stage=stage.name)
    barrier()
    evaluation = evaluate_hf_dir(ctx, config, out) if stage.evaluate else {}
    return StageOutput(name=stage.name, kind=stage.kind.value, role=stage.role.value, hf_dir=str(out),
                       wall_s=time.perf_counter() - start, eval=evaluation)


def average_folders(dirs: list, out, *, stage: str) -> None:
    """Write the element-wise mean of the HF folders ``dirs`` to ``out`` (atomically)."""
    readers = [HFReader(d) for d in dirs]
    names = readers[0].names()
    for d, reader in zip(dirs[1:], readers[1:]):
        if sorted(reader.names()) != sorted(names):
            raise ConfigError(f"stages[{stage}].sources: {d} has different tensors than {dirs[0]}")
    specs = [TensorSpec(n, readers[0].shape(n), readers[0].dtype(n)) for n in names]
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer = ShardedSafetensorsWriter(tmp, specs)
        for spec in specs:
            total = torch.zeros(spec.shape, dtype=torch.float64)
            for d, reader in zip(dirs, readers):
                tensor = reader.get(spec.name)
                if tuple(tensor.shape) != spec.shape:
                    raise ConfigError(f"stages[{stage}].sources: {spec.name} is {tuple(tensor.shape)} in {d}, "
                                      f"{spec.shape} in {dirs[0]}")
                total += tensor.double()
            writer.write(spec.name, (total / len(dirs)).to(spec.dtype))
        writer.close()
        for path in sorted(dirs[0].iterdir()):  # config, tokenizer, generation config
            if path.is_file() and not path.name.endswith(_WEIGHT_FILES) and not path.name.endswith(".index.json"):
                shutil.copy2(path, tmp / path.name)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
