"""Top-K transport: TeacherScores as one contiguous byte buffer, and its trip to the training ranks.

Wire format (little-endian), version 1::

    header  <4s H B B I I I I>  magic b"MTS1", version, logprob dtype code, reserved,
                                N tokens, K, S segments, len(teacher name)
    name    utf-8, zero-padded to a multiple of 8 bytes
    lengths [S] int32           tokens of each segment (one per rollout), padded to 8 bytes
    ids     [N, K] int32
    sampled [N] fp32
    tail    [N] fp32
    logprob [N, K] bf16 | fp16 | fp32

The 4-byte fields come first so every array starts aligned. Per token that is ``6K + 8`` bytes
with bf16 logprobs (K=64: 392 B), plus 4 bytes per segment and a header of at most a few hundred
bytes per buffer.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch
import torch.distributed as dist

from mopd.errors import TeacherError
from mopd.types import TeacherScores

MAGIC = b"MTS1"
VERSION = 1
_HEADER = struct.Struct("<4sHBBIIII")
_DTYPES = {1: torch.bfloat16, 2: torch.float16, 3: torch.float32}
_CODES = {v: k for k, v in _DTYPES.items()}


def bytes_per_token(k: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Marginal wire size of one token: int32 ids + K logprobs + sampled and tail fp32 scalars."""
    return 4 * k + dtype.itemsize * k + 8


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


def pack(scores: TeacherScores, dtype: torch.dtype = torch.bfloat16) -> bytes:
    """One TeacherScores ([N, K] top-K) as bytes; logprobs are rounded to ``dtype``."""
    return pack_batch([scores], dtype)


def pack_batch(parts: Sequence[TeacherScores], dtype: torch.dtype = torch.bfloat16) -> bytes:
    """Several TeacherScores of one teacher (e.g. one per rollout) as one buffer of concatenated fields."""
    if dtype not in _CODES:
        raise TeacherError(f"transport: logprob dtype {dtype} is not one of {list(_CODES)}")
    if not parts:  # a rank with nothing to train on this step still gets a (header-only) buffer
        return _HEADER.pack(MAGIC, VERSION, _CODES[dtype], 0, 0, 0, 0, 0)
    whole = TeacherScores.concat(list(parts))
    n, k = whole.topk_ids.shape
    name = whole.teacher.encode()
    lengths = torch.tensor([p.num_tokens for p in parts], dtype=torch.int32)
    chunks = [
        _HEADER.pack(MAGIC, VERSION, _CODES[dtype], 0, n, k, len(parts), len(name)),
        name.ljust(_pad8(len(name)), b"\0"),
        _raw(lengths).ljust(_pad8(4 * len(parts)), b"\0"),
        _raw(whole.topk_ids.to(torch.int32)),
        _raw(whole.sampled_logprob.to(torch.float32)),
        _raw(whole.tail_logmass.to(torch.float32)),
        _raw(whole.topk_logprobs.to(dtype)),
    ]
    return b"".join(chunks)


def unpack(buf: bytes | bytearray | memoryview) -> TeacherScores:
    """The concatenation of every segment of a packed buffer (tensors own their memory)."""
    parts = unpack_batch(buf)
    if not parts:
        raise TeacherError("transport: the buffer holds no TeacherScores (it was packed from an empty list)")
    return TeacherScores.concat(parts)


def unpack_batch(buf: bytes | bytearray | memoryview) -> list[TeacherScores]:
    """The segments of a packed buffer, in the order they were packed."""
    view = memoryview(buf).cast("B")
    if len(view) < _HEADER.size:
        raise TeacherError(f"transport: buffer of {len(view)} bytes is shorter than the {_HEADER.size}-byte header")
    magic, version, code, _, n, k, segs, name_len = _HEADER.unpack_from(view)
    if magic != MAGIC or version != VERSION or code not in _DTYPES:
        raise TeacherError(
            f"transport: not a TeacherScores buffer (magic {magic!r}, version {version}, dtype code {code}; "
            f"expected {MAGIC!r}, {VERSION}, one of {sorted(_DTYPES)})"
        )
    dtype = _DTYPES[code]
    offset = _HEADER.size
    teacher = bytes(view[offset : offset + name_len]).decode(errors="replace")
    offset += _pad8(name_len)
    expected = offset + _pad8(4 * segs) + n * bytes_per_token(k, dtype)
    if len(view) != expected:
        raise TeacherError(
            f"transport: buffer from teacher {teacher!r} has {len(view)} bytes, its header "
            f"(N={n}, K={k}, {segs} segments, {dtype}) implies {expected}"
        )
    lengths, offset = _take(view, offset, torch.int32, (segs,)), offset + _pad8(4 * segs)
    ids, offset = _take(view, offset, torch.int32, (n, k)), offset + 4 * n * k
    sampled, offset = _take(view, offset, torch.float32, (n,)), offset + 4 * n
    tail, offset = _take(view, offset, torch.float32, (n,)), offset + 4 * n
    logprobs = _take(view, offset, dtype, (n, k))
    if int(lengths.sum()) != n or bool((lengths < 0).any()):
        raise TeacherError(f"transport: teacher {teacher!r} segment lengths {lengths.tolist()} do not sum to N={n}")
    bounds = [0, *torch.cumsum(lengths.long(), 0).tolist()]
    return [
        TeacherScores(ids[a:b], logprobs[a:b], sampled[a:b], tail[a:b], teacher) for a, b in zip(bounds, bounds[1:])
    ]


def distribute(
    scores_per_rank: Sequence[Sequence[TeacherScores]] | None,
    src: int,
    group: dist.ProcessGroup | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> list[TeacherScores]:
    """Send each rank of ``group`` its own list of TeacherScores from the rank that fetched them.

    ``src`` is a global rank. On ``src``, ``scores_per_rank[i]`` is the list for group rank ``i``;
    elsewhere pass None. Buffers travel packed (one scatter of byte tensors padded to the longest,
    after a broadcast of their sizes); NCCL groups use CUDA staging tensors. Returns this rank's list.
    """
    world = dist.get_world_size(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    buffers: list[bytes] = []
    if dist.get_rank() == src:
        if scores_per_rank is None or len(scores_per_rank) != world:
            got = None if scores_per_rank is None else len(scores_per_rank)
            raise TeacherError(f"transport.distribute: source rank {src} needs one score list per rank ({world}), got {got}")
        buffers = [pack_batch(list(parts), dtype) for parts in scores_per_rank]
        sizes.copy_(torch.tensor([len(b) for b in buffers], dtype=torch.int64))
    dist.broadcast(sizes, src=src, group=group)
    width = int(sizes.max())
    out = torch.empty(width, dtype=torch.uint8, device=device)
    scatter = None
    if dist.get_rank() == src:
        scatter = [torch.frombuffer(bytearray(b.ljust(width, b"\0")), dtype=torch.uint8).to(device) for b in buffers]
    dist.scatter(out, scatter, src=src, group=group)
    mine = int(sizes[dist.get_rank(group)])
    return unpack_batch(out[:mine].cpu().numpy().tobytes())


def _raw(t: torch.Tensor) -> bytes:
    """The tensor's bytes in native (little-endian on every supported host) order."""
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _take(view: memoryview, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    count = 1
    for s in shape:
        count *= s
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    nbytes = count * dtype.itemsize
    raw = torch.frombuffer(bytearray(view[offset : offset + nbytes]), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)
