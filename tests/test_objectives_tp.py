"""TP=2 (vocabulary split over 2 gloo ranks) gives the same loss, gradients and metrics as TP=1.

One spawn runs every case: all objectives, K larger than the shard, a rank holding only padding columns,
two teachers."""

from __future__ import annotations

import torch
import torch.distributed as dist
from dist_utils import run_on_ranks
from test_objectives import CASES, make_case

from mopd.config import ObjectiveConfig, ObjectiveName
from mopd.objectives import build_loss_fn
from mopd.types import TrainBatch

V_PAD = 24


def tp_cases() -> dict[str, dict]:
    cases = {name: dict(objectives={0: [cfg]}, seed=i) for i, (name, cfg) in enumerate(CASES.items())}
    cases["K=14 larger than the 12-column shard"] = dict(
        objectives={0: [ObjectiveConfig(), ObjectiveConfig(name=ObjectiveName.jsd)]}, seed=40, k=14)
    cases["vocab 11: rank 1 holds only padding"] = dict(
        objectives={0: [ObjectiveConfig(), ObjectiveConfig(name=ObjectiveName.reverse_kl_student_topk,
                                                            student_top_k=5)]}, seed=41, vocab_size=11, k=4)
    cases["student top-k beyond the vocabulary"] = dict(
        objectives={0: [ObjectiveConfig(name=ObjectiveName.reverse_kl_student_topk, student_top_k=50)]}, seed=42)
    cases["two teachers"] = dict(
        objectives={0: [ObjectiveConfig(name=ObjectiveName.aopd)],
                    1: [ObjectiveConfig(name=ObjectiveName.rlsd), ObjectiveConfig(coef=0.1)]}, seed=43, teachers=2)
    cross = [ObjectiveConfig(name=ObjectiveName.reverse_kl_sampled, importance_ratio=True),
             ObjectiveConfig(name=ObjectiveName.forward_kl_topk), ObjectiveConfig(name=ObjectiveName.uld, coef=0.3)]
    cases["cross-tokenizer chunks"] = dict(objectives={0: cross}, seed=44, chunked=True)
    cases["cross-tokenizer chunks, K=14 beyond the shard"] = dict(objectives={0: cross}, seed=45, chunked=True, k=14)
    return cases


def with_chunks(batch: TrainBatch) -> TrainBatch:
    """Cross-tokenizer chunks over make_case's positions: sizes 2, 1, 2, 1, 2 along each row, one single
    student token against 3 teacher tokens (a ULD position), the last position of row 0 unscored."""
    b, s = batch.loss_mask.shape
    pos = torch.arange(s).expand(b, s)
    chunk = (pos * 2) // 3
    size = torch.bincount(chunk[0])[chunk]
    width = torch.where(size == 2, 2, 1).int()
    width[:, 5] = 3
    chunk[0, -1] = -1
    fields = {f: getattr(batch, f) for f in batch.__dataclass_fields__}
    return TrainBatch(**{**fields, "chunk_index": chunk, "chunk_teacher_tokens": torch.where(chunk >= 0, width, 0)})


def _run(logits: torch.Tensor, batch: TrainBatch, objectives, vocab_size: int, group, vocab_start: int):
    logits = logits.detach().clone().requires_grad_(True)
    fn = build_loss_fn(objectives, ["math", "code"], tp_group=group, vocab_start=vocab_start,
                       vocab_size=vocab_size, chunk_tokens=4)
    loss, metrics = fn(logits, batch)
    loss.backward()
    return loss.detach(), logits.grad, {k: v.detach() for k, v in metrics.items()}


def _worker(rank: int, world: int) -> dict[str, tuple]:
    v_local = V_PAD // world
    lo, hi = rank * v_local, (rank + 1) * v_local
    out = {}
    for name, case in tp_cases().items():
        vocab_size = case.get("vocab_size", 21)
        student, batch = make_case(case["seed"], v_pad=V_PAD, vocab_size=vocab_size, k=case.get("k", 5),
                                   teachers=case.get("teachers", 1))
        if case.get("chunked"):
            batch = with_chunks(batch)
        full = student.float()
        tp1 = _run(full, batch, case["objectives"], vocab_size, None, 0)
        fields = {f: getattr(batch, f) for f in batch.__dataclass_fields__}
        fields["teacher_logits"] = batch.teacher_logits[..., lo:hi].contiguous()
        tp2 = _run(full[..., lo:hi].contiguous(), TrainBatch(**fields), case["objectives"], vocab_size,
                   dist.group.WORLD, lo)
        out[name] = (tp1[0], tp2[0], tp1[1][..., lo:hi], tp2[1], tp1[2], tp2[2])
    return out


def test_tensor_parallel_two_ranks_match_one_rank_for_every_objective():
    results = run_on_ranks(_worker, 2, timeout=240)
    for rank, out in enumerate(results):
        assert set(out) == set(tp_cases())
        for name, (loss1, loss2, grad1, grad2, m1, m2) in out.items():
            where = f"{name} (rank {rank})"
            assert torch.isfinite(loss1), where
            assert torch.allclose(loss1, loss2, rtol=1e-5, atol=1e-6), (where, float(loss1), float(loss2))
            scale = grad1.abs().max().clamp(min=1e-12)
            assert float((grad1 - grad2).abs().max() / scale) < 1e-5, where
            assert m1.keys() == m2.keys(), where
            for key in m1:
                assert torch.allclose(m1[key], m2[key], rtol=1e-5, atol=1e-5), (where, key)
    # The padding-only rank still got the same (zero) gradient as TP=1 on its columns.
    padding_case = results[1]["vocab 11: rank 1 holds only padding"]
    assert torch.count_nonzero(padding_case[3]) == 0
