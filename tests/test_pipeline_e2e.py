"""End to end: `mopd run` on a seconds-long specialise-then-unify config (tests/assets/tiny_run.yaml).

One full run (every stage kind) is shared by the tests; the resume and TP=2 tests copy its finished
base and expert stages into a new run folder and redo only the opd stage, so all three opd runs start
from the same weights and teachers and must agree step by step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ASSET = Path(__file__).parent / "assets" / "tiny_run.yaml"
PREFIX_STAGES = ("base", "expert_reverse", "expert_caesar")
# Whole module (its module-scoped full run is shared): every test but the TP=2 one is one process.
pytestmark = pytest.mark.one_process


def mopd_command(*args: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "mopd.cli", *args]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}",
            "-m", "mopd.cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}


def run_mopd(*args: str, nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(mopd_command(*args, nproc=nproc), env=env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"mopd {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def opd_only(run_dir: Path, source: Path) -> list[str]:
    """A run folder holding `source`'s finished base and experts, so `--resume` only runs the opd stage."""
    for name in PREFIX_STAGES:
        shutil.copytree(source / "stages" / name, run_dir / "stages" / name)
    stages = "[" + ", ".join(
        ["{name: base, kind: sft}", "{name: expert_reverse, kind: sft, init_from: base}",
         "{name: expert_caesar, kind: sft, init_from: base}", "{name: unify, kind: opd, role: student, init_from: base}"]
    ) + "]"
    return [f"output_dir={run_dir.parent}", f"name={run_dir.name}", f"stages={stages}"]


def assert_summary_reports_each_stage_own_eval(run_dir: Path, roles: tuple[str, ...]) -> dict:
    """Each summary accuracy is the greedy accuracy its stage recorded (an expert's: the domain's own
    teacher stage); returns the summary."""
    summary = json.loads((run_dir / "summary.json").read_text())
    by_role = {s["role"]: name for name, s in summary["stages"].items()}
    for domain, row in summary["domains"].items():
        for role in roles:
            stage = row["teacher_stage"] if role == "teacher" else by_role[role]
            recorded = json.loads((run_dir / "stages" / stage / "output.json").read_text())["eval"]
            assert row[role] == recorded[domain]["greedy_accuracy"], (domain, role, stage)
    return summary


def history(run_dir: Path, stage: str) -> list[dict]:
    return json.loads((run_dir / "stages" / stage / "output.json").read_text())["history"]


def losses(run_dir: Path, stage: str = "unify") -> list[float]:
    return [row["train/loss"] for row in history(run_dir, stage) if "train/loss" in row]


def kill_after_checkpoint(args: list[str], run_dir: Path, step: int) -> None:
    """Start ``mopd args`` and SIGKILL it once the opd stage's step-``step`` checkpoint exists.

    Its own session, so the kill takes the whole job (dist_checkpointing's writer child too), as a
    scheduler's would; asserts the stage really died mid-way (no output.json).
    """
    proc = subprocess.Popen(mopd_command(*args), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    checkpoint = run_dir / "stages" / "unify" / "checkpoints" / f"step_{step:06d}"
    deadline = time.monotonic() + 300
    while not checkpoint.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read().decode()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "stages" / "unify" / "output.json").exists()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    run_mopd("run", str(ASSET), f"output_dir={out}")
    return out / "tiny"


def test_full_run_writes_every_stage_a_summary_and_a_plot(full_run):
    summary = assert_summary_reports_each_stage_own_eval(
        full_run, ("base", "teacher", "student", "sft_baseline", "weight_average"))
    assert set(summary["stages"]) == {"base", "expert_reverse", "expert_caesar", "unify", "sft_baseline",
                                      "weight_average", "export"}
    assert set(summary["domains"]) == {"reverse", "caesar"}
    assert summary["domains"]["reverse"]["teacher_stage"] == "expert_reverse"
    assert summary["domains"]["caesar"]["teacher_stage"] == "expert_caesar"
    assert all(s["wall_s"] > 0 for name, s in summary["stages"].items() if name != "export")  # a copy: ~ms
    assert (full_run / "summary.png").stat().st_size > 10_000
    keys = set().union(*history(full_run, "unify"))
    for key in ("teacher/rev/kl_sample", "teacher/rot/top1pct_share", "teacher/rev/entropy", "teacher/rot/kl_pos0",
                "teacher/rev/routed_tokens", "timing/generate", "timing/score", "timing/train", "timing/sync",
                "timing/step"):
        assert key in keys, key
    for row in (r for r in history(full_run, "unify") if "train/loss" in r):  # the phases are spans inside the step
        phases = sum(row[f"timing/{p}"] for p in ("generate", "score", "train", "sync"))
        assert phases <= row["timing/step"], row
    periodic = [r["step"] for r in history(full_run, "unify") if "eval/reverse/greedy_accuracy" in r]
    assert periodic == [3.0, 6.0]  # eval.every_steps=3 during opd, for the accuracy-over-steps plot


def test_opd_supervises_every_response_token_and_the_sft_baseline_matches_its_budget(full_run):
    summary = json.loads((full_run / "summary.json").read_text())
    rows = [r for r in history(full_run, "unify") if "train/tokens" in r]
    assert summary["stages"]["unify"]["teacher_tokens"] == sum(int(r["train/tokens"]) for r in rows)
    routed = sum(r["teacher/rev/routed_tokens"] + r["teacher/rot/routed_tokens"] for r in rows)
    assert routed == summary["stages"]["unify"]["teacher_tokens"]
    budget = summary["stages"]["unify"]["teacher_tokens"]
    baseline = summary["stages"]["sft_baseline"]["teacher_tokens"]
    last_step = [r for r in history(full_run, "sft_baseline") if "train/tokens" in r][-1]["train/tokens"]
    assert budget <= baseline < budget + last_step  # stops at the first step that reaches the budget


def test_sft_stages_evaluate_every_n_steps_on_an_engine_synced_with_their_weights(full_run):
    # eval.every_steps=3: the 6-step experts evaluate at 3 and 6; the one at step 6 sees the final
    # weights, so it equals the stage-end evaluation (same prompts, same sampling seeds).
    rows = [r for r in history(full_run, "expert_reverse") if "eval/reverse/greedy_accuracy" in r]
    assert [r["step"] for r in rows] == [3.0, 6.0]
    final = json.loads((full_run / "stages" / "expert_reverse" / "output.json").read_text())["eval"]
    # (periodic evaluations cover the stage's own data.domains, as in opd; the stage-end one every domain)
    assert rows[-1]["eval/reverse/greedy_accuracy"] == final["reverse"]["greedy_accuracy"]
    assert rows[-1]["eval/reverse/pass@2"] == final["reverse"]["pass_at"]["2"]
    assert any("eval/caesar/greedy_accuracy" in r for r in history(full_run, "sft_baseline"))


def test_weight_average_is_the_mean_of_the_experts_and_export_loads(full_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    def weights(stage: str) -> dict[str, torch.Tensor]:
        return load_file(full_run / "stages" / stage / "hf" / "model.safetensors")

    a, b, avg = weights("expert_reverse"), weights("expert_caesar"), weights("weight_average")
    assert a.keys() == avg.keys()
    for name in avg:
        expected = (a[name].double() + b[name].double()) / 2
        assert torch.allclose(avg[name].double(), expected, atol=1e-6), name
    exported = load_file(full_run / "export" / "export" / "model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in weights("unify").items())
    AutoModelForCausalLM.from_pretrained(full_run / "export" / "export")


def held_out_answer_nll(hf_dir: Path, domain: str) -> float:
    """Mean float64 negative log-likelihood of the reference answers (+ EOS) of 16 held-out prompts
    of ``domain``, by transformers from the exported HF folder: a reference independent of mopd's loss."""
    from transformers import AutoModelForCausalLM

    from mopd.data.synthetic import generate
    from mopd.data.tokenizer import build_char_tokenizer

    tok, model = build_char_tokenizer(), AutoModelForCausalLM.from_pretrained(hf_dir).double().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in generate(domain, 16, "eval", seed=11):
            prompt = tok(ex.prompt)["input_ids"]
            answer = tok(ex.reference, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + answer])).logits[0], -1)
            targets = torch.tensor(answer)
            total -= float(logp[len(prompt) - 1:-1].gather(1, targets[:, None]).sum())
            count += len(answer)
    return total / count


def test_sft_makes_each_expert_better_than_the_base_at_its_domain_on_held_out_answers(full_run):
    for expert, domain in (("expert_reverse", "reverse"), ("expert_caesar", "caesar")):
        base = held_out_answer_nll(full_run / "stages" / "base" / "hf", domain)
        trained = held_out_answer_nll(full_run / "stages" / expert / "hf", domain)
        assert trained < base - 0.05, (expert, trained, base)


def test_opd_killed_mid_run_resumes_to_the_same_metrics(full_run, tmp_path):
    run_dir = tmp_path / "killed"
    args = ["run", str(ASSET), *opd_only(run_dir, full_run), "--resume"]
    kill_after_checkpoint(args, run_dir, step=4)
    run_mopd(*args)
    # Same seed, deterministic CPU kernels, seeded sampling per step, restored optimizer and data
    # position: the resumed run reproduces the uninterrupted one to float32 round-off.
    expected, got = losses(full_run), losses(run_dir)
    assert len(got) == len(expected) == 6
    assert max(abs(a - b) / max(abs(a), 1e-8) for a, b in zip(expected, got)) < 1e-4
    final = json.loads((run_dir / "stages" / "unify" / "output.json").read_text())["eval"]
    reference = json.loads((full_run / "stages" / "unify" / "output.json").read_text())["eval"]
    for domain in ("reverse", "caesar"):
        assert final[domain]["greedy_accuracy"] == reference[domain]["greedy_accuracy"]


def test_opd_with_the_student_at_tp2_matches_tp1(full_run, tmp_path):
    run_dir = tmp_path / "tp2"
    run_mopd("run", str(ASSET), *opd_only(run_dir, full_run), "student.parallel.tensor_parallel=2", "--resume",
             nproc=2)
    expected, got = losses(full_run), losses(run_dir)
    assert len(got) == len(expected)
    assert abs(got[0] - expected[0]) / expected[0] < 1e-5  # same weights, same rollouts: only round-off
    assert max(abs(a - b) / max(abs(a), 1e-8) for a, b in zip(expected, got)) < 1e-3


def test_opsd_config_runs_pi_self_distillation_and_reports_before_and_after(tmp_path):
    """configs/local/opsd.yaml, shrunk: the self-teacher (frozen base + the answer in context) scores
    the student's rollouts, and the summary states the base -> student accuracy."""
    config = Path(__file__).resolve().parents[1] / "configs" / "local" / "opsd.yaml"
    shrink = ["student.model.num_layers=2", "student.model.hidden_size=64", "student.model.ffn_hidden_size=128",
              "student.train.global_batch_size=16", "student.train.micro_batch_size=16", "data.num_prompts=100",
              "student.optimizer.warmup_steps=0",
              "eval.num_prompts=8", "eval.samples_per_prompt=2", "eval.pass_k=[1,2]", "checkpoint.save_every=0",
              "eval.at_start=true", "eval.teacher_kl=[self]",
              "logging.wandb_mode=disabled", "logging.progress_bar=false",
              "stages=[{name: base, kind: sft, role: base, overrides: [student.train.steps=6]}, "
              "{name: opsd, kind: opd, role: student, init_from: base, overrides: [student.train.steps=3]}]"]
    run_mopd("run", str(config), f"output_dir={tmp_path}", *shrink)
    summary = assert_summary_reports_each_stage_own_eval(tmp_path / "opsd", ("base", "student"))
    assert any(line.startswith("caesar: base ") for line in summary["verdicts"]["plainly"])
    steps = [r for r in history(tmp_path / "opsd", "opsd") if "train/loss" in r]
    assert len(steps) == 3 and all(r["teacher/self/routed_tokens"] == r["train/tokens"] for r in steps)
    # Before the first step the student IS the teacher's weights, so the teacher's reverse KL to it
    # measures the PI alone: 0 up to float32 round-off (~1e-7) if the answer never reached the
    # teacher's context. (Six base steps barely teach it to read the answer: ~2e-3 nats per token.)
    start = [r for r in history(tmp_path / "opsd", "opsd") if r["step"] == 0.0 and "eval/caesar/teacher_kl/self" in r]
    assert len(start) == 1 and start[0]["eval/caesar/teacher_kl/self"] > 5e-4, start


def test_overlapped_generation_uses_weights_exactly_one_version_old(full_run, tmp_path):
    """rollout.max_staleness=1: step n+1's rollouts are generated while step n trains."""
    run_dir = tmp_path / "overlap"
    run_mopd("run", str(ASSET), *opd_only(run_dir, full_run), "rollout.max_staleness=1",
             "distill.objectives=[{name: forward_kl_topk}, {name: reverse_kl_sampled, coef: 0.1, importance_ratio: true}]",
             "--resume")
    rows = [r for r in history(run_dir, "unify") if "rollout/weight_version" in r]
    synchronous = [r for r in history(full_run, "unify") if "rollout/weight_version" in r]
    assert [r["rollout/weight_version"] for r in synchronous] == [r["step"] - 1 for r in synchronous]
    assert [r["rollout/weight_version"] for r in rows] == [0.0] + [r["step"] - 2 for r in rows[1:]]
    assert len(losses(run_dir)) == 6


def test_mopd_eval_of_a_stage_folder_reproduces_the_stage_own_evaluation(full_run):
    proc = run_mopd("eval", str(ASSET), "--hf-dir", str(full_run / "stages" / "unify" / "hf"))
    printed = json.loads(proc.stdout[proc.stdout.index("{"):])
    recorded = json.loads((full_run / "stages" / "unify" / "output.json").read_text())["eval"]
    assert printed == recorded  # same held-out prompts, same seeds, same weights


def test_an_hf_folder_as_init_from_is_refused_with_the_conversion_command(full_run, tmp_path):
    proc = subprocess.run(mopd_command("run", str(ASSET), f"output_dir={tmp_path}",
                                       f"stages=[{{name: s, kind: sft, init_from: {full_run}/stages/base/hf}}]"),
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "tools/convert_hf.py import" in proc.stderr


def test_per_token_routing_runs_in_the_loop_and_accounts_for_every_token(full_run, tmp_path):
    run_dir = tmp_path / "per_token"
    run_mopd("run", str(ASSET), *opd_only(run_dir, full_run), "distill.router.granularity=token",
             "distill.router.token_rule=confidence", "student.train.steps=2", "--resume")
    rows = [r for r in history(run_dir, "unify") if "train/tokens" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["teacher/rev/routed_tokens"] + r["teacher/rot/routed_tokens"] == r["train/tokens"]
    # Per token, not per prompt: some rollout's tokens went to both teachers, so the rollouts counted
    # per teacher add up to more than the 16 rollouts of a step (per-prompt routing: exactly 16).
    assert any(r["teacher/rev/routed_rollouts"] + r["teacher/rot/routed_rollouts"] > 16 for r in rows), rows


def test_opd_with_sglang_as_the_rollout_engine_over_http(full_run, tmp_path):
    """rollout.engine=sglang against the protocol server (SGLang's own schema checks every request and
    response): rollouts come over HTTP and every step's weights reach the server through disk sync."""
    from safetensors.torch import load_file
    from sglang_protocol_server import ProtocolServer
    from sglang_wheel import load_api_types

    from mopd.rollout.embedded import EmbeddedEngine

    api = load_api_types()
    if api is None:
        pytest.skip("sglang wheel (api_types.py) not installed; launch/setup.sh installs it")
    base_hf = full_run / "stages" / "base" / "hf"
    server = ProtocolServer(EmbeddedEngine.from_pretrained(base_hf, name="server"), api, model_path=str(base_hf)).start()
    run_dir = tmp_path / "sglang"
    try:
        run_mopd("run", str(ASSET), *opd_only(run_dir, full_run), "rollout.engine=sglang",
                 f"rollout.sglang.endpoints=[{server.url}]", "rollout.sglang.weight_sync=disk",
                 f"rollout.sglang.model_path={base_hf}", "student.train.steps=3", "--resume")
    finally:
        server.stop()
    assert server.violations == []
    assert server.calls.count("/update_weights_from_disk") == 4  # initial weights + one per step
    assert server.max_active >= 1  # the rollouts came over HTTP (/generate)
    assert server.engine.weight_version == 3
    final = load_file(run_dir / "stages" / "unify" / "hf" / "model.safetensors")
    held = server.engine.model.state_dict()
    assert all(torch.equal(held[name], tensor) for name, tensor in final.items())
    assert len(list((run_dir / "stages" / "unify" / "weight_sync").glob("v*"))) == 1
