"""Failure-mode diagnostics: pivot-token concentration, entropy/length, position buckets, the alarm,
and what a firing alarm does in the opd loop (diagnostics.on_alarm: warn | stop | checkpoint)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mopd.config import AlarmAction, DiagnosticsConfig, load_config
from mopd.diagnostics import Alarm, last_good_checkpoint, rollout_diagnostics, set_aside_after, top_share
from mopd.errors import ConfigError
from mopd.student.checkpoint import MARKER, latest_checkpoint
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
    assert len(fired) == 1 and fired[0].key == "teacher/a/entropy" and "step 6" in fired[0].message
    assert fired[0].step == 6 and fired[0].window_start == 5  # the window of steps 5-6 tripped it
    assert fired[0].start == 1.0 and abs(fired[0].now - 0.35) < 1e-12
    assert "teacher/a/response_len" not in alarm.raised


def fake_checkpoints(directory: Path, steps: list[int]) -> None:
    for step in steps:
        (directory / f"step_{step:06d}").mkdir(parents=True)
        (directory / f"step_{step:06d}" / MARKER).write_text(json.dumps({"step": step}))


def test_stop_keeps_the_last_checkpoint_from_before_the_tripped_window(tmp_path):
    alarm = Alarm(DiagnosticsConfig(alarm_drop=0.5, alarm_window=3, alarm_on=["response_len"]))
    series = [8.0, 8.0, 8.0, 8.0, 7.0, 3.0, 2.0, 1.0]  # window means: 8 at the start, 2 at step 8
    events = [e for step, v in enumerate(series, start=1) for e in alarm.update(step, {"teacher/t/response_len": v})]
    # window means vs the first (8): step 6 -> 6 (25%), step 7 -> 4 (50%, not above), step 8 -> 2 (75%)
    assert [(e.step, e.window_start) for e in events] == [(8, 6)]
    fake_checkpoints(tmp_path, [2, 4, 6, 8])
    assert last_good_checkpoint(tmp_path, events[0]) == tmp_path / "step_000004"
    moved = set_aside_after(tmp_path, events[0])
    assert [p.name for p in moved] == ["step_000006", "step_000008"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000004"  # what --resume picks now
    assert sorted(p.name for p in (tmp_path / "after_alarm").iterdir()) == ["step_000006", "step_000008"]
    assert last_good_checkpoint(tmp_path / "none", events[0]) is None


def test_on_alarm_is_a_checked_choice():
    assert load_config(None, ["diagnostics.on_alarm=stop"]).diagnostics.on_alarm == AlarmAction.stop
    with pytest.raises(ConfigError, match="diagnostics.on_alarm"):
        load_config(None, ["diagnostics.on_alarm=explode"])


# --- the opd loop acting on a real alarm ------------------------------------------------------------
# A 2-layer student distils, from random init, a base trained for 16 SFT steps: its entropy falls
# from ~log(100) within a few steps, and a 10% alarm on it (window 2) fires part-way through.

RUN_YAML = """
name: alarm
seed: 3
student:
  model: {family: llama, num_layers: 2, hidden_size: 64, num_attention_heads: 4, num_query_groups: 2,
          ffn_hidden_size: 128, vocab_size: 100, make_vocab_size_divisible_by: 32, max_position_embeddings: 64}
  optimizer: {lr: 1.0e-2}
  train: {steps: 8, global_batch_size: 16, micro_batch_size: 16, max_seq_len: 32}
data: {source: synthetic, domains: [reverse], num_prompts: 100}
rollout: {sampling: {temperature: 1.0, max_new_tokens: 8}}
distill:
  teachers: [{name: base, checkpoint: base, top_k: 4}]
  router: {default: base}
eval: {num_prompts: 4, samples_per_prompt: 0}
checkpoint: {save_every: 1, keep_last: 3}
diagnostics: {alarm_on: [entropy], alarm_window: 2, alarm_drop: 0.1}
logging: {wandb_mode: disabled, progress_bar: false, log_every: 1}
stages:
  - {name: base, kind: sft, role: base, overrides: [student.train.steps=16]}
  - {name: unify, kind: opd, role: student}
"""
KEY, WINDOW, DROP = "teacher/base/entropy", 2, 0.1


def mopd_run(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "mopd.cli", "run", str(config), *overrides], env=env,
                          capture_output=True, text=True, timeout=600)


def expected_alarm_step(series: list[float]) -> int:
    """The first step whose latest window mean is more than DROP below the first window's (plain floats)."""
    start = sum(series[:WINDOW]) / WINDOW
    for step in range(2 * WINDOW, len(series) + 1):
        now = sum(series[step - WINDOW:step]) / WINDOW
        if (start - now) / start > DROP:
            return step
    raise AssertionError(f"{KEY} never fell {DROP:.0%}: {series}")


@pytest.mark.one_process
def test_the_opd_loop_checkpoints_at_the_alarm_or_stops_keeping_the_last_good_checkpoint(tmp_path):
    config = tmp_path / "alarm.yaml"
    config.write_text(RUN_YAML)
    first = mopd_run(config, f"output_dir={tmp_path / 'a'}", "diagnostics.on_alarm=checkpoint")
    assert first.returncode == 0, first.stderr[-3000:]
    unify = tmp_path / "a" / "alarm" / "stages" / "unify"
    rows = [json.loads(line) for line in (unify / "metrics.jsonl").read_text().splitlines()]
    series = [r[KEY] for r in rows if KEY in r]
    assert len(series) == 8
    fired = expected_alarm_step(series)
    assert fired < 8
    # checkpoint: one checkpoint at the alarm step, apart from the pruned ones, and training went on.
    assert [p.name for p in (unify / "alarm_checkpoints").iterdir()] == [f"step_{fired:06d}"]
    assert latest_checkpoint(unify / "checkpoints").name == "step_000008"
    assert json.loads((unify / "output.json").read_text())["warnings"][0].startswith(f"step {fired}: {KEY}")

    # stop: the same run (same seeds, so the same series) ends at the alarm step with a clean error.
    # (Run whole, not resumed after the base: the student's random init draws from the RNG the base left.)
    second = mopd_run(config, f"output_dir={tmp_path / 'b'}", "diagnostics.on_alarm=stop")
    assert second.returncode == 1
    error = second.stderr.strip().splitlines()[-1]
    assert error.startswith("mopd run: diagnostics.on_alarm=stop ended stage 'unify': "
                            f"step {fired}: {KEY} fell"), second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    stopped = tmp_path / "b" / "alarm" / "stages" / "unify"
    good = stopped / "checkpoints" / f"step_{fired - WINDOW:06d}"  # the last one before the tripped window
    assert f"the last checkpoint from before it is {good}" in error
    assert latest_checkpoint(stopped / "checkpoints") == good
    assert sorted(p.name for p in (stopped / "checkpoints" / "after_alarm").iterdir()) == \
        [f"step_{s:06d}" for s in range(fired - WINDOW + 1, fired)]  # none at the alarm step or after it
    assert not (stopped / "output.json").exists()
    stopped_rows = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r[KEY] for r in stopped_rows if KEY in r] == pytest.approx(series[:fired], rel=1e-5)


def test_the_alarm_can_watch_the_rollouts_reward():
    alarm = Alarm(DiagnosticsConfig(alarm_on=["reward"], alarm_window=2, alarm_drop=0.5))
    fired = [e for step, r in enumerate([0.4, 0.4, 0.3, 0.2, 0.0], start=1)
             for e in alarm.update(step, {"rollout/reward": r, "teacher/t/entropy": 0.0})]
    assert [(e.key, e.step) for e in fired] == [("rollout/reward", 5)]  # step 4: 0.25 (37.5%); step 5: 0.1 (75%)
    assert load_config(None, ["diagnostics.alarm_on=[reward]"]).diagnostics.alarm_on == ["reward"]
