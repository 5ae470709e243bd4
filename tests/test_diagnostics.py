"""Failure-mode diagnostics: pivot-token concentration, entropy/length, position buckets, the alarm."""

import math

import torch

from mopd.config import DiagnosticsConfig
from mopd.diagnostics import Alarm, rollout_diagnostics, top_share
from mopd.types import Rollout, Routing, TeacherScores


def rollout(behaviour: list[float], domain: str = "d") -> Rollout:
    n = len(behaviour)
    return Rollout(prompt_ids=torch.tensor([1, 2]), response_ids=torch.arange(3, 3 + n),
                   behaviour_logprobs=torch.tensor(behaviour), finish="stop", weight_version=0,
                   domain=domain, prompt_index=0)


def scores(sampled: list[float]) -> TeacherScores:
    n = len(sampled)
    return TeacherScores(topk_ids=torch.zeros(n, 1, dtype=torch.int32), topk_logprobs=torch.zeros(n, 1),
                         sampled_logprob=torch.tensor(sampled), tail_logmass=torch.full((n,), -math.inf),
                         teacher="t")


def test_top_share_is_the_fraction_held_by_the_largest_entries():
    values = torch.tensor([1.0] * 99 + [101.0])
    assert abs(top_share(values, 0.01) - 101.0 / 200.0) < 1e-12
    assert abs(top_share(torch.ones(200), 0.01) - 2 / 200) < 1e-12  # ceil(0.01 * 200) = 2 entries
    assert top_share(torch.zeros(5), 0.01) == 0.0


def test_rollout_diagnostics_per_teacher_match_hand_computation():
    rollouts = [rollout([-0.5, -1.0, -2.0, -0.1]), rollout([-0.2, -0.3])]
    texts = ["abc wait", "hmm hmm"]
    sc = scores([-1.0, -1.0, -1.0, -1.0, -0.2, -1.3])
    routing = Routing(teachers=("a", "b"), index=torch.tensor([0, 0, 0, 0, 1, 1]))
    out = rollout_diagnostics(rollouts, texts, routing, sc, DiagnosticsConfig(position_buckets=2, markers=["wait", "hmm"]))
    gap_a = [0.5, 0.0, -1.0, 0.9]
    assert abs(out["teacher/a/kl_sample"] - sum(gap_a) / 4) < 1e-6
    assert abs(out["teacher/a/entropy"] - (0.5 + 1.0 + 2.0 + 0.1) / 4) < 1e-6
    assert abs(out["teacher/a/kl_pos0"] - (0.5 + 0.0) / 2) < 1e-6   # first half of the 4-token response
    assert abs(out["teacher/a/kl_pos1"] - (-1.0 + 0.9) / 2) < 1e-6
    assert out["teacher/a/response_len"] == 4 and out["teacher/b/response_len"] == 2
    assert out["teacher/a/markers/wait"] == 1 and out["teacher/b/markers/hmm"] == 2
    assert abs(out["teacher/b/kl_sample"] - (0.0 + 1.0) / 2) < 1e-6
    assert abs(out["teacher/a/top1pct_share"] - 1.0 / 2.4) < 1e-6  # the largest |gap| of four tokens


def test_alarm_fires_once_when_entropy_collapses_and_not_for_small_drifts():
    alarm = Alarm(DiagnosticsConfig(alarm_drop=0.5, alarm_window=2))
    fired = []
    for step, entropy in enumerate([1.0, 1.0, 0.9, 0.8, 0.4, 0.3, 0.2, 0.1], start=1):
        fired += alarm.update(step, {"teacher/a/entropy": entropy, "teacher/a/response_len": 5.0,
                                     "teacher/a/kl_sample": 0.0})
    assert len(fired) == 1 and "teacher/a/entropy" in fired[0] and "step 6" in fired[0]
    assert "teacher/a/response_len" not in alarm.raised
