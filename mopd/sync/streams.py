"""Streams of HF-named tensors: byte-bounded buckets and a one-pass fan-out to several consumers."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import torch

from mopd.errors import EngineError

DEFAULT_BUCKET_BYTES = 512 << 20
"""Bytes per SGLang ``update_weights_from_distributed`` call / fan-out bucket."""

Named = tuple[str, torch.Tensor]


class WeightConsumer(Protocol):
    """Anything that loads an HF-named stream: ``Engine`` or a ``Teacher`` that tracks the student."""

    name: str

    def update_weights(self, named_tensors: Iterable[Named], version: int) -> None: ...


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def bucket_tensors(named: Iterable[Named], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[list[Named]]:
    """Consecutive groups of ``named`` of at most ``bucket_bytes`` each, in stream order.

    A tensor larger than the limit travels alone in its own bucket (it cannot be split: SGLang
    loads whole tensors). Lazy: one bucket is held at a time.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[Named] = []
    size = 0
    for name, tensor in named:
        nbytes = tensor_bytes(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


_END = object()


class _Aborted(Exception):
    """The producer failed; a consumer's stream stops with this."""


def load_into(consumer: WeightConsumer, stream: Iterable[Named], version: int) -> None:
    """``consumer.update_weights``; any failure becomes an EngineError naming the consumer and version."""
    try:
        consumer.update_weights(stream, version)
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(f"weight sync of version {version} into {consumer.name!r} failed: "
                          f"{type(exc).__name__}: {exc}") from exc


def fan_out(stream: Iterator[Named], consumers: Sequence[WeightConsumer], version: int,
            bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """One pass over ``stream`` feeds every consumer, each in its own thread, one bucket at a time.

    The producer (this thread) keeps draining the stream even when a consumer fails, because the
    stream's collectives must complete on every rank; the first consumer error is raised at the end.
    """
    queues = [queue.Queue(maxsize=1) for _ in consumers]
    errors: list[BaseException | None] = [None] * len(consumers)

    def run(i: int) -> None:
        def items() -> Iterator[Named]:
            while (bucket := queues[i].get()) is not _END:
                if isinstance(bucket, _Aborted):
                    raise bucket
                yield from bucket

        try:
            load_into(consumers[i], items(), version)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i,), name=f"weight-sync-{c.name}", daemon=True)
               for i, c in enumerate(consumers)]
    for t in threads:
        t.start()
    try:
        for bucket in bucket_tensors(stream, bucket_bytes):
            _offer(queues, threads, bucket, errors, consumers)
        _offer(queues, threads, _END, errors, consumers)
    except BaseException as exc:
        _offer(queues, threads, _Aborted(f"weight stream of version {version} failed: {exc}"), errors, consumers)
        raise
    finally:
        for t in threads:
            t.join()
    for consumer, err in zip(consumers, errors, strict=True):
        if err is not None:
            raise err if isinstance(err, EngineError) else EngineError(
                f"weight sync of version {version} into {consumer.name!r} failed: {err}") from err


def _offer(queues: list[queue.Queue], threads: list[threading.Thread], item, errors: list, consumers: list) -> None:
    """Put ``item`` into each live consumer's queue (a consumer that stopped no longer takes any)."""
    for i, (q, t) in enumerate(zip(queues, threads, strict=True)):
        while t.is_alive():
            try:
                q.put(item, timeout=0.05)
                break
            except queue.Full:
                continue
        else:
            if errors[i] is None and item is not _END and not isinstance(item, _Aborted):
                errors[i] = EngineError(f"{consumers[i].name!r} returned from update_weights before the stream ended")


__all__ = ["DEFAULT_BUCKET_BYTES", "Named", "WeightConsumer", "bucket_tensors", "fan_out", "load_into", "tensor_bytes"]
