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

``Alarm`` compares the mean of the first ``alarm_window`` steps with the latest window and fires
once per key when entropy or response length has fallen by more than ``alarm_drop``; what a firing
alarm does (warn, stop the run, save a checkpoint) is ``diagnostics.on_alarm``, carried out by the opd
loop with ``last_good_checkpoint`` / ``set_aside_after``.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class AlarmEvent:
    """One watched diagnostic that fell past ``alarm_drop``."""

    step: int
    key: str
    """The diagnostic, e.g. ``teacher/self/entropy``."""
    start: float
    """Mean over the first ``alarm_window`` steps."""
    now: float
    """Mean over the latest ``alarm_window`` steps."""
    window_start: int
    """First step of the latest window: the collapse was under way by then."""
    drop: float

    @property
    def message(self) -> str:
        return (f"step {self.step}: {self.key} fell {100 * (self.start - self.now) / self.start:.0f}% from "
                f"{self.start:.3g} to {self.now:.3g} (alarm at {100 * self.drop:.0f}%): possible collapse")


class Alarm:
    """Fires when a watched diagnostic falls by more than ``alarm_drop`` from its starting level."""

    def __init__(self, config: DiagnosticsConfig):
        self.config = config
        self.watched = tuple(f"/{name}" for name in config.alarm_on)
        self.series: dict[str, list[float]] = defaultdict(list)
        self.raised: dict[str, str] = {}
        self.fresh: list[AlarmEvent] = []
        """The events of the latest ``update``."""

    def update(self, step: int, values: dict[str, float]) -> list[AlarmEvent]:
        """Record this step; return the new events (each key fires once)."""
        self.fresh = []
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
                event = AlarmEvent(step, key, start, now, step - w + 1, self.config.alarm_drop)
                self.raised[key] = event.message
                self.fresh.append(event)
        return self.fresh


def checkpoint_steps(directory: Path) -> dict[int, Path]:
    """step -> complete checkpoint folder under ``directory`` (those ``--resume`` would consider)."""
    from mopd.student.checkpoint import MARKER

    out: dict[int, Path] = {}
    if directory.is_dir():
        for child in directory.iterdir():
            if not child.name.startswith(".") and (child / MARKER).is_file():
                out[int(json.loads((child / MARKER).read_text())["step"])] = child
    return out


def last_good_checkpoint(directory: Path, event: AlarmEvent) -> Path | None:
    """The latest checkpoint saved before the window that tripped ``event`` (None if none is left)."""
    before = {s: p for s, p in checkpoint_steps(directory).items() if s < event.window_start}
    return before[max(before)] if before else None


def set_aside_after(directory: Path, event: AlarmEvent) -> list[Path]:
    """Move checkpoints written inside the tripped window to ``directory/after_alarm/`` (kept, but no
    longer what ``--resume`` picks). Rank 0 only."""
    moved = []
    for step, path in sorted(checkpoint_steps(directory).items()):
        if step >= event.window_start:
            target = directory / "after_alarm" / path.name
            target.parent.mkdir(exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            path.rename(target)
            moved.append(target)
    return moved
