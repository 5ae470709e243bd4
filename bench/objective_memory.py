"""Peak extra memory of the top-K forward KL (forward + backward): mopd's chunked vocab-parallel loss
against a naive fp32 ``log_softmax`` + gather over the full vocabulary, side by side.

    python bench/objective_memory.py [--tokens 8192] [--vocab 32768] [--k 64] [--dtype bf16]
                                     [--chunk-tokens 512] [--device cpu|cuda]

"Extra" is memory above what the logits and the teacher tensors already hold, at the highest point of
one forward + backward, and includes the [N, V] logits gradient (both implementations must produce it).
CPU: each implementation runs in a fresh subprocess; the peak is the kernel's resident high-water mark
(VmHWM, reset through /proc/self/clear_refs after the inputs are built) minus the resident size at that
point. tracemalloc would not see torch's allocations; RSS does. CUDA: the caching allocator's
``max_memory_allocated`` minus ``memory_allocated`` before the step, in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Measurement:
    impl: str
    logits_bytes: int
    extra_bytes: int
    seconds: float
    loss: float

    @property
    def ratio(self) -> float:
        """Peak extra memory in units of the logits' own size."""
        return self.extra_bytes / self.logits_bytes


def _inputs(tokens: int, vocab: int, k: int, dtype: torch.dtype, device: str):
    """Logits [1, N, V] (filled chunk by chunk: no transient full-size copy) and a TrainBatch."""
    from mopd.types import TrainBatch

    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.empty(1, tokens, vocab, dtype=dtype, device=device)
    for a in range(0, tokens, 256):
        logits[0, a:a + 256].normal_(generator=g).mul_(2.0)
    j = torch.arange(k, device=device)
    ids = ((torch.arange(tokens, device=device)[:, None] * 7919 + j * 509) % vocab).int()  # distinct per row
    lp = torch.log_softmax(torch.randn(tokens, k + 1, generator=g, device=device) * 3, -1)
    n = torch.ones(1, tokens, device=device)
    batch = TrainBatch(
        tokens=torch.zeros(1, tokens, dtype=torch.long, device=device),
        position_ids=torch.arange(tokens, device=device)[None], targets=ids[None, :, 0].long(), loss_mask=n,
        topk_ids=ids[None], topk_logprobs=lp[None, :, :k].to(torch.bfloat16), sampled_logprob=lp[None, :, 0],
        tail_logmass=lp[None, :, k], behaviour_logprobs=lp[None, :, 0],
        teacher_index=torch.zeros(1, tokens, dtype=torch.long, device=device), reward=torch.zeros(1, device=device),
    )
    return logits.requires_grad_(True), batch


def naive_forward_kl(logits: torch.Tensor, batch) -> torch.Tensor:
    """The straightforward version: fp32 log_softmax of the full vocabulary, gather, tail = 1 - sum."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    s_top = logp.gather(-1, batch.topk_ids.long())
    s_tail = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - 1e-6))
    t = torch.cat([batch.topk_logprobs.float(), batch.tail_logmass[..., None]], -1)
    t = t - torch.logsumexp(t, -1, keepdim=True)
    return (t.exp() * (t - torch.cat([s_top, s_tail[..., None]], -1))).sum()


def chunked_forward_kl(vocab: int, chunk_tokens: int):
    """mopd's LossFn for the same objective (built, and its modules imported, before measuring)."""
    from mopd.config import ObjectiveConfig
    from mopd.objectives import build_loss_fn

    fn = build_loss_fn({0: [ObjectiveConfig()]}, ["teacher"], tp_group=None, vocab_start=0, vocab_size=vocab,
                       chunk_tokens=chunk_tokens)
    return lambda logits, batch: fn(logits, batch)[0]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(impl: str, tokens: int, vocab: int, k: int, dtype: torch.dtype, chunk_tokens: int,
            device: str) -> Measurement:
    """One forward + backward of ``impl`` (naive | chunked) in THIS process."""
    logits, batch = _inputs(tokens, vocab, k, dtype, device)
    loss_fn = naive_forward_kl if impl == "naive" else chunked_forward_kl(vocab, chunk_tokens)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident high-water mark to the current resident size
        base = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    loss = loss_fn(logits, batch)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    seconds = time.perf_counter() - start
    return Measurement(impl, logits.numel() * logits.element_size(), peak - base, seconds, float(loss))


def measure_in_subprocess(impl: str, tokens: int, vocab: int, k: int, dtype: str, chunk_tokens: int) -> Measurement:
    """``measure`` on the CPU in a fresh interpreter, so nothing from an earlier run is resident."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--tokens", str(tokens), "--vocab", str(vocab),
           "--k", str(k), "--dtype", dtype, "--chunk-tokens", str(chunk_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0:
        raise RuntimeError(f"{impl} measurement failed:\n{out.stderr[-3000:]}")
    return Measurement(**json.loads(out.stdout.strip().splitlines()[-1]))


def compare(tokens: int = 8192, vocab: int = 32768, k: int = 64, dtype: str = "bf16", chunk_tokens: int = 512,
            device: str = "cpu") -> tuple[Measurement, Measurement]:
    """(naive, chunked), each measured from a clean start; prints both and their ratio."""
    if device == "cuda":
        results = [measure(impl, tokens, vocab, k, DTYPES[dtype], chunk_tokens, device)
                   for impl in ("naive", "chunked")]
    else:
        results = [measure_in_subprocess(impl, tokens, vocab, k, dtype, chunk_tokens) for impl in ("naive", "chunked")]
    naive, chunked = results
    mib = 2**20
    print(f"top-K forward KL, {tokens} tokens x {vocab} vocab, K={k}, {dtype} logits "
          f"({naive.logits_bytes / mib:.0f} MiB), chunk {chunk_tokens} tokens, {device}")
    for m in results:
        print(f"  {m.impl:8s} peak extra {m.extra_bytes / mib:8.0f} MiB = {m.ratio:5.2f} x logits   "
              f"fwd+bwd {m.seconds:6.2f} s   loss {m.loss:.6g}")
    print(f"  naive / chunked peak extra: {naive.extra_bytes / max(chunked.extra_bytes, 1):.2f}x;  "
          f"time chunked / naive: {chunked.seconds / naive.seconds:.2f}x")
    return naive, chunked


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--child", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        m = measure(a.child, a.tokens, a.vocab, a.k, DTYPES[a.dtype], a.chunk_tokens, "cpu")
        print(json.dumps(asdict(m)))
        return
    compare(a.tokens, a.vocab, a.k, a.dtype, a.chunk_tokens, a.device)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
