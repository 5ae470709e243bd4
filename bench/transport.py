"""Top-K transport benchmark: decode 1M top-K entries from SGLang's flat base64 vs nested-JSON answers.

Both answers carry the same teacher scores for one prefill-only request (T rows of K entries);
each is decoded the way SGLangEngine does it (``json.loads`` of the HTTP body, then
``sglang_format.parse_scores``), best of several runs. Also prints wire sizes per token: the HTTP
body in both formats, mopd's packed transport (6K+8 bytes), full bf16 logits (2V) and int64 ids +
fp32 logprobs (12K).

    OMP_NUM_THREADS=1 .venv/bin/python bench/transport.py [--entries 1000000] [--k 64]
"""

from __future__ import annotations

import argparse
import base64
import json
import time

import numpy as np
import torch

from mopd.rollout import sglang_format as fmt
from mopd.rollout.engine import ScoreRequest
from mopd.teachers.transport import pack, unpack

QWEN_VOCAB = 151_936


def synthetic_answer(rows: int, k: int, prompt: int, seed: int = 0) -> tuple[ScoreRequest, np.ndarray, np.ndarray]:
    """A score request of ``prompt + rows`` tokens and plausible top-K logprobs/ids for its rows."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, QWEN_VOCAB, size=prompt + rows)
    vals = np.sort(rng.normal(-8.0, 3.0, size=(rows, k)).astype(np.float32), axis=1)[:, ::-1] - 0.05
    vals = np.minimum(vals, -1e-3).astype(np.float32)
    idx = rng.integers(0, QWEN_VOCAB, size=(rows, k)).astype(np.int32)
    return ScoreRequest(ids=torch.from_numpy(ids), response_start=prompt), vals, idx


def sglang_body(request: ScoreRequest, vals: np.ndarray, idx: np.ndarray, flat_b64: bool) -> bytes:
    """The HTTP body SGLang 0.5.23 returns for this prefill-only request in either format."""
    ids = request.ids.tolist()
    start = request.response_start - 1
    sampled = vals[:, 0].tolist()
    meta = {
        "id": "bench", "finish_reason": {"type": "length", "length": 0}, "prompt_tokens": len(ids),
        "completion_tokens": 0, "cached_tokens": 0, "weight_version": "0",
        "input_token_logprobs": [[None, ids[start], None]] + [[lp, ids[start + 1 + j], None] for j, lp in enumerate(sampled)],
    }
    if flat_b64:
        meta |= {
            "input_top_logprobs_val_flat_b64": base64.b64encode(vals.astype("<f4").tobytes()).decode(),
            "input_top_logprobs_idx_flat_b64": base64.b64encode(idx.astype("<i4").tobytes()).decode(),
            "input_top_logprobs_val_flat_b64_dtype": "float32",
            "input_top_logprobs_idx_flat_b64_dtype": "int32",
            "input_top_logprobs_shape": list(vals.shape),
            "input_top_logprobs_null_prefix": 1,
        }
    else:
        rows = [[[float(v), int(t), None] for v, t in zip(vr, ir)] for vr, ir in zip(vals.tolist(), idx.tolist())]
        meta["input_top_logprobs"] = [None] + rows
    return json.dumps([{"text": "", "output_ids": [], "meta_info": meta}]).encode()


def decode_format(body: bytes, request: ScoreRequest, k: int):
    """The format's own cost: parse the HTTP body and turn its top-K into [T, K] arrays."""
    meta = json.loads(body)[0]["meta_info"]
    return fmt.decode_top_logprobs(meta, request.ids.numel() - request.response_start + 1, k, "bench")


def decode(body: bytes, request: ScoreRequest, k: int):
    """What SGLangEngine.score does per answer: the above plus checks, sampled logprobs and the tail."""
    item = json.loads(body)[0]
    return fmt.parse_scores(item, request, k, "bench", "bench")


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="top-K entries in total (rows * K)")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows, k = args.entries // args.k, args.k
    request, vals, idx = synthetic_answer(rows, k, prompt=32)
    flat, nested = sglang_body(request, vals, idx, True), sglang_body(request, vals, idx, False)

    a, b = decode(flat, request, k), decode(nested, request, k)
    assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_logprobs, b.topk_logprobs), "formats disagree"
    assert torch.equal(a.topk_ids, torch.from_numpy(idx)), "decoded ids differ from the source"

    f_flat = best_time(lambda: decode_format(flat, request, k), args.repeats)
    f_nested = best_time(lambda: decode_format(nested, request, k), args.repeats)
    t_flat = best_time(lambda: decode(flat, request, k), args.repeats)
    t_nested = best_time(lambda: decode(nested, request, k), args.repeats)
    packed = pack(a)
    t_unpack = best_time(lambda: unpack(packed), args.repeats)

    print(f"top-K decode of {rows * k:,} entries ({rows:,} tokens x K={k}), best of {args.repeats}; base64 via {_b64_impl()}")
    print(f"  {'':22} {'format decode':>14} {'to TeacherScores':>17}   HTTP body")
    print(f"  {'SGLang flat base64':22} {f_flat * 1e3:11.1f} ms {t_flat * 1e3:14.1f} ms   {len(flat) / 1e6:6.2f} MB ({len(flat) / rows:5.0f} B/token)")
    print(f"  {'SGLang nested JSON':22} {f_nested * 1e3:11.1f} ms {t_nested * 1e3:14.1f} ms   {len(nested) / 1e6:6.2f} MB ({len(nested) / rows:5.0f} B/token)")
    ratio = f_nested / f_flat
    print(f"  {'ratio nested / flat':22} {ratio:12.1f}x {t_nested / t_flat:15.1f}x   (format decode target >= 20x: {'met' if ratio >= 20 else 'NOT met'})")
    print(f"  mopd unpack of the same scores: {t_unpack * 1e3:.1f} ms")
    per_token = len(packed) / rows
    print(f"bytes per token at K={k}:")
    print(f"  mopd packed (bf16)       : {per_token:9.1f}  (6K+8 = {6 * k + 8})")
    print(f"  int64 ids + fp32 logprobs: {12 * k:9d}  ({12 * k / per_token:.1f}x mopd)")
    print(f"  full bf16 logits, V={QWEN_VOCAB}: {2 * QWEN_VOCAB:9d}  ({2 * QWEN_VOCAB / per_token:.0f}x mopd)")


def _b64_impl() -> str:
    try:
        import pybase64  # noqa: F401
    except ImportError:
        return "binascii (install pybase64 for the SIMD decoder)"
    return "pybase64"


if __name__ == "__main__":
    main()
