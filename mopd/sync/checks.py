"""Exact per-tensor checksums, to confirm an engine holds exactly the weights the student streamed."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

from mopd.errors import EngineError
from mopd.sync.streams import Named


def checksum(tensor: torch.Tensor) -> str:
    """Exact fingerprint of one tensor: blake2b-128 over dtype, shape and raw bytes (hex).

    Equal checksums mean bit-identical tensors. It copies the tensor to host memory, so it is a
    test / debug tool (``WeightSync(verify=True)``), not part of a production sync.
    """
    t = tensor.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(named: Iterable[Named], dtype: torch.dtype | None = None) -> dict[str, str]:
    """``{name: checksum}`` of a stream, each tensor cast to ``dtype`` first when given."""
    return {n: checksum(t if dtype is None else t.to(dtype)) for n, t in named}


def engine_fingerprint(engine, names: Iterable[str]) -> dict[str, str]:
    """Checksums of the named tensors an in-process engine (``EmbeddedEngine``) holds now."""
    state = engine.model.state_dict()
    missing = [n for n in names if n not in state]
    if missing:
        raise EngineError(f"engine {engine.name!r} has no tensor {missing[0]!r} to fingerprint")
    return {n: checksum(state[n]) for n in names}


def param_dtype(engine) -> torch.dtype | None:
    """The parameter dtype of an in-process engine's model; None for anything without a local model."""
    model = getattr(engine, "model", None)
    if not isinstance(model, torch.nn.Module):
        return None
    return next(model.parameters()).dtype


__all__ = ["checksum", "engine_fingerprint", "fingerprint", "param_dtype"]
