"""SGLang 0.5.23 native ``/generate`` payloads and response parsing (no HTTP here).

Field names and position semantics follow ``reference/sglang.md`` §1 (read from the 0.5.23 source):

* every sampling parameter is sent explicitly (``max_new_tokens``, ``sampling_seed``; the server
  rejects unknown keys such as ``max_tokens``/``seed``);
* prefill-only scoring sends ``max_new_tokens: 0`` and ``logprob_start_len = P - 1`` where ``P`` is
  the index of the first response token: the input logprob lists then have ``L - (P-1) = T + 1``
  entries, entry 0 is always null and entry ``j >= 1`` scores response token ``j - 1``;
* top-K rows come as flat base64 arrays (float32 values, int32 ids, ``shape`` [rows, K] and a
  ``null_prefix`` of leading null rows) when ``return_flat_raw_top_logprobs`` and
  ``return_flat_raw_top_logprobs_b64`` are both set; nested ``[[logprob, id, text], ...]`` lists
  are the fallback format.

Parsers raise ``ResponseError`` (an EngineError) on anything that does not fit: a wrong number of
rows, NaN, ids that do not match the tokens sent, undecodable base64.
"""

from __future__ import annotations

import binascii
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mopd.config import SamplingConfig
from mopd.errors import EngineError
from mopd.rollout.engine import ScoreRequest
from mopd.rollout.scoring import tail_logmass
from mopd.types import Prompt, Rollout, TeacherScores

SCHEMA_TOP_K_ALL = -1
"""``top_k`` value meaning "no top-k filter" on the native API (-1 and 2**30 are both accepted)."""


class ResponseError(EngineError):
    """A server answered, but the answer does not fit the request (schema, counts, NaN)."""


def sampling_params(sampling: SamplingConfig, seed: int | None) -> dict[str, Any]:
    """The complete ``sampling_params`` object of one generation request (n is always 1: see seeds)."""
    params: dict[str, Any] = {
        "max_new_tokens": int(sampling.max_new_tokens),
        "min_new_tokens": 0,
        "temperature": float(sampling.temperature),
        "top_p": float(sampling.top_p),
        "top_k": int(sampling.top_k) if sampling.top_k > 0 else SCHEMA_TOP_K_ALL,
        "min_p": 0.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "repetition_penalty": 1.0,
        "stop_token_ids": [int(t) for t in sampling.stop_token_ids],
        "ignore_eos": False,
        "skip_special_tokens": False,
        "no_stop_trim": True,
        "n": 1,
    }
    if seed is not None:
        params["sampling_seed"] = int(seed)
    return params


def generate_payload(prompt: Prompt, sampling: SamplingConfig, seed: int | None) -> dict[str, Any]:
    """One sequence's request: flat ``input_ids`` and one ``sampling_params`` object.

    One object per request, never a list: sgl-router 0.3.2 reads ``sampling_params`` as a struct and
    answers a batch list with 422, so the same request shape serves a router and a server alike.
    """
    return {
        "input_ids": prompt.ids.tolist(),
        "sampling_params": sampling_params(sampling, seed),
        "return_logprob": True,
        "logprob_start_len": -1,
        "top_logprobs_num": 0,
        "return_text_in_logprobs": False,
        "stream": False,
    }


def score_payload(request: ScoreRequest, top_k: int) -> dict[str, Any]:
    """One prefill-only scoring request with flat base64 top-K (a router drops the flat flags and
    the server answers nested lists, which ``decode_top_logprobs`` reads too)."""
    return {
        "input_ids": request.ids.tolist(),
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0, "top_p": 1.0, "top_k": SCHEMA_TOP_K_ALL, "n": 1},
        "return_logprob": True,
        "logprob_start_len": int(request.response_start) - 1,
        "top_logprobs_num": int(top_k),
        "return_text_in_logprobs": False,
        "return_flat_raw_top_logprobs": True,
        "return_flat_raw_top_logprobs_b64": True,
        "stream": False,
    }


def single_result(body: Any, where: str) -> dict[str, Any]:
    """The result object of a one-sequence answer."""
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if not isinstance(body, dict):
        got = f"a list of {len(body)}" if isinstance(body, list) else type(body).__name__
        raise ResponseError(f"{where}: expected one result object, got {got}")
    return body


def parse_rollout(item: dict[str, Any], prompt: Prompt, where: str, default_version: int) -> Rollout:
    """One generation result: output ids, behaviour logprobs (one per output id), finish reason."""
    meta = _meta(item, where)
    ids = item.get("output_ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise ResponseError(f"{where}: output_ids missing or not a list of ints")
    entries = meta.get("output_token_logprobs")
    if not isinstance(entries, list) or len(entries) != len(ids):
        n = len(entries) if isinstance(entries, list) else None
        raise ResponseError(f"{where}: {n} output_token_logprobs for {len(ids)} output_ids")
    logprobs = [_entry(e, where, j, "output_token_logprobs") for j, e in enumerate(entries)]
    for j, (lp, tok) in enumerate(logprobs):
        if tok != ids[j]:
            raise ResponseError(f"{where}: output_token_logprobs[{j}] is for token {tok}, output_ids[{j}] is {ids[j]}")
        _finite(lp, where, f"output_token_logprobs[{j}]")
    finish = meta.get("finish_reason") or {}
    kind = finish.get("type") if isinstance(finish, dict) else None
    if kind not in ("stop", "length"):
        raise ResponseError(f"{where}: generation did not finish normally (finish_reason {finish!r})")
    return Rollout(
        prompt_ids=prompt.ids.cpu().long(),
        response_ids=torch.tensor(ids, dtype=torch.long),
        behaviour_logprobs=torch.tensor([lp for lp, _ in logprobs], dtype=torch.float32),
        finish=kind,
        weight_version=parse_version(meta.get("weight_version"), default_version),
        domain=prompt.domain,
        prompt_index=prompt.index,
        pi=prompt.pi,
        messages=prompt.messages,
        reference=prompt.reference,
        text=item.get("text", "") if isinstance(item.get("text", ""), str) else "",
    )


def parse_scores(item: dict[str, Any], request: ScoreRequest, top_k: int, teacher: str, where: str) -> TeacherScores:
    """One prefill-only result: T rows of top-K and the sampled-token logprobs of the response."""
    meta = _meta(item, where)
    finish = meta.get("finish_reason")
    if isinstance(finish, dict) and finish.get("type") == "abort":
        raise ResponseError(f"{where}: the server aborted the scoring request ({finish.get('message')!r})")
    ids = request.ids.tolist()
    start, t = request.response_start - 1, len(ids) - request.response_start
    entries = meta.get("input_token_logprobs")
    if not isinstance(entries, list) or len(entries) != t + 1:
        n = len(entries) if isinstance(entries, list) else None
        raise ResponseError(f"{where}: {n} input_token_logprobs for {t} response tokens (expected {t + 1} with the null first entry)")
    sampled = _input_token_logprobs(entries[1:], ids[start + 1 :], where)
    top_ids, top_lp = decode_top_logprobs(meta, t + 1, top_k, where)
    if t and not bool(torch.isfinite(top_lp).all()):
        row = int((~torch.isfinite(top_lp)).any(1).nonzero()[0])
        raise ResponseError(f"{where}: non-finite top-K logprob at response position {row}")
    if t and bool((top_ids < 0).any()):
        raise ResponseError(f"{where}: negative top-K token id")
    return TeacherScores(
        topk_ids=top_ids,
        topk_logprobs=top_lp,
        sampled_logprob=torch.from_numpy(sampled),
        tail_logmass=tail_logmass(top_lp),
        teacher=teacher,
    )


def decode_top_logprobs(meta: dict[str, Any], positions: int, k: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """([T, K] int32 ids, [T, K] fp32 logprobs) from whichever top-K format the answer carries."""
    if "input_top_logprobs_val_flat_b64" in meta or "input_top_logprobs_val_flat" in meta:
        return decode_flat_top_logprobs(meta, positions, k, where)
    return decode_nested_top_logprobs(meta.get("input_top_logprobs"), positions, k, where)


def decode_flat_top_logprobs(meta: dict[str, Any], positions: int, k: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[positions - null_prefix... ] -> ([T, K] int32 ids, [T, K] fp32 logprobs) for T = positions - 1.

    Reads ``input_top_logprobs_{val,idx}_flat_b64`` (float32/int32 little-endian) or, without b64,
    the plain ``_flat`` lists; ``shape`` and ``null_prefix`` locate the rows.
    """
    shape, prefix = meta.get("input_top_logprobs_shape"), meta.get("input_top_logprobs_null_prefix")
    if not (isinstance(shape, list) and len(shape) == 2 and isinstance(prefix, int)):
        raise ResponseError(f"{where}: flat top logprobs without a valid shape/null_prefix ({shape!r}, {prefix!r})")
    rows, width = shape
    # Entry 0 is always null; the flat arrays must cover exactly positions 1..T.
    if prefix != 1 and not (rows == 0 and prefix in (0, 1)):
        raise ResponseError(f"{where}: flat top logprobs null_prefix={prefix}, expected 1 (entry 0 is always null)")
    if rows != positions - 1 or (rows and width != k):
        raise ResponseError(f"{where}: flat top logprobs shape {shape}, expected [{positions - 1}, {k}]")
    if "input_top_logprobs_val_flat_b64" in meta:
        for side, want in (("val", "float32"), ("idx", "int32")):
            got = meta.get(f"input_top_logprobs_{side}_flat_b64_dtype", want)
            if got != want:
                raise ResponseError(f"{where}: flat {side} dtype {got!r}, this client reads {want!r}")
        vals = _b64_array(meta["input_top_logprobs_val_flat_b64"], "<f4", rows * k, where, "val")
        idx = _b64_array(meta["input_top_logprobs_idx_flat_b64"], "<i4", rows * k, where, "idx")
    else:
        vals = np.asarray(meta.get("input_top_logprobs_val_flat"), dtype=np.float32)
        idx = np.asarray(meta.get("input_top_logprobs_idx_flat"), dtype=np.int64)
        if vals.shape != (rows * k,) or idx.shape != (rows * k,):
            raise ResponseError(f"{where}: flat top logprob lists have {vals.size}/{idx.size} values, expected {rows * k}")
        idx = idx.astype(np.int32)
    return torch.from_numpy(idx.reshape(rows, k)), torch.from_numpy(vals.reshape(rows, k))


def decode_nested_top_logprobs(rows: Any, positions: int, k: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The nested fallback: ``[null, [[logprob, id, text] x K], ...]`` with ``positions`` entries."""
    if not isinstance(rows, list) or len(rows) != positions:
        n = len(rows) if isinstance(rows, list) else None
        raise ResponseError(f"{where}: {n} input_top_logprobs rows, expected {positions}")
    if positions and rows[0] is not None:
        raise ResponseError(f"{where}: input_top_logprobs[0] should be null")
    body = rows[1:]
    if any(not isinstance(r, list) or len(r) != k for r in body):
        bad = next(j for j, r in enumerate(body) if not isinstance(r, list) or len(r) != k)
        raise ResponseError(f"{where}: input_top_logprobs[{bad + 1}] does not hold {k} entries")
    count = len(body) * k
    try:
        vals = np.fromiter((e[0] for row in body for e in row), dtype=np.float32, count=count).reshape(len(body), k)
        idx = np.fromiter((e[1] for row in body for e in row), dtype=np.int32, count=count).reshape(len(body), k)
    except (TypeError, ValueError, IndexError) as exc:
        raise ResponseError(f"{where}: input_top_logprobs entries are not [logprob, token_id, text]: {exc}") from None
    return torch.from_numpy(idx), torch.from_numpy(vals)


def parse_version(value: Any, default: int) -> int:
    """SGLang's weight_version is a string label ("default" at start); mopd writes integers into it."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _input_token_logprobs(entries: list, expected_ids: list[int], where: str) -> np.ndarray:
    """[T] fp32 logprobs of ``[[logprob, token_id, text], ...]``, checked against the ids sent."""
    t = len(expected_ids)
    try:
        lps = np.fromiter((e[0] for e in entries), dtype=np.float64, count=t)
        toks = np.fromiter((e[1] for e in entries), dtype=np.int64, count=t)
    except (TypeError, ValueError, IndexError) as exc:
        raise ResponseError(f"{where}: input_token_logprobs entries are not [logprob, token_id, text]: {exc}") from None
    # SGLang writes 0 for ids >= vocab_size - 1 in this list (a multimodal quirk); accept it.
    bad = (toks != np.asarray(expected_ids, dtype=np.int64)) & (toks != 0)
    if bad.any():
        j = int(bad.nonzero()[0][0])
        raise ResponseError(f"{where}: input_token_logprobs[{j + 1}] is for token {toks[j]}, the request has {expected_ids[j]}")
    if not np.isfinite(lps).all():
        j = int((~np.isfinite(lps)).nonzero()[0][0])
        raise ResponseError(f"{where}: input_token_logprobs[{j + 1}] is {lps[j]}")
    return lps.astype(np.float32)


def _meta(item: dict[str, Any], where: str) -> dict[str, Any]:
    meta = item.get("meta_info")
    if not isinstance(meta, dict):
        raise ResponseError(f"{where}: result has no meta_info object (keys {sorted(item)[:8]})")
    return meta


def _entry(e: Any, where: str, j: int, field: str) -> tuple[float, int]:
    if not (isinstance(e, list) and len(e) >= 2 and isinstance(e[1], int) and isinstance(e[0], (int, float))):
        raise ResponseError(f"{where}: {field}[{j}] is {e!r}, expected [logprob, token_id, text]")
    return float(e[0]), e[1]


def _finite(x: float, where: str, field: str) -> float:
    if not math.isfinite(x):
        raise ResponseError(f"{where}: {field} is {x}")
    return x


def _b64_array(text: Any, dtype: str, count: int, where: str, side: str) -> np.ndarray:
    try:
        raw = _b64decode(text)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise ResponseError(f"{where}: input_top_logprobs_{side}_flat_b64 is not valid base64: {exc}") from None
    if len(raw) != 4 * count:
        raise ResponseError(
            f"{where}: input_top_logprobs_{side}_flat_b64 decodes to {len(raw)} bytes, expected {count} 4-byte values"
        )
    return np.frombuffer(raw, dtype=dtype).copy()


def _b64decode(text: Any) -> bytes:
    """Validating base64 decode: pybase64's SIMD decoder (what SGLang encodes with) when installed."""
    try:
        import pybase64
    except ImportError:
        return binascii.a2b_base64(text, strict_mode=True)
    return pybase64.b64decode(text, validate=True)
