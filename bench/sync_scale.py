"""Bytes through rank 0 and bytes received per rank, per opd step: weight sync and batch distribution,
before and after one sender per pipeline stage and per-replica, per-stage batch shares.

    OMP_NUM_THREADS=1 .venv/bin/python bench/sync_scale.py [--layouts 2x2,1x2,1x4 --layers 8 --hidden 256
        --vocab 8192 --rollouts 16 --seq 512 --top-k 64 --servers 2]

Spawns 4 gloo ranks on the CPU. For each TPxPP layout (DP = 4 / (TP*PP)) it builds the Megatron
student and, on rank 0, ``--servers`` SGLang protocol servers (tests/sglang_protocol_server.py:
SGLang 0.5.23's schema, real weight-update groups over gloo), and measures one step of each path:

* weight sync, before: ``WeightSync(consumers=[engine])``, rank 0 the only sender (the opd loop up to
  this change; still the stage-start sync): later stages send every tensor to rank 0, which
  broadcasts the whole model to the servers.
  After: ``stage_senders.rollout_weight_sync``: each stage's first rank sends its own layers over its
  own group, one stage at a time.
* batch distribution, before: the global batch pickled and broadcast to every rank, each keeping its
  DP share (``stages/batches.py::my_share`` at 1c27583, copied below as ``whole_batch_share``).
  After: ``my_share``: rank 0 sends each (replica, stage) leader its share's fields for that stage,
  one buffer per field, and the leader broadcasts it over its TP group.

Bytes are counted by ``mopd.sync.traffic`` (what each rank hands to torch.distributed; a broadcast
costs its root the payload once; TP all_gathers of the sync count (TP-1) x shard on both sides), so
the numbers are exact and independent of machine load. No wall times. Each path's results are
checked (servers hold the student's weights; the new shares equal the old ones on every field a
stage reads) before its bytes are printed.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
WORLD = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _student_config(args, tp: int, pp: int):
    from mopd.config import ModelConfig, ParallelConfig, StudentConfig

    model = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8, num_query_groups=4,
                        ffn_hidden_size=args.hidden * 8 // 3 // 64 * 64, vocab_size=args.vocab,
                        max_position_embeddings=args.seq)
    return StudentConfig(model=model, parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))


def global_batch(args):
    """``--rollouts`` sequences of ``--seq`` positions in micro-batches of 2, top-K bf16 teacher scores."""
    from mopd.types import TrainBatch

    gen = torch.Generator().manual_seed(0)
    b, s, k = 2, args.seq, args.top_k
    out = []
    for _ in range(args.rollouts // b):
        out.append(TrainBatch(
            tokens=torch.randint(0, args.vocab, (b, s), generator=gen), position_ids=torch.arange(s).repeat(b, 1),
            targets=torch.randint(0, args.vocab, (b, s), generator=gen), loss_mask=torch.ones(b, s),
            topk_ids=torch.randint(0, args.vocab, (b, s, k), generator=gen, dtype=torch.int32),
            topk_logprobs=torch.randn(b, s, k, generator=gen).bfloat16(), sampled_logprob=torch.randn(b, s, generator=gen),
            tail_logmass=torch.randn(b, s, generator=gen), behaviour_logprobs=torch.randn(b, s, generator=gen),
            teacher_index=torch.zeros(b, s, dtype=torch.long), reward=torch.randn(b, generator=gen)))
    return out


def whole_batch_share(batches, layout):
    """The batch distribution before this change (stages/batches.py::my_share at 1c27583)."""
    from mopd.stages.context import broadcast

    batches = broadcast(batches)
    per_rank = len(batches) // layout.dp
    return batches[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]


def _servers(cfg, n: int):
    import transformers

    from mopd.hf.families import hf_config_from_model
    from mopd.rollout.embedded import EmbeddedEngine
    from sglang_protocol_server import ProtocolServer
    from sglang_wheel import load_api_types

    api = load_api_types()
    if api is None:
        sys.exit("bench/sync_scale.py needs sglang/api/v1/api_types.py: pip install --no-deps sglang==0.5.23")
    config = transformers.AutoConfig.for_model(**hf_config_from_model(cfg.model, dtype="float32"))
    return [ProtocolServer(EmbeddedEngine(transformers.AutoModelForCausalLM.from_config(config).eval(),
                                          eos_token_ids=[1], pad_token_id=0), api).start() for _ in range(n)]


def _client(urls, tp: int, pp: int):
    from mopd.config import SGLangConfig
    from mopd.rollout.sglang_client import SGLangEngine, WeightSyncOptions

    sync = WeightSyncOptions(backend="gloo", master_address="127.0.0.1", group_name=f"bench-{tp}x{pp}",
                             bucket_bytes=4 << 20, timeout_s=300)
    return SGLangEngine(SGLangConfig(endpoints=urls, request_timeout_s=300.0), name="rollout", sync=sync)


def _measure(step) -> dict:
    """Every rank's (sent, received) bytes for ``step()``, gathered on every rank."""
    import torch.distributed as dist

    from mopd.sync.traffic import count_traffic

    with count_traffic() as traffic:
        out = step()
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (traffic.sent, traffic.received))
    return {"bytes": rows, "out": out}


def _check_servers(servers, chunks, layout, vocab: int, what: str) -> None:
    """Every server's logits equal the student's (last stage computes them; rank 0 compares)."""
    import torch.distributed as dist

    from dist_utils import full_logits
    from mopd.hf.gather import unwrap

    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    student = full_logits(unwrap(chunks[0]).eval(), ids, layout, vocab)
    box = [student]
    dist.broadcast_object_list(box, src=layout.world_size - 1)
    if layout.rank == 0:
        for i, server in enumerate(servers):
            with torch.no_grad():
                diff = (server.engine.model(ids).logits.float() - box[0]).abs().max().item()
            if diff > 1e-4:
                raise SystemExit(f"{what}: server {i} differs from the student by {diff:.3g}")


def _check_shares(before, after, layout) -> None:
    from mopd.stages.batches import stage_fields

    for old, new in zip(before, after, strict=True):
        for name in stage_fields(layout.pp_rank, layout.pp):
            a, b = getattr(old, name), getattr(new, name)
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                raise SystemExit(f"rank {layout.rank}: my_share's {name} differs from the whole-batch broadcast's")


def _layout_run(args, tp: int, pp: int) -> dict:
    import torch.distributed as dist

    from mopd.parallel import destroy_parallel, init_parallel
    from mopd.stages.batches import my_share
    from mopd.student import build_model
    from mopd.sync import WeightSync
    from mopd.sync.stage_senders import rollout_weight_sync

    cfg = _student_config(args, tp, pp)
    layout = init_parallel(cfg.parallel, seed=0)
    chunks = build_model(cfg, layout, wrap_ddp=False)
    servers = _servers(cfg, args.servers) if layout.rank == 0 else []
    client = _client([s.url for s in servers], tp, pp) if layout.rank == 0 else None
    consumers = [client] if client else []
    result = {}
    before = WeightSync(chunks, cfg.model, layout, consumers)
    result["sync_before"] = _measure(lambda: before.sync(1))
    _check_servers(servers, chunks, layout, args.vocab, "weight sync before")
    after = rollout_weight_sync(chunks, cfg.model, layout, consumers, client)
    with torch.no_grad():  # so the check below sees this sync's weights, not the previous one's
        for server in servers:
            for param in server.engine.model.parameters():
                param.zero_()
    result["sync_after"] = _measure(lambda: after.sync(2))
    _check_servers(servers, chunks, layout, args.vocab, "weight sync after")
    after.close()
    batches = global_batch(args) if layout.rank == 0 else None
    result["batch_before"] = _measure(lambda: whole_batch_share(batches, layout))
    result["batch_after"] = _measure(lambda: my_share(batches, layout))
    _check_shares(result["batch_before"].pop("out"), result["batch_after"].pop("out"), layout)
    for key in ("sync_before", "sync_after"):
        del result[key]["out"]
    if client is not None:
        client.close()
    for server in servers:
        server.stop()
    dist.barrier()
    destroy_parallel()
    result["model_mib"] = sum(p.numel() * 4 for p in _hf_shapes(cfg)) / 2**20
    return result


def _hf_shapes(cfg):
    from mopd.hf.mapping import expected_hf_shapes

    return [torch.empty(s, device="meta") for s in expected_hf_shapes(cfg.model).values()]


def _worker(rank: int, port: int, args) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", MOPD_FORCE_CPU="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    rows = {}
    for spec in args.layouts.split(","):
        tp, pp = (int(x) for x in spec.split("x"))
        rows[(tp, pp)] = _layout_run(args, tp, pp)
    if rank == 0:
        _print(args, rows)
    dist.destroy_process_group()


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f}"


def _ratio(before: int, after: int) -> str:
    """before / after; "-" where both are control bytes only (< 1 KiB)."""
    if max(before, after) < 1024:
        return "       -"
    return f"{before / max(after, 1):7.2f}x" if after >= 1024 else "   >1000x"


def _print(args, rows: dict) -> None:
    batch_mib = sum(t.numel() * t.element_size() for b in global_batch(args) for t in
                    (b.tokens, b.position_ids, b.targets, b.loss_mask, b.topk_ids, b.topk_logprobs, b.sampled_logprob,
                     b.tail_logmass, b.behaviour_logprobs, b.teacher_index, b.reward)) / 2**20
    print(f"sync_scale: {WORLD} gloo ranks, {args.servers} SGLang protocol servers; student {args.layers} layers, "
          f"hidden {args.hidden}, vocab {args.vocab} (fp32); global batch {args.rollouts} x {args.seq} tokens, "
          f"top-{args.top_k} ({batch_mib:.2f} MiB). MiB per step; ratio = before / after.")
    for (tp, pp), r in rows.items():
        dp = WORLD // (tp * pp)
        print(f"\nTP{tp} x PP{pp} x DP{dp}  (HF model {r['model_mib']:.2f} MiB)")
        print(f"  {'':30s}{'before: sent':>13s} {'received':>9s}   {'after: sent':>12s} {'received':>9s}   "
              f"{'ratio: through':>14s} {'received':>9s}")
        for what, key in (("weight sync", "sync"), ("batch distribution", "batch")):
            b, a = r[f"{key}_before"]["bytes"], r[f"{key}_after"]["bytes"]
            print(f"  {what}")
            for rank in range(WORLD):
                print(f"  {f'  rank {rank}':30s}{_mib(b[rank][0]):>13s} {_mib(b[rank][1]):>9s}   {_mib(a[rank][0]):>12s} "
                      f"{_mib(a[rank][1]):>9s}   {_ratio(sum(b[rank]), sum(a[rank])):>14s} {_ratio(b[rank][1], a[rank][1]):>9s}")
        total_b = sum(sum(r[f"{k}_before"]["bytes"][0]) for k in ("sync", "batch"))
        total_a = sum(sum(r[f"{k}_after"]["bytes"][0]) for k in ("sync", "batch"))
        print(f"  step, through rank 0 (sent + received): {_mib(total_b)} -> {_mib(total_a)}  {_ratio(total_b, total_a)}")
        for k, what in (("sync", "weight sync"), ("batch", "batch distribution")):
            worst_b = max(r[f"{k}_before"]["bytes"][i][1] for i in range(WORLD))
            worst_a = max(r[f"{k}_after"]["bytes"][i][1] for i in range(WORLD))
            sender_b = max(r[f"{k}_before"]["bytes"][i][0] for i in range(WORLD))
            sender_a = max(r[f"{k}_after"]["bytes"][i][0] for i in range(WORLD))
            print(f"  {what}: most sent by one rank {_mib(sender_b)} -> {_mib(sender_a)} {_ratio(sender_b, sender_a)}; "
                  f"most received by one rank {_mib(worst_b)} -> {_mib(worst_a)} {_ratio(worst_b, worst_a)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", default="2x2,1x2,1x4", help="TPxPP per layout, comma-separated (DP = 4 / (TP*PP))")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--servers", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), args), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
