"""Top-K transport: the packed format round-trips, stays within 6K+8 bytes per token, and reaches DP ranks."""

from __future__ import annotations

import os
import socket

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mopd.errors import TeacherError
from mopd.rollout.scoring import tail_logmass
from mopd.teachers.transport import bytes_per_token, distribute, pack, pack_batch, unpack, unpack_batch
from mopd.types import TeacherScores


def random_scores(n: int, k: int, seed: int, teacher: str = "math") -> TeacherScores:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 1000, generator=g, dtype=torch.float64) * 3
    lp = torch.log_softmax(logits, -1)
    top = torch.topk(lp, k, -1)
    return TeacherScores(
        topk_ids=top.indices.to(torch.int32),
        topk_logprobs=top.values.float(),
        sampled_logprob=lp[:, 7].float(),
        tail_logmass=tail_logmass(top.values),
        teacher=teacher,
    )


def test_pack_round_trips_ids_and_scalars_exactly_and_logprobs_at_bf16():
    s = random_scores(37, 64, seed=1)
    back = unpack(pack(s))
    assert back.teacher == "math"
    assert torch.equal(back.topk_ids, s.topk_ids)
    assert back.topk_logprobs.dtype == torch.bfloat16
    assert torch.equal(back.topk_logprobs, s.topk_logprobs.to(torch.bfloat16))
    assert torch.equal(back.sampled_logprob, s.sampled_logprob)
    assert torch.equal(back.tail_logmass, s.tail_logmass)
    fp16 = unpack(pack(s, torch.float16))
    assert torch.equal(fp16.topk_logprobs, s.topk_logprobs.to(torch.float16))


def test_packed_size_per_token_is_at_most_6k_plus_8_bytes_for_k_64():
    k = 64
    small, large = len(pack(random_scores(10, k, 2))), len(pack(random_scores(1010, k, 2)))
    per_token = (large - small) / 1000
    assert per_token == 6 * k + 8 == bytes_per_token(k) == 392
    assert large <= 1010 * (6 * k + 8) + 64  # the header and one segment length add under 64 bytes
    assert large < 1010 * 12 * k  # int64 ids + fp32 logprobs would need 12K per token


def test_pack_batch_keeps_segments_and_their_order():
    parts = [random_scores(n, 8, seed=n) for n in (3, 0, 5)]
    back = unpack_batch(pack_batch(parts))
    assert [p.num_tokens for p in back] == [3, 0, 5]
    assert unpack_batch(pack_batch([])) == []
    for a, b in zip(parts, back):
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.sampled_logprob, b.sampled_logprob)


def test_unpack_rejects_truncated_and_foreign_buffers_naming_the_teacher():
    buf = pack(random_scores(4, 8, 3, teacher="code"))
    with pytest.raises(TeacherError, match="teacher 'code' has 100 bytes"):
        unpack(buf[:100])
    with pytest.raises(TeacherError, match="not a TeacherScores buffer"):
        unpack(b"XXXX" + buf[4:])
    with pytest.raises(TeacherError, match="shorter than"):
        unpack(b"MTS1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distribute_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        expected = [[random_scores(5, 16, 10), random_scores(2, 16, 11)], [random_scores(9, 16, 12)]]
        results = []
        # A rank with no rollouts this step gets an empty list.
        empty = distribute([[], expected[1]] if rank == 0 else None, src=0)
        results.append(f"empty:{[g.num_tokens for g in empty]}")
        for src in (0, 1):  # each rank in turn is the one that fetched the scores
            got = distribute(expected if rank == src else None, src=src)
            mine = expected[rank]
            ok = len(got) == len(mine) and all(
                torch.equal(g.topk_ids, m.topk_ids)
                and torch.equal(g.topk_logprobs, m.topk_logprobs.to(torch.bfloat16))
                and torch.equal(g.tail_logmass, m.tail_logmass)
                for g, m in zip(got, mine)
            )
            results.append(f"src{src}:{'ok' if ok else 'MISMATCH'}:{[g.num_tokens for g in got]}")
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(" ".join(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_distribute_sends_each_of_two_gloo_ranks_exactly_its_own_scores(tmp_path):
    mp.spawn(_distribute_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0.txt").read_text() == "empty:[] src0:ok:[5, 2] src1:ok:[5, 2]"
    assert (tmp_path / "rank1.txt").read_text() == "empty:[9] src0:ok:[9] src1:ok:[9]"
