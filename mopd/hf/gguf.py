"""GGUF file -> HF folder (safetensors + config.json + tokenizer + chat template).

transformers dequantises a GGUF checkpoint when it loads one (`from_pretrained(..., gguf_file=...)`,
with the `gguf` package installed), but the model it returns is marked quantised and refuses
`save_pretrained`. So the weights are copied into a fresh model of the same class built from the
loaded config, saved in the requested dtype, and `quantization_config` is dropped from config.json:
the result is an ordinary HF folder that `convert_hf.py import` (and any HF tool) reads.

`gguf_tokenizer_to_hf` takes only the tokenizer (vocabulary, merges, special ids, chat template) from a
GGUF header: enough for the first part of a split GGUF whose tensor data lies in other files.

Folders appear atomically: it is written to a hidden sibling and renamed when complete.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from mopd.errors import CheckpointError
from mopd.hf.folder import atomic_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gguf_to_hf(gguf_file: str | Path, hf_dir: str | Path, *, dtype: str = "bf16") -> Path:
    """Dequantise `gguf_file` into an HF folder `hf_dir` (weights in `dtype`: fp32, bf16 or fp16)."""
    src, out = Path(gguf_file), Path(hf_dir)
    if not src.is_file():
        raise CheckpointError(f"GGUF file {src} does not exist")
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if out.exists():
        raise CheckpointError(f"output folder {out} already exists; remove it or choose another")
    _require_gguf_packages()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = DTYPES[dtype]
    fresh = type(loaded)(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight is absent from the GGUF and re-tied by the fresh model.
    missing = [n for n in missing if not (config.tie_word_embeddings and n == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{src}: dequantised weights do not fit {type(fresh).__name__} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    del loaded
    fresh = fresh.to(DTYPES[dtype])

    with atomic_dir(out) as tmp:
        fresh.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _drop_quantization_config(tmp / "config.json")
    return out


def gguf_tokenizer_to_hf(gguf_file: str | Path, tokenizer_dir: str | Path) -> Path:
    """The tokenizer in `gguf_file`'s header -> an HF tokenizer folder (tokenizer.json, chat template).

    Only the header is read, so the tensor data may be truncated or live in other parts of a split GGUF:
    `gguf.GGUFReader` builds its tensor table eagerly and raises on truncated data, so that step is
    skipped while transformers reads the file.
    """
    src, out = Path(gguf_file), Path(tokenizer_dir)
    if not src.is_file():
        raise CheckpointError(f"GGUF file {src} does not exist")
    if out.exists():
        raise CheckpointError(f"output folder {out} already exists; remove it or choose another")
    _require_gguf_packages()
    from transformers import AutoTokenizer

    with _header_only_gguf_reader():
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return out


def _require_gguf_packages() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise CheckpointError(f"reading GGUF files needs {' and '.join(missing)}: pip install 'mopd[gguf]'")


@contextlib.contextmanager
def _header_only_gguf_reader() -> Iterator[None]:
    from gguf import GGUFReader

    original = GGUFReader._build_tensors
    GGUFReader._build_tensors = lambda self, start_offs, fields: None
    try:
        yield
    finally:
        GGUFReader._build_tensors = original


def _drop_quantization_config(path: Path) -> None:
    config = json.loads(path.read_text())
    config.pop("quantization_config", None)
    path.write_text(json.dumps(config, indent=2) + "\n")


__all__ = ["DTYPES", "gguf_to_hf", "gguf_tokenizer_to_hf"]
