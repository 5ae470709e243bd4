"""Failure-mode diagnostics for on-policy (self-)distillation, computed on the rollouts of each step.

On-policy distillation can collapse quietly while its loss looks fine: the loss concentrates on a
few pivot tokens, the student's entropy and response length shrink, supervision fades late in long
responses. Per teacher, every step, from what rank 0 already holds (no extra forward pass):

- ``kl_sample``: mean of ``log p_s(y_t) - log p_t(y_t)`` over sampled tokens, the single-sample
  estimate of the reverse KL (``p_s`` = the behaviour logprob, i.e. the student at sampling time);
- ``top1pct_share``: share of ``sum_t |log p_s(y_t) - log p_t(y_t)|`` carried by the top 1% of tokens
  (pivot-token concentration; a uniform spread gives ~0.01);
- ``entropy``: ``mean_t -log p_s(y_t)``, the Monte Carlo estimate of the student's entropy at
  temperature 1 (biased low at other temperatures; compare it over steps, not across configs);
- ``response_len``, ``markers/<m>`` (epistemic markers per response), ``kl_pos<b>`` (the KL estimate
  in response-position bucket ``b`` of ``position_buckets`` equal parts of each response).

``Alarm`` compares the mean of the first ``alarm_window`` steps with the latest window and warns
once per key when entropy or response length has fallen by more than ``alarm_drop``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from mopd.config import DiagnosticsConfig
from mopd.eval import epistemic_marker_counts
from mopd.types import Rollout, Routing, TeacherScores


def rollout_diagnostics(rollouts: Sequence[Rollout], texts: Sequence[str], routing: Routing,
                        scores: TeacherScores, config: DiagnosticsConfig) -> dict[str, float]:
    """``teacher/<name>/...`` diagnostics of one step (token rows in packing order, as in ``scores``)."""
    behaviour = torch.cat([r.behaviour_logprobs.float() for r in rollouts])
    gap = behaviour - scores.sampled_logprob.float()
    positions = torch.cat([_position_bucket(len(r.response_ids), config.position_buckets) for r in rollouts])
    rows_of = _rows_per_rollout(rollouts)
    out: dict[str, float] = {}
    for t, name in enumerate(routing.teachers):
        tokens = routing.index == t
        if not bool(tokens.any()):
            continue
        key = f"teacher/{name}"
        g = gap[tokens]
        out[f"{key}/kl_sample"] = float(g.mean())
        out[f"{key}/top1pct_share"] = top_share(g.abs(), 0.01)
        out[f"{key}/entropy"] = float(-behaviour[tokens].mean())
        for b in range(config.position_buckets):
            in_bucket = tokens & (positions == b)
            if bool(in_bucket.any()):
                out[f"{key}/kl_pos{b}"] = float(gap[in_bucket].mean())
        mine = [i for i, rows in enumerate(rows_of) if bool(tokens[rows].any())]
        out[f"{key}/response_len"] = sum(len(rollouts[i].response_ids) for i in mine) / len(mine)
        counts = [epistemic_marker_counts(texts[i], config.markers) for i in mine]
        for j, marker in enumerate(config.markers):
            out[f"{key}/markers/{marker.replace(' ', '_')}"] = sum(c[j] for c in counts) / len(counts)
    return out


def top_share(values: torch.Tensor, fraction: float) -> float:
    """Share of ``values.sum()`` held by the largest ``ceil(fraction * n)`` entries (0 when the sum is 0)."""
    total = float(values.sum())
    if values.numel() == 0 or total <= 0.0:
        return 0.0
    k = max(1, int(-(-values.numel() * fraction // 1)))
    return float(values.topk(k).values.sum()) / total


def _position_bucket(length: int, buckets: int) -> torch.Tensor:
    return (torch.arange(length) * buckets // max(length, 1)).clamp(max=buckets - 1)


def _rows_per_rollout(rollouts: Sequence[Rollout]) -> list[slice]:
    out, start = [], 0
    for r in rollouts:
        out.append(slice(start, start + len(r.response_ids)))
        start += len(r.response_ids)
    return out


class Alarm:
    """Warns when a watched diagnostic falls by more than ``alarm_drop`` from its starting level."""

    def __init__(self, config: DiagnosticsConfig):
        self.config = config
        self.watched = tuple(f"/{name}" for name in config.alarm_on)
        self.series: dict[str, list[float]] = defaultdict(list)
        self.raised: dict[str, str] = {}

    def update(self, step: int, values: dict[str, float]) -> list[str]:
        """Record this step; return the new warnings (each key warns once)."""
        fresh = []
        w = self.config.alarm_window
        for key, value in values.items():
            if not self.watched or not key.endswith(self.watched):
                continue
            series = self.series[key]
            series.append(value)
            if len(series) < 2 * w or key in self.raised:
                continue
            start, now = sum(series[:w]) / w, sum(series[-w:]) / w
            if start > 0 and (start - now) / start > self.config.alarm_drop:
                message = (f"step {step}: {key} fell {100 * (start - now) / start:.0f}% from {start:.3g} to {now:.3g} "
                           f"(alarm at {100 * self.config.alarm_drop:.0f}%): possible collapse")
                self.raised[key] = message
                fresh.append(message)
        return fresh
