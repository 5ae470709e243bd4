"""Student train-step throughput on the CPU, and what the CPU compatibility layer costs.

Prints, for a small Llama-style GPTModel on one gloo rank: full ``train_step`` time and tokens/s,
and the ratio of model forward+backward time with the compat layer's TorchFunctionMode active
versus popped (with the causal mask, the forward's only CUDA request, handed over ready-made), so
the difference is the per-op Python dispatch the mode adds.

    OMP_NUM_THREADS=1 .venv/bin/python bench/student_step.py [--hidden 256 --layers 4 --seq 128]
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def _config(args):
    from mopd.config import ModelConfig, OptimizerConfig, StudentConfig, TrainConfig

    return StudentConfig(
        model=ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.hidden // 32,
                          ffn_hidden_size=args.hidden * 3, vocab_size=args.vocab, max_position_embeddings=args.seq),
        optimizer=OptimizerConfig(lr=1e-4, use_distributed_optimizer=True),
        train=TrainConfig(steps=1000, micro_batch_size=args.batch, max_seq_len=args.seq),
    )


def _batch(args):
    from mopd.types import TrainBatch

    b, s = args.batch, args.seq
    tokens = torch.randint(0, args.vocab, (b, s + 1))
    zeros = torch.zeros(b, s)
    return TrainBatch(tokens=tokens[:, :-1], position_ids=torch.arange(s).expand(b, s), targets=tokens[:, 1:],
                      loss_mask=torch.ones(b, s), topk_ids=torch.zeros(b, s, 1, dtype=torch.int32),
                      topk_logprobs=torch.zeros(b, s, 1), sampled_logprob=zeros, tail_logmass=zeros,
                      behaviour_logprobs=zeros, teacher_index=torch.zeros(b, s, dtype=torch.long),
                      reward=torch.zeros(b))


def _ce(logits, batch):
    from megatron.core import tensor_parallel

    loss = (tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch.targets) * batch.loss_mask).sum()
    return loss, {}


def _time_fwd_bwd(model, batch, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        model(batch.tokens, batch.position_ids, None).float().sum().backward()
    return (time.perf_counter() - start) / iters


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29653")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from mopd.parallel import cpu_compat, init_parallel
    from mopd.student import build_model, build_optimizer, train_step

    cfg = _config(args)
    layout = init_parallel(cfg.parallel, seed=0)
    chunks = build_model(cfg, layout)
    optimizer, scheduler = build_optimizer(cfg, chunks)
    batch = _batch(args)
    train_step(chunks, optimizer, scheduler, [batch], _ce, layout, step=0)  # warm-up
    times = [train_step(chunks, optimizer, scheduler, [batch], _ce, layout, step=i + 1) for i in range(args.iters)]
    tok_s = sum(t.tokens_per_s for t in times) / len(times)
    print(f"train_step: {args.batch}x{args.seq} tokens, {tok_s:.0f} tokens/s ({args.batch * args.seq / tok_s * 1e3:.0f} ms/step)")

    import megatron.core.fusions.fused_softmax as fused_softmax

    plain = build_model(cfg, layout, wrap_ddp=False)[0]
    _time_fwd_bwd(plain, batch, 1)
    with_mode = _time_fwd_bwd(plain, batch, args.iters)
    # Without the mode the only CUDA request left in the forward is the causal mask: hand it over ready.
    mask, real_mask = fused_softmax.get_default_causal_mask(args.seq), fused_softmax.get_default_causal_mask
    fused_softmax.get_default_causal_mask = lambda sq: mask
    mode = cpu_compat._state["mode"]
    mode.__exit__(None, None, None)
    try:
        without = _time_fwd_bwd(plain, batch, args.iters)
    finally:
        mode.__enter__()
        fused_softmax.get_default_causal_mask = real_mask
    print(f"forward+backward: {with_mode * 1e3:.1f} ms with the compat mode, {without * 1e3:.1f} ms without: "
          f"ratio {with_mode / without:.3f}")


if __name__ == "__main__":
    main()
