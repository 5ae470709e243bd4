"""An HF folder as a weight consumer: the student's HF-named stream written straight into safetensors.

Stage ends export through this rather than through a live transformers model: the weight stream
(``mopd.sync.WeightSync``) hands over one full tensor at a time and the writer puts it at its planned
offset (``ShardedSafetensorsWriter(any_order=True)``: a live model's parameter order is not HF file
order), so global rank 0 holds one tensor group at a time, never the model. A fp32 transformers copy
of a 70B student would need ~280 GB of host RAM (gpu_path_review.md item 7).

The folder appears atomically (a hidden sibling renamed at the end) and holds safetensors shards
(+ index), config.json, generation_config.json and the tokenizer files, so ``from_pretrained`` and
SGLang's ``--model-path`` read it as they read any HF checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from mopd.config import ModelConfig
from mopd.errors import CheckpointError
from mopd.hf.families import hf_config_from_model
from mopd.hf.mapping import expected_hf_shapes
from mopd.hf.stream import ShardedSafetensorsWriter, TensorSpec

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class HFFolderWriter:
    """Receives one weight stream (``update_weights``) and leaves it as an HF folder at ``out``.

    ``dtype`` is the dtype written (the student's parameter dtype: bf16 on a bf16 run). An existing
    folder at ``out`` (a stage's own earlier export, e.g. before a resume) is replaced only once the
    new one is complete.
    """

    name = "hf_export"

    def __init__(self, out: str | Path, cfg: ModelConfig, *, dtype: torch.dtype, tokenizer=None,
                 max_shard_bytes: int = 5 * 2**30) -> None:
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"HF export dtype must be one of {list(_DTYPE_NAMES.values())}, got {dtype}")
        self.out, self.cfg, self.dtype, self.tokenizer = Path(out), cfg, dtype, tokenizer
        self.max_shard_bytes = max_shard_bytes
        self.peak_tensor_bytes = 0
        """The largest tensor written (the memory bound's unit; reported by tests)."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        specs = [TensorSpec(name, shape, self.dtype) for name, shape in expected_hf_shapes(self.cfg).items()]
        with atomic_dir(self.out, replace=True) as tmp:
            writer = ShardedSafetensorsWriter(tmp, specs, max_shard_bytes=self.max_shard_bytes, any_order=True)
            for name, tensor in named_tensors:
                data = tensor.detach().to(device="cpu", dtype=self.dtype)
                self.peak_tensor_bytes = max(self.peak_tensor_bytes, data.numel() * data.element_size())
                writer.write(name, data)
                del data
            writer.close(metadata={"weight_version": str(version)})
            self._write_configs(tmp)

    def _write_configs(self, folder: Path) -> None:
        tok = self.tokenizer
        ids = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if tok is not None and getattr(tok, k, None) is not None}
        config = hf_config_from_model(self.cfg, dtype=_DTYPE_NAMES[self.dtype], extra=ids)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
        if tok is not None:
            tok.save_pretrained(folder)


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """A hidden sibling of ``out`` that becomes ``out`` only if the block finishes; removed on any
    failure. An existing ``out`` is refused, or with ``replace`` swapped out once the new one is complete."""
    out = Path(out)
    if out.exists() and not replace:
        raise CheckpointError(f"output folder {out} already exists; remove it or choose another")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["HFFolderWriter", "atomic_dir"]
