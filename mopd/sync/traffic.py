"""Bytes this rank sends and receives through torch.distributed, for benches and tests.

``count_traffic()`` wraps torch.distributed's point-to-point and collective functions while it is
active (process-wide: a sync's broadcasts run in pool threads) and adds up their tensor bytes;
the ``*_object_list`` helpers are counted through the ``broadcast``/``send``/``recv``/``all_gather``
calls they make. Deterministic: it counts what the code hands to torch.distributed, not what a
network card saw.

Accounting per call, for a group of G ranks and a tensor of n bytes (the volumes of the usual
bandwidth-optimal algorithms, NCCL's ring or tree):

* ``send``/``recv``: n sent / received.
* ``broadcast``: the root sends n once (a pipelined ring or tree forwards it; the root itself sends it
  once), every other rank receives n.
* ``all_gather`` of n-byte shards: (G-1)*n sent and received by every rank.
* ``all_reduce``: 2*(G-1)/G*n sent and received by every rank (reduce-scatter + all-gather).
* ``scatter``: the root sends (G-1)*n, every other rank receives n.

Not a production path: it monkey-patches torch.distributed while active.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


@dataclass
class Traffic:
    """Bytes sent and received by this rank, per operation kind."""

    sent: int = 0
    received: int = 0
    by_op: dict[str, list[int]] = field(default_factory=dict)

    def add(self, op: str, sent: int, received: int) -> None:
        self.sent += sent
        self.received += received
        row = self.by_op.setdefault(op, [0, 0])
        row[0] += sent
        row[1] += received


_lock = threading.Lock()
_active: list[Traffic] = []
_depth = threading.local()
"""Calls of this thread in progress: only the outermost is counted (``send`` calls ``isend``)."""


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _group_size_rank(group) -> tuple[int, int]:
    if group is None:
        return dist.get_world_size(), dist.get_rank()
    return group.size(), group.rank()  # custom groups (the SGLang weight group) map ranks {i: i}


def _root(args: dict, group) -> int:
    """The call's root as a rank in ``group``."""
    if args.get("group_src") is not None:
        return args["group_src"]
    src = args.get("src")
    return src if group is None else dist.get_group_rank(group, src)


def _volumes(op: str, args: dict) -> tuple[int, int]:
    group = args.get("group")
    size, rank = _group_size_rank(group)
    if op in ("send", "isend"):
        return _nbytes(args["tensor"]), 0
    if op in ("recv", "irecv"):
        return 0, _nbytes(args["tensor"])
    if op == "broadcast":
        n = _nbytes(args["tensor"])
        return (n, 0) if rank == _root(args, group) else (0, n)
    if op == "all_gather":
        n = _nbytes(args["tensor"]) * (size - 1)
        return n, n
    if op == "all_gather_into_tensor":
        n = _nbytes(args["input_tensor"]) * (size - 1)
        return n, n
    if op == "all_reduce":
        n = 2 * (size - 1) * _nbytes(args["tensor"]) // size
        return n, n
    if op == "scatter":
        n = _nbytes(args["tensor"])
        return ((size - 1) * n, 0) if rank == _root(args, group) else (0, n)
    raise AssertionError(op)


_OPS = ("send", "isend", "recv", "irecv", "broadcast", "all_gather", "all_gather_into_tensor", "all_reduce", "scatter")


def _wrap(op: str, fn: Callable) -> Callable:
    signature = inspect.signature(fn)

    def counted(*args, **kwargs):
        depth = getattr(_depth, "value", 0)
        if _active and depth == 0:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            sent, received = _volumes(op, bound.arguments)
            with _lock:
                for traffic in _active:
                    traffic.add(op, sent, received)
        _depth.value = depth + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _depth.value = depth

    counted.__wrapped__ = fn
    return counted


@contextmanager
def count_traffic() -> Iterator[Traffic]:
    """Count this process's torch.distributed bytes inside the block (nesting allowed)."""
    traffic = Traffic()
    with _lock:
        if not _active:
            for op in _OPS:
                wrapped = _wrap(op, getattr(c10d, op))
                setattr(c10d, op, wrapped)
                setattr(dist, op, wrapped)
        _active.append(traffic)
    try:
        yield traffic
    finally:
        with _lock:
            _active.remove(traffic)
            if not _active:
                for op in _OPS:
                    original = getattr(c10d, op).__wrapped__
                    setattr(c10d, op, original)
                    setattr(dist, op, original)


__all__ = ["Traffic", "count_traffic"]
