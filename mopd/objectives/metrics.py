"""Per-teacher metric sums of the distillation loss (keys ``teacher/<name>/...``).

Every value is a detached fp32 scalar SUM over this micro-batch's valid tokens (weighted by the loss mask),
so sums add across micro-batches and data-parallel ranks; ``teacher/<name>/tokens`` is the matching count
and ``mean_metrics`` divides by it. Keys:

    tokens               valid tokens routed to the teacher
    loss                 its weighted total loss (objective coefs and teacher coef applied)
    loss/<objective>     each term's loss, before its coef (a repeated objective gets ``.1``, ``.2``, ...)
    forward_kl           top-K + tail forward KL(p_t || p_s) at teacher temperature 1
    reverse_kl_est       log p_s(y) - log p_t(y) at the sampled token: the unbiased on-policy estimate of
                         KL(p_s || p_t) (noisy per token; meaningful as a mean)
    topk_coverage        student mass on the teacher's top-K ids
    clipped_fraction     tokens where any term clipped (entry/token cap, advantage clamp, IS truncation)

In a batch with a cross-tokenizer teacher (``ObjectiveInputs.chunks``, DESIGN.md §13) the top-K rows mean
something only at 1:1 chunks, so ``forward_kl`` and ``topk_coverage`` move under ``aligned/`` (divided by
``aligned/tokens``, the 1:1 tokens), and these are added:

    aligned_fraction     student tokens in 1:1 chunks
    unscored_fraction    student tokens after the text the teacher read (scored at UNREAD_LOGPROB)
    aligned/mapped_topk_mass  teacher mass on top-K entries that have a student token of the same bytes
    chunks/len           student tokens per chunk the teacher read (divided by ``chunks/tokens``, their number)
    chunks/kl_est        log p_s(chunk) - log p_t(chunk) per chunk: the on-policy chunk-level KL estimate
    reverse_kl_est       the same summed over chunks the teacher read, per token (equal to the per-token
                         estimate when all chunks are 1:1)
"""

from __future__ import annotations

import torch

from mopd.objectives.cross_vocab import chunk_teacher_logprob
from mopd.objectives.divergences import TermOutput, bucket_divergence, teacher_at_temperature
from mopd.objectives.registry import ObjectiveInputs

COUNT = "tokens"


def metric_key(teacher: str, what: str) -> str:
    return f"teacher/{teacher}/{what}"


def term_keys(names: list[str]) -> list[str]:
    """``loss/<objective>`` per term, suffixing repeats so no two terms share a key."""
    seen: dict[str, int] = {}
    keys = []
    for name in names:
        j = seen.get(name, 0)
        seen[name] = j + 1
        keys.append(f"loss/{name}" + (f".{j}" if j else ""))
    return keys


@torch.no_grad()
def teacher_metrics(teacher: str, x: ObjectiveInputs, weight: torch.Tensor, terms: list[tuple[str, TermOutput]],
                    total: torch.Tensor, *, with_teacher: bool = True) -> dict[str, torch.Tensor]:
    """Metric sums for one teacher's n tokens. weight: [n] loss-mask values; total: [n] weighted loss.

    with_teacher=False (an SFT-only slot whose teacher tensors are placeholders) leaves out the three
    teacher-comparison metrics. The key set depends only on the plan, so every rank emits the same keys.
    """
    def wsum(v: torch.Tensor) -> torch.Tensor:
        # where(): a zero-weight token must not turn an infinite value into NaN.
        return torch.where(weight > 0, weight * v.float(), 0.0).sum()

    clipped = torch.zeros_like(weight, dtype=torch.bool)
    out = {COUNT: weight.sum(), "loss": wsum(total.detach())}
    for key, (_, term) in zip(term_keys([name for name, _ in terms]), terms):
        out[key] = wsum(term.loss.detach())
        clipped |= term.clipped
    if with_teacher and x.chunks is not None:
        out.update(_chunk_metrics(x, wsum))
    elif with_teacher:
        buckets, log_z = teacher_at_temperature(x.topk_logprobs, x.tail_logmass, 1.0)
        out["forward_kl"] = wsum(bucket_divergence("forward_kl", buckets, x.student, tail=True).loss)
        out["reverse_kl_est"] = wsum(x.student_sampled.detach() - (x.sampled_logprob.float() - log_z))
        out["topk_coverage"] = wsum(-torch.expm1(x.student.log_tail.detach()))
    out["clipped_fraction"] = wsum(clipped)
    return {metric_key(teacher, k): v.detach().float() for k, v in out.items()}


def _chunk_metrics(x: ObjectiveInputs, wsum) -> dict[str, torch.Tensor]:
    """The cross-tokenizer metrics of the module docstring (sums; counts under aligned/ and chunks/)."""
    ch = x.chunks
    one = ch.one_to_one.float()
    buckets, _ = teacher_at_temperature(x.topk_logprobs, x.tail_logmass, 1.0)
    teacher_y = chunk_teacher_logprob(x, 1.0)
    chunk_kl = ch.segment_sum(x.student_sampled.detach().float() - teacher_y)[ch.segment]
    starts = (ch.first & ch.read).float()
    fkl = bucket_divergence("forward_kl", buckets, x.student, tail=True).loss
    return {
        "reverse_kl_est": wsum(torch.where(ch.read, x.student_sampled.detach() - teacher_y, 0.0)),
        "aligned_fraction": wsum(one),
        "unscored_fraction": wsum((~ch.read).float()),
        "aligned/" + COUNT: wsum(one),
        "aligned/forward_kl": wsum(torch.where(ch.one_to_one, fkl, 0.0)),
        "aligned/topk_coverage": wsum(one * -torch.expm1(x.student.log_tail.detach())),
        "aligned/mapped_topk_mass": wsum(one * x.topk_logprobs.float().exp().sum(dim=1)),
        "chunks/" + COUNT: wsum(starts),
        "chunks/len": wsum(starts * ch.student_tokens.float()),
        "chunks/kl_est": wsum(starts * chunk_kl),
    }


def mean_metrics(sums: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Divide each ``teacher/<name>/<x>`` sum by ``teacher/<name>/tokens`` (counts are kept as they are).

    Call it after summing ``sums`` over micro-batches and data-parallel ranks. Keys outside ``teacher/``
    pass through unchanged.
    """
    suffix = "/" + COUNT
    # Teacher names may contain "/", so match each key against the known count prefixes, longest first.
    prefixes = sorted((k[: -len(COUNT)] for k in sums if k.startswith("teacher/") and k.endswith(suffix)),
                      key=len, reverse=True)
    out: dict[str, float] = {}
    for key, value in sums.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None or key == prefix + COUNT:
            out[key] = float(value)
            continue
        count = float(sums[prefix + COUNT])
        out[key] = float(value) / count if count > 0 else float("nan")
    return out
