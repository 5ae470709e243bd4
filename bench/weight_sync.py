"""Weight-sync bandwidth: Megatron student -> embedded engine, against a plain memory copy of the same bytes.

    OMP_NUM_THREADS=1 .venv/bin/python bench/weight_sync.py [--tp 1 --pp 1 --hidden 512 --layers 4 --repeats 5]

Spawns tp*pp gloo ranks on the CPU, builds the student (fp32 by default), and on rank 0 an HF model of
the same shape inside an EmbeddedEngine. It times ``WeightSync.sync`` (TP gathers, the HF mapping, the
point-to-point hop from later pipeline stages to rank 0 and the engine's ``copy_``) and, in the same
process, ``dst.copy_(src)`` over preallocated tensors of the streamed shapes: the floor any sync of
those bytes pays. Medians of ``--repeats`` runs; it prints both bandwidths and their ratio.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _configs(args):
    from mopd.config import Dtype, ModelConfig, ParallelConfig, PrecisionConfig, StudentConfig

    model = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8, num_query_groups=4,
                        ffn_hidden_size=args.hidden * 8 // 3 // 64 * 64, vocab_size=args.vocab,
                        max_position_embeddings=256)
    return StudentConfig(model=model, parallel=ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp),
                         precision=PrecisionConfig(dtype=Dtype(args.dtype)))


def _engine(model_cfg, dtype: torch.dtype):
    import transformers

    from mopd.hf.families import hf_config_from_model
    from mopd.rollout.embedded import EmbeddedEngine

    config = transformers.AutoConfig.for_model(**hf_config_from_model(model_cfg, dtype=str(dtype).removeprefix("torch.")))
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    return EmbeddedEngine(model, eos_token_ids=[1], pad_token_id=0, name="bench")


class _PlainCopy:
    """Preallocated, already-touched source and destination tensors of the streamed shapes."""

    def __init__(self, shapes: list[tuple[tuple[int, ...], torch.dtype]]) -> None:
        self.src = [torch.randn(s).to(d) for s, d in shapes]
        self.dst = [torch.empty_like(t) for t in self.src]
        self.seconds()  # first touch of dst outside the timing

    def seconds(self) -> float:
        start = time.perf_counter()
        for d, s in zip(self.dst, self.src):
            d.copy_(s)
        return time.perf_counter() - start


def _worker(rank: int, world: int, port: int, args) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from mopd.parallel import destroy_parallel, init_parallel
    from mopd.student import build_model
    from mopd.sync import WeightSync

    cfg = _configs(args)
    layout = init_parallel(cfg.parallel, seed=0)
    chunks = build_model(cfg, layout, wrap_ddp=False)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    engine = _engine(cfg.model, dtype) if rank == 0 else None
    sync = WeightSync(chunks, cfg.model, layout, [engine] if engine else [], bucket_bytes=args.bucket_mib << 20)
    sync.sync(0)  # warm-up: first-touch of buffers, gloo connections
    from mopd.hf.mapping import expected_hf_shapes

    baseline = _PlainCopy([(shape, dtype) for shape in expected_hf_shapes(cfg.model).values()]) if rank == 0 else None
    sync_times, copy_times = [], []
    for version in range(1, args.repeats + 1):
        report = sync.sync(version)
        sync_times.append(report.seconds)
        if rank == 0:
            copy_times.append(baseline.seconds())
    if rank == 0:
        t_sync, t_copy = statistics.median(sync_times), statistics.median(copy_times)
        mib = report.nbytes / 2**20
        print(f"weight sync tp={args.tp} pp={args.pp} {args.dtype}: {mib:.1f} MiB streamed, {report.tensors} tensors, "
              f"bucket {args.bucket_mib} MiB, median of {args.repeats}")
        print(f"  WeightSync -> EmbeddedEngine : {t_sync * 1e3:8.1f} ms  {mib / t_sync:8.0f} MiB/s")
        print(f"  torch copy_ of the same bytes: {t_copy * 1e3:8.1f} ms  {mib / t_copy:8.0f} MiB/s")
        print(f"  ratio sync / copy time        : {t_sync / t_copy:8.2f}x")
    destroy_parallel(process_group=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--bucket-mib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    world = args.tp * args.pp
    torch.multiprocessing.spawn(_worker, args=(world, _free_port(), args), nprocs=world, join=True)


if __name__ == "__main__":
    main()
