"""Weight sync: the student's weights, HF-named and unsharded, into every engine and tracking teacher.

After an optimizer step every rank calls ``WeightSync.sync(version)``. The stream is
``mopd.hf.megatron_to_hf`` (one mapping for export, rollout engines and EMA teachers).

Who does what (Megatron rank order: tp fastest, then dp, then pp):

* Data-parallel replica 0 walks its pipeline stage's parameters: every rank of a stage's TP group
  iterates together, one ``all_gather`` over the TP group per parameter (``hf.gather``). Replicas
  with dp_rank > 0 hold the same weights (the optimizer all-gathers parameters after each step) and
  only wait at the closing barrier.
* The *stage source*, the first rank of each stage (tp_rank 0, dp_rank 0), holds each full tensor
  of its stage in turn. These are the ranks that join the NCCL group with SGLang in production
  (DESIGN.md §11); ``local_stream`` is what each of them would broadcast.
* The consumers handed to ``WeightSync`` (embedded engine, EMA self-teacher, an SGLang client whose
  weight-update group has this process as sender) live on global rank 0, stage 0's source. Rank 0
  streams stage 0 itself, then receives stages 1..pp-1 from their sources one HF tensor at a time
  (point-to-point over the default group; a header object, then the tensor), never a stage at once.

Memory bound per sync. A TP rank: one parameter's shards plus its gathered copy. A stage source:
additionally the HF tensors of one Megatron tensor group (a fused QKV or gate/up: ~2x its size).
Rank 0: the same plus, with several consumers, the fan-out buffer: one bucket being filled, one
queued and one being loaded, i.e. at most ``3 * bucket_bytes`` shared by all consumers (tensors are
shared, not copied). With one consumer the stream goes straight in, nothing is buffered.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from mopd.config import ModelConfig
from mopd.errors import EngineError

DEFAULT_BUCKET_BYTES = 512 << 20
"""Bytes per SGLang ``update_weights_from_distributed`` call / fan-out bucket."""

Named = tuple[str, torch.Tensor]


class WeightConsumer(Protocol):
    """Anything that loads an HF-named stream: ``Engine`` or a ``Teacher`` that tracks the student."""

    name: str

    def update_weights(self, named_tensors: Iterable[Named], version: int) -> None: ...


@dataclass(frozen=True, slots=True)
class SyncReport:
    """What one rank did in one sync."""

    version: int
    role: str
    """"root" (global rank 0: fed the consumers), "source" (sent its stage to rank 0), "gather" (TP peer), "idle" (dp > 0)."""
    tensors: int
    """HF tensors this rank streamed into the consumers (root) or sent to rank 0 (source)."""
    nbytes: int
    seconds: float
    consumers: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------- buckets


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


# ---------------------------------------------------------------------------------------- fingerprints


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


def _param_dtype(engine) -> torch.dtype | None:
    model = getattr(engine, "model", None)
    if not isinstance(model, torch.nn.Module):
        return None
    return next(model.parameters()).dtype


# ---------------------------------------------------------------------------------------- the sync


class WeightSync:
    """Streams the student's weights into ``consumers`` after each optimizer step (see the module doc).

    ``model_chunks``: this rank's ``build_model`` list. ``layout``: ``init_parallel``'s result.
    ``consumers`` are only used on global rank 0 (pass them on every rank or only there);
    use ``tracking(teachers)`` to pick the teachers that follow the student. ``verify``: after each
    sync, compare the checksums of every streamed tensor with what each in-process engine holds
    (EmbeddedEngine; an EMA teacher holds its average, not the student, and is not compared).
    """

    def __init__(self, model_chunks: list[torch.nn.Module], model_cfg: ModelConfig, layout, consumers: Sequence[WeightConsumer] = (),
                 *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, verify: bool = False) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"WeightSync: bucket_bytes must be positive, got {bucket_bytes}")
        names = [c.name for c in consumers]
        if len(set(names)) != len(names):
            raise EngineError(f"WeightSync: consumer names must be unique, got {names}")
        self.chunks = model_chunks
        self.cfg = model_cfg
        self.layout = layout
        self.consumers = list(consumers)
        self.bucket_bytes = bucket_bytes
        self.verify = verify

    # -------------------------------------------------------------- roles

    @property
    def is_root(self) -> bool:
        return self.layout.rank == 0

    @property
    def is_stage_source(self) -> bool:
        return self.layout.tp_rank == 0 and self.layout.dp_rank == 0

    def stage_sources(self) -> list[int]:
        """Global rank of each pipeline stage's source (tp_rank 0, dp_rank 0), stage by stage."""
        return [ranks[0] for ranks in self.layout.ranks_per_stage]

    def local_stream(self) -> Iterator[Named]:
        """This stage's HF tensors on its source; every TP peer of dp replica 0 must iterate too."""
        from mopd.hf.gather import iter_full_megatron_tensors
        from mopd.hf.mapping import megatron_to_hf

        return megatron_to_hf(iter_full_megatron_tensors(self.chunks, tp_group=self.layout.tp_group), self.cfg)

    # -------------------------------------------------------------- one sync

    def sync(self, version: int) -> SyncReport:
        """Stream every weight into the consumers as ``version``; collective over all ranks."""
        start = time.perf_counter()
        role, count, nbytes = self._role(), 0, 0
        digests: list[dict[str, str]] = []
        try:
            if role == "root":
                counter = _Counter(self.full_stream())
                digests = self._feed(counter.stream(), version)
                count, nbytes = counter.tensors, counter.nbytes
            elif role == "source":
                count, nbytes = self._send_stage()
            elif role == "gather":
                for _ in self._gathers():
                    pass
        finally:
            # Nobody leaves before rank 0 has loaded everything (the next optimizer step must not
            # overwrite parameters a consumer may still read: TP=1 streams views of them), and a
            # consumer's error on rank 0 must not leave the other ranks waiting here.
            dist.barrier()
        if role == "root" and self.verify:
            self._check(digests)
        return SyncReport(version=int(version), role=role, tensors=count, nbytes=nbytes,
                          seconds=time.perf_counter() - start,
                          consumers=tuple(c.name for c in self.consumers) if role == "root" else ())

    def _role(self) -> str:
        if self.is_root:
            return "root"
        if self.layout.dp_rank != 0:
            return "idle"
        return "source" if self.is_stage_source else "gather"

    def _gathers(self) -> Iterator[tuple[str, torch.Tensor]]:
        from mopd.hf.gather import iter_full_megatron_tensors

        return iter_full_megatron_tensors(self.chunks, tp_group=self.layout.tp_group)

    def full_stream(self) -> Iterator[Named]:
        """On rank 0: the whole model, stage 0 from this rank, the other stages received in order."""
        yield from self.local_stream()
        for src in self.stage_sources()[1:]:
            yield from _receive_stage(src, self.layout.device)

    def _send_stage(self) -> tuple[int, int]:
        count = nbytes = 0
        for name, tensor in self.local_stream():
            dist.send_object_list([(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))], dst=0)
            dist.send(tensor.contiguous(), dst=0)
            count, nbytes = count + 1, nbytes + tensor_bytes(tensor)
        dist.send_object_list([None], dst=0)
        return count, nbytes

    # -------------------------------------------------------------- consumers on rank 0

    def _feed(self, stream: Iterator[Named], version: int) -> list[dict[str, str]]:
        """Load ``stream`` into every consumer; returns the checksums per verified consumer."""
        targets = [_param_dtype(c) if self.verify else None for c in self.consumers]
        digests: list[dict[str, str]] = [{} for _ in self.consumers]
        if self.verify:
            stream = _recording(stream, targets, digests)
        try:
            if len(self.consumers) == 1:
                load_into(self.consumers[0], stream, version)
            elif self.consumers:
                fan_out(stream, self.consumers, version, self.bucket_bytes)
        finally:
            # The other ranks are inside the stream's collectives: finish them whatever happened here.
            for _ in stream:
                pass
        return digests

    def _check(self, digests: list[dict[str, str]]) -> None:
        for consumer, expected in zip(self.consumers, digests, strict=True):
            if _param_dtype(consumer) is None or not expected:
                continue  # teachers hold an average; remote engines have no local copy
            held = engine_fingerprint(consumer, expected)
            wrong = [n for n in expected if held[n] != expected[n]]
            if wrong:
                raise EngineError(f"weight sync verify: {consumer.name!r} holds a different {wrong[0]!r} than the "
                                  f"student streamed ({len(wrong)} of {len(expected)} tensors differ)")


def tracking(teachers: Iterable) -> list:
    """The teachers that follow the student's weights (``tracks_student``: e.g. an EMA self-teacher)."""
    return [t for t in teachers if getattr(t, "tracks_student", False)]


# ---------------------------------------------------------------------------------------- helpers


def _receive_stage(src: int, device: torch.device) -> Iterator[Named]:
    """The HF tensors stage source ``src`` sends (see ``WeightSync._send_stage``), until its end marker."""
    while True:
        header: list = [None]
        dist.recv_object_list(header, src=src)
        if header[0] is None:
            return
        name, shape, dtype = header[0]
        tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.recv(tensor, src=src)
        yield name, tensor


class _Counter:
    """Counts the tensors and bytes that pass through a stream."""

    def __init__(self, stream: Iterator[Named]) -> None:
        self._stream, self.tensors, self.nbytes = stream, 0, 0

    def stream(self) -> Iterator[Named]:
        for name, tensor in self._stream:
            self.tensors += 1
            self.nbytes += tensor_bytes(tensor)
            yield name, tensor


def _recording(stream: Iterator[Named], dtypes: list[torch.dtype | None], out: list[dict[str, str]]) -> Iterator[Named]:
    """Pass ``stream`` through, recording each tensor's checksum as consumer i will store it (cast to dtypes[i])."""
    for name, tensor in stream:
        for dtype, digests in zip(dtypes, out, strict=True):
            if dtype is not None:
                digests[name] = checksum(tensor.to(dtype))
        yield name, tensor


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


__all__ = ["DEFAULT_BUCKET_BYTES", "SyncReport", "WeightConsumer", "WeightSync", "bucket_tensors", "checksum",
           "engine_fingerprint", "fan_out", "fingerprint", "load_into", "tensor_bytes", "tracking"]
