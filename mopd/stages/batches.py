"""From rollouts to this rank's micro-batches, and the supervised (one-hot teacher) case.

Global rank 0 generates, scores and packs the whole global batch; ``my_share`` hands each rank its
data-parallel replica's micro-batches, and of those only the fields its pipeline stage reads
(``stage_fields``): the first stage embeds ``tokens``/``position_ids``, the last computes the loss
from the targets and teacher tensors, and every stage counts the global batch's tokens from
``loss_mask``. SFT is distillation from a one-hot "reference" teacher: top-1 id = the reference
token with logprob 0, so the same packing, train step and metrics serve both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from mopd.config import ObjectiveConfig, ObjectiveName, StudentConfig
from mopd.errors import DataError
from mopd.objectives import build_loss_fn
from mopd.parallel import ParallelLayout
from mopd.stages.context import broadcast
from mopd.student import padded_vocab_size
from mopd.types import LossFn, Prompt, Rollout, Routing, TeacherScores, TrainBatch

REFERENCE = "reference"

FIRST_STAGE_FIELDS = frozenset({"tokens", "position_ids"})
"""Read by the embedding only: later stages take the previous stage's activations (RoPE needs only
the sequence length there)."""
EVERY_STAGE_FIELDS = frozenset({"loss_mask"})
"""``train_step`` counts the global batch's valid tokens on every rank (the loss normaliser)."""


def reference_rollout(prompt: Prompt, tokenizer, max_new_tokens: int) -> Rollout:
    """The prompt's reference answer (plus EOS) as if the student had sampled it."""
    if prompt.reference is None:
        raise DataError(f"prompt {prompt.index} (domain {prompt.domain!r}) has no reference answer for SFT")
    ids = tokenizer(prompt.reference, add_special_tokens=False)["input_ids"][:max_new_tokens - 1]
    response = torch.tensor([*ids, tokenizer.eos_token_id], dtype=torch.long)
    return Rollout(prompt_ids=prompt.ids, response_ids=response, behaviour_logprobs=torch.zeros(len(response)),
                   finish="stop", weight_version=0, domain=prompt.domain, prompt_index=prompt.index,
                   pi=prompt.pi, reference=prompt.reference, text=prompt.reference)


def one_hot_scores(rollouts: Sequence[Rollout]) -> tuple[Routing, TeacherScores]:
    """Scores of a teacher that puts all its mass on each response token."""
    ids = torch.cat([r.response_ids for r in rollouts]).to(torch.int32)
    n = ids.numel()
    scores = TeacherScores(topk_ids=ids[:, None], topk_logprobs=torch.zeros(n, 1),
                           sampled_logprob=torch.zeros(n), tail_logmass=torch.full((n,), float("-inf")),
                           teacher=REFERENCE)
    return Routing(teachers=(REFERENCE,), index=torch.zeros(n, dtype=torch.long)), scores


# ---------------------------------------------------------------------------------------- distribution


def stage_fields(pp_rank: int, pp: int) -> tuple[str, ...]:
    """The TrainBatch fields pipeline stage ``pp_rank`` of ``pp`` reads (all of them when pp == 1):
    the first stage the inputs, the last everything else (targets, teacher tensors, reward)."""
    first, last = pp_rank == 0, pp_rank == pp - 1
    return tuple(f.name for f in fields(TrainBatch)
                 if f.name in EVERY_STAGE_FIELDS or (first and f.name in FIRST_STAGE_FIELDS)
                 or (last and f.name not in FIRST_STAGE_FIELDS))


def my_share(batches: list[TrainBatch] | None, layout: ParallelLayout) -> list[TrainBatch]:
    """This rank's micro-batches: its data-parallel replica's contiguous share of rank 0's list,
    holding the fields its pipeline stage reads (``stage_fields``). Collective; others pass None.

    Rank 0 sends each (replica, stage)'s share to that stage's first TP rank, one contiguous buffer
    per field (``send``), and that rank broadcasts it over its TP group; rank 0 never sends a
    replica's share twice, nor teacher tensors to a first or middle stage. A field a stage does not
    read keeps its shape and dtype as a zero-stride placeholder (no bytes sent, none allocated).
    """
    count = broadcast(_share_size(batches, layout.dp) if layout.rank == 0 else None)
    if isinstance(count, str):
        raise DataError(count)
    if layout.world_size == 1:
        return list(batches)
    packed = None
    if layout.rank == 0:
        for d in range(layout.dp):
            for p in range(layout.pp):
                share = _Packed.of(batches[d * count:(d + 1) * count], stage_fields(p, layout.pp), layout.device)
                leader = _leader(layout, d, p)
                if leader == 0:
                    packed = share
                else:
                    share.send(leader)
    elif layout.tp_rank == 0:
        packed = _Packed.receive(0, layout.device)
    if layout.tp > 1:
        packed = _Packed.tp_broadcast(packed, layout.tp_group, layout.device)
    return packed.unpack()


def _share_size(batches: list[TrainBatch] | None, dp: int) -> int | str:
    """Micro-batches per data-parallel replica, or the reason there is no such number."""
    if not batches:
        return "rank 0 packed no micro-batches for this step"
    if len(batches) % dp:
        return f"{len(batches)} micro-batches do not split over {dp} data-parallel ranks"
    return len(batches) // dp


def _leader(layout: ParallelLayout, dp_rank: int, pp_rank: int) -> int:
    """Global rank of TP rank 0 of (replica dp_rank, stage pp_rank): Megatron's tp-dp-pp order."""
    return layout.tp * (dp_rank + layout.dp * pp_rank)


@dataclass(frozen=True)
class _Header:
    """What a receiver needs to rebuild the micro-batches: every field's dtype and per-micro-batch
    shapes (None for a field the batch lacks), and which fields travel, in order."""

    count: int
    specs: dict[str, tuple[torch.dtype, list[tuple[int, ...]]] | None]
    sent: tuple[str, ...]


@dataclass(frozen=True)
class _Packed:
    """Micro-batches as one contiguous 1-D buffer per sent field."""

    header: _Header
    buffers: list[torch.Tensor]

    @property
    def sent(self) -> tuple[str, ...]:
        return self.header.sent

    @classmethod
    def of(cls, batches: list[TrainBatch], wanted: tuple[str, ...], device: torch.device) -> _Packed:
        specs: dict = {}
        for f in fields(TrainBatch):
            values = [getattr(b, f.name) for b in batches]
            if all(v is None for v in values):
                specs[f.name] = None
                continue
            if any(v is None for v in values) or len({v.dtype for v in values}) != 1:
                raise DataError(f"TrainBatch.{f.name}: micro-batches of one step must all have it, in one dtype")
            specs[f.name] = (values[0].dtype, [tuple(v.shape) for v in values])
        sent = tuple(n for n in wanted if specs[n] is not None)
        buffers = [torch.cat([getattr(b, n).reshape(-1) for b in batches]).to(device) for n in sent]
        return cls(_Header(len(batches), specs, sent), buffers)

    def send(self, dst: int) -> None:
        dist.send_object_list([self.header], dst=dst)
        for buffer in self.buffers:
            dist.send(buffer, dst=dst)

    @classmethod
    def receive(cls, src: int, device: torch.device) -> _Packed:
        box = [None]
        dist.recv_object_list(box, src=src)
        header: _Header = box[0]
        buffers = [torch.empty(_numel(header, n), dtype=header.specs[n][0], device=device) for n in header.sent]
        for buffer in buffers:
            dist.recv(buffer, src=src)
        return cls(header, buffers)

    @classmethod
    def tp_broadcast(cls, packed: _Packed | None, group, device: torch.device) -> _Packed:
        """The TP group's first rank's ``packed`` on every rank of the group."""
        box = [None if packed is None else packed.header]
        dist.broadcast_object_list(box, group=group, group_src=0)
        header: _Header = box[0]
        if packed is None:
            packed = cls(header, [torch.empty(_numel(header, n), dtype=header.specs[n][0], device=device)
                                  for n in header.sent])
        for buffer in packed.buffers:
            dist.broadcast(buffer, group=group, group_src=0)
        return packed

    def unpack(self) -> list[TrainBatch]:
        parts = {n: iter(buf.split([_prod(s) for s in self.header.specs[n][1]]))
                 for n, buf in zip(self.sent, self.buffers, strict=True)}
        out = []
        for i in range(self.header.count):
            values = {}
            for name, spec in self.header.specs.items():
                if spec is None:
                    values[name] = None
                elif name in parts:
                    values[name] = next(parts[name]).view(spec[1][i])
                else:  # not read on this stage: shape and dtype only
                    values[name] = torch.zeros((), dtype=spec[0], device=self.buffers[0].device).expand(spec[1][i])
            out.append(TrainBatch(**values))
        return out


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _numel(header: _Header, name: str) -> int:
    return sum(_prod(s) for s in header.specs[name][1])


# ---------------------------------------------------------------------------------------- losses


def loss_fn_for(cfg: StudentConfig, layout: ParallelLayout, objectives: dict[int, list[ObjectiveConfig]],
                teacher_names: Sequence[str], coefs: dict[int, float] | None = None) -> LossFn:
    """The objectives on this TP rank's vocabulary slice."""
    local = padded_vocab_size(cfg.model, layout.tp) // layout.tp
    return build_loss_fn(objectives, tuple(teacher_names), tp_group=layout.tp_group if layout.tp > 1 else None,
                         vocab_start=layout.tp_rank * local, vocab_size=cfg.model.vocab_size,
                         chunk_tokens=cfg.train.loss_chunk_tokens, teacher_coefs=coefs)


def sft_loss_fn(cfg: StudentConfig, layout: ParallelLayout) -> LossFn:
    return loss_fn_for(cfg, layout, {0: [ObjectiveConfig(name=ObjectiveName.cross_entropy)]}, (REFERENCE,))
