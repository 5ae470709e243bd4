"""Streaming safetensors IO: read HF tensors one at a time, write shards without holding them.

Reading memory-maps each shard (safetensors `safe_open`) and copies out one tensor per call.
Writing plans every shard up front from (name, shape, dtype) alone, writes each shard's header
first and then appends tensor bytes as they arrive, so a writer holds no tensor after `write`
returns: an export's peak memory is one tensor group, not one shard.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open

from mopd.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class HFReader:
    """The tensors of an HF checkpoint folder (sharded with an index, or one model.safetensors)."""

    def __init__(self, hf_dir: str | Path):
        self.root = Path(hf_dir)
        self._file_of = self._index()

    def _index(self) -> dict[str, str]:
        index = self.root / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a safetensors index (needs 'weight_map'): {exc}") from None
            for file in sorted(set(weight_map.values())):
                if not (self.root / file).is_file():
                    raise CheckpointError(f"{index} lists shard {file}, which does not exist in {self.root}")
            return dict(weight_map)
        single = self.root / SINGLE_NAME
        if not single.is_file():
            raise CheckpointError(f"{self.root} has neither {INDEX_NAME} nor {SINGLE_NAME}"
                                  " (only safetensors checkpoints are supported)")
        with safe_open(single, framework="pt") as handle:
            return {name: SINGLE_NAME for name in handle.keys()}

    def names(self) -> list[str]:
        return list(self._file_of)

    def _open(self, name: str):
        """The shard holding `name`, opened per call: a memory map kept open would keep every page
        read so far resident (and counted in RSS) until the end of the conversion."""
        if name not in self._file_of:
            raise CheckpointError(f"tensor {name!r} is missing from the HF checkpoint in {self.root}")
        return safe_open(self.root / self._file_of[name], framework="pt")

    def shape(self, name: str) -> tuple[int, ...]:
        with self._open(name) as handle:
            return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        with self._open(name) as handle:
            code = handle.get_slice(name).get_dtype()
        by_code = {v: k for k, v in _DTYPE_CODES.items()}
        if code not in by_code:
            raise CheckpointError(f"tensor {name!r} has dtype {code}, which the converter does not handle")
        return by_code[code]

    def get(self, name: str) -> torch.Tensor:
        """A copy of one tensor."""
        with self._open(name) as handle:
            return handle.get_tensor(name)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class ShardedSafetensorsWriter:
    """Writes planned tensors into `model-0000i-of-0000n.safetensors` shards plus the index.

    By default tensors must arrive in plan order (`write` checks name, shape and dtype) and each
    shard is appended to as they come. With ``any_order=True`` every shard file is laid out (header,
    then zero-length data extended on demand) when it is first touched and each tensor is written at
    its planned offset, so a stream whose order differs from the plan (a live model's parameter order
    is not HF file order) still never holds more than one tensor. `close` verifies that every planned
    tensor was written exactly once. Shards hold at most `max_shard_bytes` (one larger tensor gets a
    shard of its own).
    """

    def __init__(self, out_dir: str | Path, specs: Iterable[TensorSpec], *, max_shard_bytes: int = 5 * 2**30,
                 any_order: bool = False):
        self.out_dir = Path(out_dir)
        self.specs = list(specs)
        self.shards = _plan_shards(self.specs, max_shard_bytes)
        self.any_order = any_order
        self._next = 0
        self._shard_no = -1
        self._stream: BinaryIO | None = None
        self._left_in_shard = 0
        n = len(self.shards)
        self.files = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._where = {spec.name: (i, spec) for i, shard in enumerate(self.shards) for spec in shard}
        self._offsets = {spec.name: off for shard in self.shards for spec, off in zip(shard, _offsets(shard))}
        self._handles: dict[int, BinaryIO] = {}
        self._header_len: dict[int, int] = {}
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.any_order:
            return self._write_at(name, tensor)
        if self._next >= len(self.specs):
            raise CheckpointError(f"unexpected extra tensor {name!r}: all {len(self.specs)} planned tensors are written")
        spec = self.specs[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (spec.name, spec.shape, spec.dtype):
            raise CheckpointError(f"tensor {name!r} {tuple(tensor.shape)} {tensor.dtype} arrived where "
                                  f"{spec.name!r} {spec.shape} {spec.dtype} was planned")
        if self._left_in_shard == 0:
            self._open_next_shard()
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self._stream.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1
        self._left_in_shard -= 1

    def _write_at(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._where:
            raise CheckpointError(f"unexpected tensor {name!r}: it is not among the {len(self.specs)} planned tensors")
        if name in self._written:
            raise CheckpointError(f"tensor {name!r} arrived twice")
        shard_no, spec = self._where[name]
        if (tuple(tensor.shape), tensor.dtype) != (spec.shape, spec.dtype):
            raise CheckpointError(f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}; the plan says "
                                  f"{spec.shape} {spec.dtype}")
        handle = self._handles.get(shard_no)
        if handle is None:
            header = _header(self.shards[shard_no])
            handle = self._handles[shard_no] = open(self.out_dir / self.files[shard_no], "wb+")
            handle.write(header)
            self._header_len[shard_no] = len(header)
        data = tensor.detach().contiguous().cpu()
        handle.seek(self._header_len[shard_no] + self._offsets[name])
        if data.numel():
            handle.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._written.add(name)

    def close(self, metadata: dict[str, str] | None = None) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        for handle in self._handles.values():
            handle.close()
        self._handles = {}
        written = len(self._written) if self.any_order else self._next
        if written != len(self.specs):
            missing = [s.name for s in self.specs if s.name not in self._written] if self.any_order \
                else [s.name for s in self.specs[self._next:]]
            raise CheckpointError(f"export stopped before {len(missing)} tensors were written (first: {missing[0]!r})")
        if len(self.files) > 1:
            weight_map = {spec.name: self.files[i] for i, shard in enumerate(self.shards) for spec in shard}
            total = sum(spec.nbytes for spec in self.specs)
            index = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def _open_next_shard(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._shard_no += 1
        shard = self.shards[self._shard_no]
        self._stream = open(self.out_dir / self.files[self._shard_no], "wb")
        self._stream.write(_header(shard))
        self._left_in_shard = len(shard)


def _offsets(shard: list[TensorSpec]) -> list[int]:
    out, offset = [], 0
    for spec in shard:
        out.append(offset)
        offset += spec.nbytes
    return out


def _plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(shard: list[TensorSpec]) -> bytes:
    """The safetensors header: 8-byte little-endian length, then JSON padded with spaces to 8 bytes."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        if spec.dtype not in _DTYPE_CODES:
            raise CheckpointError(f"tensor {spec.name!r}: dtype {spec.dtype} cannot be written to safetensors")
        entries[spec.name] = {"dtype": _DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


__all__ = ["HFReader", "INDEX_NAME", "SINGLE_NAME", "ShardedSafetensorsWriter", "TensorSpec"]
