"""Rank 0's global batch reaches each rank as its data-parallel share, with only its stage's fields.

One 4-rank gloo spawn walks three layouts (TP2xPP2, PP2xDP2, PP4: first, middle and last stages,
TP peers, DP replicas) and, per layout, distributes one global batch with
``stages.batches.my_share`` while counting every byte each rank receives through torch.distributed.
The expectations are computed here, from the batch itself: which micro-batches a rank's replica
owns, which fields its stage reads, and how many bytes those are.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_on_ranks

from mopd.types import TrainBatch

pytestmark = pytest.mark.timeout(400)

WORLD = 4
LAYOUTS = ((2, 2), (1, 2), (1, 4))  # (tp, pp) on 4 ranks; dp = 4 / (tp * pp)
MICRO_BATCHES, ROWS, LENGTH, K = 4, 2, 48, 16
TEACHER_FIELDS = ("targets", "topk_ids", "topk_logprobs", "sampled_logprob", "tail_logmass", "behaviour_logprobs",
                  "teacher_index", "reward")
HEADER_SLACK = 4096
"""Bytes of the small pickled header (shapes and dtypes) that travel with each share."""


def global_batch() -> list[TrainBatch]:
    """Distinct random contents in every field and micro-batch (so a wrong share cannot match)."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(MICRO_BATCHES):
        shape, topk = (ROWS, LENGTH), (ROWS, LENGTH, K)
        out.append(TrainBatch(
            tokens=torch.randint(0, 1000, shape, generator=gen), position_ids=torch.randint(0, 50, shape, generator=gen),
            targets=torch.randint(0, 1000, shape, generator=gen), loss_mask=(torch.rand(shape, generator=gen) > 0.5).float(),
            topk_ids=torch.randint(0, 1000, topk, generator=gen, dtype=torch.int32),
            topk_logprobs=torch.randn(topk, generator=gen).bfloat16(), sampled_logprob=torch.randn(shape, generator=gen),
            tail_logmass=torch.randn(shape, generator=gen), behaviour_logprobs=torch.randn(shape, generator=gen),
            teacher_index=torch.randint(0, 3, shape, generator=gen), reward=torch.randn(ROWS, generator=gen)))
    return out


def _worker(rank: int, world: int) -> dict:
    from mopd.config import ParallelConfig
    from mopd.errors import DataError
    from mopd.parallel import destroy_parallel, init_parallel
    from mopd.stages.batches import my_share
    from mopd.sync.traffic import count_traffic

    out = {}
    for tp, pp in LAYOUTS:
        layout = init_parallel(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp), seed=0)
        with count_traffic() as traffic:
            share = my_share(global_batch() if rank == 0 else None, layout)
        row = {"dp_rank": layout.dp_rank, "pp_rank": layout.pp_rank, "received": traffic.received,
               "sent": traffic.sent, "share": share, "strides": [{n: getattr(b, n).stride() for n in b.__dataclass_fields__
                                                                    if getattr(b, n) is not None} for b in share]}
        if layout.dp > 1:
            try:
                my_share(global_batch()[:3] if rank == 0 else None, layout)
            except DataError as exc:
                row["uneven_error"] = str(exc)
        out[(tp, pp)] = row
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_on_ranks(_worker, WORLD, timeout=380)


def _needed(pp_rank: int, pp: int) -> set[str]:
    fields = {"loss_mask"}
    if pp_rank == 0:
        fields |= {"tokens", "position_ids"}
    if pp_rank == pp - 1:
        fields |= set(TEACHER_FIELDS) | {"loss_mask"}
    return fields


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"tp{tp}_pp{pp}" for tp, pp in LAYOUTS])
def test_each_rank_holds_exactly_its_replicas_micro_batches_in_the_fields_its_stage_reads(results, layout):
    tp, pp = layout
    dp = WORLD // (tp * pp)
    everything = global_batch()
    per = MICRO_BATCHES // dp
    for rank, row in enumerate(r[layout] for r in results):
        want = everything[row["dp_rank"] * per:(row["dp_rank"] + 1) * per]
        assert len(row["share"]) == per, f"rank {rank}"
        needed = _needed(row["pp_rank"], pp)
        for got, expected, strides in zip(row["share"], want, row["strides"]):
            assert got.teacher_logits is None
            for name in TrainBatch.__dataclass_fields__:
                g, e = getattr(got, name), getattr(expected, name)
                if e is None:
                    assert g is None
                    continue
                assert g.shape == e.shape and g.dtype == e.dtype, f"rank {rank} {name}"
                if name in needed:
                    assert torch.equal(g, e), f"rank {rank}: {name} differs from rank 0's micro-batch"
                else:
                    assert all(s == 0 for s in strides[name]) and not g.any(), \
                        f"rank {rank}: {name} should be a zero-stride placeholder on stage {row['pp_rank']}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"tp{tp}_pp{pp}" for tp, pp in LAYOUTS])
def test_a_rank_receives_the_bytes_of_its_stages_fields_of_its_share_and_nothing_more(results, layout):
    tp, pp = layout
    dp = WORLD // (tp * pp)
    per = MICRO_BATCHES // dp
    teacher_bytes = sum(_nbytes(getattr(b, n)) for b in global_batch()[:per] for n in TEACHER_FIELDS)
    for rank, row in enumerate(r[layout] for r in results):
        if rank == 0:
            continue  # the source
        needed = _needed(row["pp_rank"], pp)
        bulk = sum(_nbytes(getattr(b, n)) for b in row["share"] for n in needed)
        assert bulk <= row["received"] <= bulk + HEADER_SLACK, (rank, row["received"], bulk)
        if row["pp_rank"] < pp - 1:
            assert row["received"] < teacher_bytes, f"rank {rank} (stage {row['pp_rank']}) received teacher tensors"


def test_rank_zero_sends_each_replicas_share_once_and_never_the_whole_batch_to_every_rank(results):
    everything = global_batch()
    whole = sum(_nbytes(getattr(b, n)) for b in everything for n in TrainBatch.__dataclass_fields__
                if getattr(b, n) is not None)
    for layout in LAYOUTS:
        sent = results[0][layout]["sent"]
        received_elsewhere = sum(r[layout]["received"] for r in results[1:])
        assert sent < whole + 3 * HEADER_SLACK, layout
        assert received_elsewhere < (WORLD - 1) * whole, f"{layout}: every rank got the whole batch"
    # PP4: stages 1 and 2 read only the mask
    middle = [r[(1, 4)]["received"] for r in results[1:3]]
    mask = sum(_nbytes(b.loss_mask) for b in everything)
    assert all(mask <= m <= mask + HEADER_SLACK for m in middle), middle


def test_a_batch_that_does_not_split_over_the_replicas_is_an_error_on_every_rank(results):
    for layout in ((1, 2),):
        errors = [r[layout]["uneven_error"] for r in results]
        assert errors == ["3 micro-batches do not split over 2 data-parallel ranks"] * WORLD
