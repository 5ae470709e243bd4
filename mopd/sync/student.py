"""WeightSync: the Megatron student's weights, HF-named and unsharded, into engines and tracking teachers.

After an optimizer step every rank calls ``WeightSync.sync(version)``. The stream is
``mopd.hf.megatron_to_hf`` (one mapping for export, rollout engines and EMA teachers).

Who does what (Megatron rank order: tp fastest, then dp, then pp):

* Data-parallel replica 0 walks its pipeline stage's parameters: every rank of a stage's TP group
  iterates together, one ``all_gather`` over the TP group per parameter (``hf.gather``). Replicas
  with dp_rank > 0 hold the same weights (the optimizer all-gathers parameters after each step) and
  only wait at the barriers.
* The *stage source*, the first rank of each stage (tp_rank 0, dp_rank 0), holds each full tensor of
  its stage in turn.
* Staged consumers (``staged``: an SGLang client per stage source, each with its own weight-update
  group, as DESIGN.md §11 places them; ``stage_senders.rollout_weight_sync`` builds them): global
  rank 0 opens the update session (pause, flush, begin), the stage sources broadcast their own
  layers one stage after the other (never two at once: see ``_sync_staged``), rank 0 closes it
  (end, flush, continue). No weight passes through rank 0 but stage 0's.
* In-process consumers (``consumers``: embedded engine, EMA self-teacher, an SGLang client syncing
  from disk, or one whose single group has rank 0 as sender) live on global rank 0, stage 0's
  source. Rank 0 streams stage 0 itself, then receives stages 1..pp-1 from their sources one HF
  tensor at a time (point-to-point over the default group: a header object, then the tensor), never
  a stage at once. That every byte reaches rank 0 here is inherent: the consumer is in rank 0's
  process.

Memory bound per sync. A TP rank: one parameter's shards plus its gathered copy. A stage source:
additionally the HF tensors of one Megatron tensor group (a fused QKV or gate/up: ~2x its size), and
for a staged SGLang consumer one bucket. Rank 0: the same plus, with several in-process consumers,
the fan-out buffer (at most ``3 * bucket_bytes``, shared by all consumers; see ``streams.fan_out``).
With one consumer the stream goes straight in. Never the whole model.

Freshness: the stream reads the model's parameters, which Megatron's distributed optimizer
all-gathers at the end of ``step()`` (``overlap_param_gather=False``, as ``build_model`` sets it).
With ``overlap_param_gather=True`` the caller must finish that all-gather before ``sync``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from mopd.config import ModelConfig
from mopd.errors import EngineError
from mopd.sync.checks import checksum, engine_fingerprint, param_dtype
from mopd.sync.streams import DEFAULT_BUCKET_BYTES, Named, WeightConsumer, fan_out, load_into, tensor_bytes


class StagedConsumer(Protocol):
    """An engine fed by one sender per pipeline stage (``SGLangEngine``'s staged-update methods)."""

    name: str

    def begin_staged_update(self) -> None: ...

    def send_stage(self, named_tensors: Iterable[Named], version: int) -> None: ...

    def end_staged_update(self, version: int) -> None: ...


@dataclass(frozen=True, slots=True)
class SyncReport:
    """What one rank did in one sync."""

    version: int
    role: str
    """"root" (global rank 0), "source" (a later stage's first rank), "gather" (a TP peer), "idle" (dp > 0)."""
    tensors: int
    """HF tensors this rank loaded into in-process consumers (root) or sent to rank 0 (source)."""
    nbytes: int
    seconds: float
    consumers: tuple[str, ...] = ()


class WeightSync:
    """Streams the student's weights after each optimizer step (see the module docstring). Collective.

    ``model_chunks``: this rank's ``build_model`` list; ``layout``: ``init_parallel``'s result.
    ``consumers`` are used on global rank 0 only; ``staged`` on each stage source (its own client,
    group name distinct per stage). ``tracking(teachers)`` picks the teachers that follow the student.
    ``verify``: after each sync, compare the checksum of every streamed tensor with what each
    in-process engine holds (an EMA teacher holds its average, not the student: not compared).
    Construction is itself collective (the ranks agree which rounds run). With both kinds of consumer
    a sync walks the model twice (staged round, then in-process round): two passes of TP gathers.
    ``owned``: clients built for this sync (``stage_senders.rollout_weight_sync``), closed by ``close``.
    """

    def __init__(self, model_chunks: list[torch.nn.Module], model_cfg: ModelConfig, layout,
                 consumers: Sequence[WeightConsumer] = (), *, staged: Sequence[StagedConsumer] = (),
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, verify: bool = False, owned: Sequence = ()) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"WeightSync: bucket_bytes must be positive, got {bucket_bytes}")
        names = [c.name for c in consumers]
        if len(set(names)) != len(names):
            raise EngineError(f"WeightSync: consumer names must be unique, got {names}")
        self.chunks, self.cfg, self.layout = model_chunks, model_cfg, layout
        self.consumers = list(consumers) if layout.rank == 0 else []
        self.staged = list(staged) if self.is_stage_source else []
        self.bucket_bytes, self.verify = bucket_bytes, verify
        self.owned = list(owned)
        rounds = torch.tensor([len(self.consumers), len(self.staged)], device=layout.device)  # NCCL: on the GPU
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
        self._in_process_round, self._staged_round = bool(rounds[0]), bool(rounds[1])
        if self._staged_round and self.is_stage_source and not self.staged:
            raise EngineError(f"WeightSync: stage {layout.pp_rank}'s first rank (global {layout.rank}) has no staged "
                              "consumer while other stages have one; give every stage source its own client")

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

    def full_stream(self) -> Iterator[Named]:
        """On rank 0: the whole model, stage 0 from this rank, the other stages received in order."""
        yield from self.local_stream()
        for src in self.stage_sources()[1:]:
            yield from _receive_stage(src, self.layout.device)

    def _role(self) -> str:
        if self.is_root:
            return "root"
        if self.layout.dp_rank != 0:
            return "idle"
        return "source" if self.is_stage_source else "gather"

    # -------------------------------------------------------------- one sync

    def sync(self, version: int) -> SyncReport:
        """Stream every weight into the staged, then the in-process consumers, as ``version``."""
        start, role = time.perf_counter(), self._role()
        if self._staged_round:
            self._sync_staged(version, role)
        count = nbytes = 0
        if self._in_process_round:
            count, nbytes = self._sync_in_process(version, role)
        return SyncReport(version=int(version), role=role, tensors=count, nbytes=nbytes,
                          seconds=time.perf_counter() - start, consumers=tuple(c.name for c in self.consumers))

    def _sync_in_process(self, version: int, role: str) -> tuple[int, int]:
        count = nbytes = 0
        digests: list[dict[str, str]] = []
        try:
            if role == "root":
                counter = _Counter(self.full_stream())
                digests = self._feed(counter.stream(), version)
                count, nbytes = counter.tensors, counter.nbytes
            elif role == "source":
                count, nbytes = self._send_stage()
            elif role == "gather":
                _drain(self._gathers())
        finally:
            # Nobody leaves before rank 0 has loaded everything (the next optimizer step must not
            # overwrite parameters a consumer may still read: TP=1 streams views of them), and a
            # consumer's error on rank 0 must not leave the other ranks waiting here.
            dist.barrier()
        if role == "root" and self.verify:
            self._check(digests)
        return count, nbytes

    def _sync_staged(self, version: int, role: str) -> None:
        """Rank 0 opens the session; stage by stage, that stage's source sends its layers over its
        own group while every other rank waits; rank 0 closes the session.

        One stage at a time (gpu_path_review.md B3): a server runs one update call at a time (its
        scheduler blocks in the broadcast), so with two stages sending at once two servers could take
        the stage groups in opposite orders and each wait for the other: a cross-group deadlock. The
        same holds for a stage group's first ``/init_weights_update_group``, made inside the stage's
        turn. Every failure is shared with all ranks, so they raise together and nobody waits on a
        broadcast that will not come; the stages after a failed one do not send.
        """
        opened = [None]
        if role == "root":
            opened[0] = _attempt(lambda: [c.begin_staged_update() for c in self.staged])
        dist.broadcast_object_list(opened, src=0)
        failure = (0, opened[0]) if opened[0] else None
        if failure is None:
            failure = self._staged_turns(version)
        if role == "root" and opened[0] is None:
            closed = _attempt(lambda: [c.end_staged_update(version) for c in self.staged])
            failure = failure or ((0, closed) if closed else None)
        verdict = [failure]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            rank, message = verdict[0]
            raise EngineError(f"staged weight sync of version {version} failed on rank {rank}: {message}")

    def _staged_turns(self, version: int) -> tuple[int, str] | None:
        """Each stage's turn in order; (source rank, message) of the first stage that failed, or None."""
        for stage, source in enumerate(self.stage_sources()):
            outcome = [None]
            if self.layout.pp_rank == stage and self.layout.dp_rank == 0:
                if self.is_stage_source:
                    outcome[0] = _attempt(lambda: self._send_staged(version))
                else:
                    _drain(self._gathers())
            dist.broadcast_object_list(outcome, src=source)  # the end of this stage's turn, on every rank
            if outcome[0]:
                return source, outcome[0]
        return None

    def _send_staged(self, version: int) -> None:
        stream = self.local_stream()
        try:
            if len(self.staged) == 1:
                self.staged[0].send_stage(stream, version)
            else:
                fan_out(stream, [_AsConsumer(c) for c in self.staged], version, self.bucket_bytes)
        finally:
            _drain(stream)  # the TP peers are inside this stream's all_gathers

    def close(self) -> None:
        """Close the clients this sync built (not the consumers it was given). Idempotent."""
        while self.owned:
            self.owned.pop().close()

    # -------------------------------------------------------------- in-process consumers on rank 0

    def _gathers(self) -> Iterator[tuple[str, torch.Tensor]]:
        from mopd.hf.gather import iter_full_megatron_tensors

        return iter_full_megatron_tensors(self.chunks, tp_group=self.layout.tp_group)

    def _send_stage(self) -> tuple[int, int]:
        count = nbytes = 0
        for name, tensor in self.local_stream():
            dist.send_object_list([(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))], dst=0)
            dist.send(tensor.contiguous(), dst=0)
            count, nbytes = count + 1, nbytes + tensor_bytes(tensor)
        dist.send_object_list([None], dst=0)
        return count, nbytes

    def _feed(self, stream: Iterator[Named], version: int) -> list[dict[str, str]]:
        """Load ``stream`` into every consumer; returns the checksums per verified consumer."""
        digests: list[dict[str, str]] = [{} for _ in self.consumers]
        if self.verify:
            stream = _recording(stream, [param_dtype(c) for c in self.consumers], digests)
        try:
            if len(self.consumers) == 1:
                load_into(self.consumers[0], stream, version)
            else:
                fan_out(stream, self.consumers, version, self.bucket_bytes)
        finally:
            _drain(stream)  # the other ranks are inside the stream's collectives: finish them
        return digests

    def _check(self, digests: list[dict[str, str]]) -> None:
        for consumer, expected in zip(self.consumers, digests, strict=True):
            if param_dtype(consumer) is None or not expected:
                continue  # teachers hold an average; remote engines have no local copy
            held = engine_fingerprint(consumer, expected)
            wrong = [n for n in expected if held[n] != expected[n]]
            if wrong:
                raise EngineError(f"weight sync verify: {consumer.name!r} holds a different {wrong[0]!r} than the "
                                  f"student streamed ({len(wrong)} of {len(expected)} tensors differ)")


def tracking(teachers: Iterable) -> list:
    """The teachers that follow the student's weights (``tracks_student``: e.g. an EMA self-teacher)."""
    return [t for t in teachers if getattr(t, "tracks_student", False)]


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


def _drain(stream: Iterator) -> None:
    for _ in stream:
        pass


def _attempt(action) -> str | None:
    """Run ``action``; its error as a message (shared with the other ranks), or None."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - reported to every rank, then raised as EngineError
        return f"{type(exc).__name__}: {exc}"
    return None


class _AsConsumer:
    """A staged consumer seen as a plain consumer, so several can share one stream (fan_out)."""

    def __init__(self, staged: StagedConsumer) -> None:
        self.staged, self.name = staged, staged.name

    def update_weights(self, named_tensors: Iterable[Named], version: int) -> None:
        self.staged.send_stage(named_tensors, version)


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


__all__ = ["StagedConsumer", "SyncReport", "WeightSync", "tracking"]
