"""Math shared by every engine: top-K scores from full-vocabulary logprobs, the tail bucket, seeds.

Kept free of HTTP and model code so the embedded engine, the SGLang client and the transport all
compute the tail mass the same way.
"""

from __future__ import annotations

import hashlib
import math

import torch

from mopd.errors import EngineError
from mopd.types import TeacherScores

MIN_TAIL_MASS = 1e-7
"""Floor of the tail mass when K < V: fp32 logprobs cannot resolve a smaller remainder, and a
rounding error that pushes sum(top-K) to >= 1 must not become log(0) or NaN."""

_ROW_CHUNK = 1024
"""Rows of fp32 log-softmax materialised at once while scoring (bounds memory at large V)."""


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate near 0 and for very negative x (Maechler 2012)."""
    small = x > -math.log(2.0)
    return torch.where(small, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tail_logmass(topk_logprobs: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """[N] fp32 ``log(1 - sum_k exp(topk_logprobs[:, k]))`` from [N, K] logprobs of any float dtype.

    The sum is formed in float32 (its rounding is far below the floor) and clamped so the tail mass is at least ``MIN_TAIL_MASS``; it is
    exactly ``-inf`` only when the top-K covers the whole vocabulary (``K == vocab_size``).
    """
    n, k = topk_logprobs.shape
    if vocab_size is not None and k >= vocab_size:
        return torch.full((n,), -math.inf, dtype=torch.float32)
    if k == 0:
        return torch.zeros(n, dtype=torch.float32)
    total = torch.logsumexp(topk_logprobs.float(), dim=-1)
    total = total.clamp(max=math.log1p(-MIN_TAIL_MASS))
    return log1mexp(total)


def scores_from_logits(
    logits: torch.Tensor, sampled_ids: torch.Tensor, top_k: int, teacher: str
) -> TeacherScores:
    """TeacherScores from [T, V] logits whose row t predicts response token t.

    Logprobs are the raw (temperature 1) log-softmax over the full vocabulary, computed in fp32
    chunks of rows; ``sampled_ids`` is [T] and selects ``sampled_logprob``.
    """
    t, vocab = logits.shape
    if top_k > vocab:
        raise EngineError(f"teacher {teacher!r}: top_k={top_k} exceeds the vocabulary size {vocab}")
    if sampled_ids.shape != (t,):
        raise EngineError(f"teacher {teacher!r}: sampled_ids has shape {tuple(sampled_ids.shape)}, expected ({t},)")
    ids, vals, sampled = [], [], []
    for lo in range(0, t, _ROW_CHUNK):
        lp = torch.log_softmax(logits[lo : lo + _ROW_CHUNK].float(), dim=-1)
        top = torch.topk(lp, top_k, dim=-1)
        ids.append(top.indices.to(torch.int32))
        vals.append(top.values)
        sampled.append(lp.gather(1, sampled_ids[lo : lo + _ROW_CHUNK].long().unsqueeze(1)).squeeze(1))
    topk_logprobs = torch.cat(vals) if vals else torch.empty(0, top_k)
    return TeacherScores(
        topk_ids=torch.cat(ids) if ids else torch.empty(0, top_k, dtype=torch.int32),
        topk_logprobs=topk_logprobs,
        sampled_logprob=torch.cat(sampled) if sampled else torch.empty(0),
        tail_logmass=tail_logmass(topk_logprobs, vocab),
        teacher=teacher,
    )


def derive_seed(seed: int, prompt_index: int, sample: int) -> int:
    """A 62-bit seed for sample ``sample`` of prompt ``prompt_index``, independent of batching.

    Every sample gets its own seed because SGLang hashes (sampling_seed, position) per token: the n
    samples of one prompt sent with one shared seed would all be identical.
    """
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2
