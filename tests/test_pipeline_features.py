"""Advertised features reached through `mopd run`, each asserted by a property that would not hold if
the feature were silently off (tests/assets/tiny_run.yaml, shrunk).

One prefix run trains the base and the two experts; each opd run below copies them and checks a
group of features at once, so the whole file costs three short opd runs and one `mopd eval`:

- the loop run: ``sampling.n=2``, ``max_seq_len`` truncation, a frozen and an EMA PI self-teacher
  whose reverse KL to the student is measured at every evaluation, ``keep_last``, the wandb sink in
  offline mode; and the same run killed and resumed (the EMA teacher's state crosses ``--resume``);
- the JSONL run: routing rules on record metadata, and held-out evaluation on ``data.eval_path``
  with ``eval.num_prompts`` honoured;
- held-out evaluation of an HF dataset's ``data.eval_split``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_pipeline_e2e import ASSET, env, history, kill_after_checkpoint, losses, mopd_command, opd_only, run_mopd

from mopd.config import load_config
from mopd.data.synthetic import PiMode, generate
from mopd.errors import ConfigError

TEACHERS = ("distill.teachers=[{name: rev, checkpoint: expert_reverse, domains: [reverse], top_k: 4}, "
            "{name: rot, checkpoint: expert_caesar, domains: [caesar], top_k: 4}, "
            "{name: frozen, kind: self_pi, top_k: 4}, {name: ema, kind: self_pi, ema_decay: 0.5, top_k: 4}]")
LOOP = [TEACHERS, "eval.teacher_kl=[frozen, ema]", "eval.every_steps=2", "rollout.sampling.n=2",
        "student.train.max_seq_len=20", "checkpoint.save_every=1", "checkpoint.keep_last=2",
        "logging.wandb_mode=offline"]


def wandb_env(run_dir: Path) -> dict[str, str]:
    e = {k: v for k, v in env().items() if k != "WANDB_MODE"}
    return {**e, "WANDB_SILENT": "true", "WANDB_CACHE_DIR": str(run_dir / ".wandb_cache"),
            "WANDB_CONFIG_DIR": str(run_dir / ".wandb_config")}


def run_with_env(args: list[str], environ: dict[str, str]) -> None:
    proc = subprocess.run(mopd_command(*args), env=environ, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mopd {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def output(run_dir: Path, stage: str = "unify") -> dict:
    return json.loads((run_dir / "stages" / stage / "output.json").read_text())


def steps(run_dir: Path) -> list[dict]:
    return [r for r in history(run_dir, "unify") if "train/loss" in r]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prefix")
    stages = ("stages=[{name: base, kind: sft, role: base, overrides: [student.train.steps=4]}, "
              "{name: expert_reverse, kind: sft, init_from: base, overrides: [\"data.domains=[reverse]\"]}, "
              "{name: expert_caesar, kind: sft, init_from: base, overrides: [\"data.domains=[caesar]\"]}]")
    run_mopd("run", str(ASSET), f"output_dir={out}", stages, "eval.samples_per_prompt=0", "eval.pass_k=[]")
    return out / "tiny"


@pytest.fixture(scope="module")
def loop_run(prefix, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("loop") / "loop"
    run_with_env(["run", str(ASSET), *opd_only(run_dir, prefix), *LOOP, "--resume"], wandb_env(run_dir))
    return run_dir


def test_two_samples_per_prompt_reach_the_loop(loop_run):
    # 16 rollouts a step from 8 prompts: per-prompt routing sends both samples of a prompt to one
    # teacher, so every teacher's rollout count is even (one sample per prompt gives odd counts).
    rows = steps(loop_run)
    assert len(rows) == 6
    for r in rows:
        counts = [r[f"teacher/{t}/routed_rollouts"] for t in ("rev", "rot", "frozen", "ema")]
        assert sum(counts) == 16 and all(c % 2 == 0 for c in counts), counts


def test_rollouts_longer_than_max_seq_len_are_truncated_and_counted(loop_run):
    rows = steps(loop_run)
    assert sum(r["train/truncated_rollouts"] for r in rows) > 0
    assert all(r["train/truncated_tokens"] >= r["train/truncated_rollouts"] for r in rows)


def test_the_ema_self_teacher_follows_the_student_and_the_frozen_one_does_not(loop_run):
    evals = [r for r in history(loop_run, "unify") if "eval/reverse/teacher_kl/ema" in r]
    assert [r["step"] for r in evals] == [2.0, 4.0, 6.0]
    for r in evals:
        for domain in ("reverse", "caesar"):
            ema, frozen = r[f"eval/{domain}/teacher_kl/ema"], r[f"eval/{domain}/teacher_kl/frozen"]
            # Both see the same PI; the EMA (decay 0.5) sits near the current student, the frozen copy
            # at the initial weights the student has trained away from.
            assert ema < frozen, (r["step"], domain, ema, frozen)


def test_keep_last_prunes_older_checkpoints(loop_run):
    kept = sorted(p.name for p in (loop_run / "stages" / "unify" / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_000005", "step_000006"]


def test_the_wandb_sink_writes_its_offline_run(loop_run):
    runs = list((loop_run / "stages" / "unify" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    assert any(p.stat().st_size > 0 for p in runs[0].glob("run-*.wandb"))


def test_the_ema_teacher_state_crosses_a_killed_and_resumed_run(prefix, loop_run, tmp_path):
    run_dir = tmp_path / "killed"
    args = ["run", str(ASSET), *opd_only(run_dir, prefix), *LOOP, "logging.wandb_mode=disabled", "--resume"]
    kill_after_checkpoint(args, run_dir, step=3)
    run_mopd(*args)
    expected, got = losses(loop_run), losses(run_dir)
    assert len(got) == 6 and max(abs(a - b) / abs(b) for a, b in zip(got, expected)) < 1e-4
    # The last evaluation reads the EMA teacher restored from the checkpoint and updated since.
    for domain in ("reverse", "caesar"):
        want = output(loop_run)["eval"][domain]["teacher_kl"]
        have = output(run_dir)["eval"][domain]["teacher_kl"]
        assert have["ema"] == pytest.approx(want["ema"], rel=1e-4), domain
        assert have["frozen"] == pytest.approx(want["frozen"], rel=1e-4), domain


def write_jsonl(path: Path, domains: dict[str, int], split: str, src: dict[str, str]) -> None:
    rows = []
    for domain, count in domains.items():
        for ex in generate(domain, count, split, seed=5):
            rows.append({"prompt": ex.prompt, "domain": domain, "reference": ex.reference,
                         "pi": ex.pi(PiMode.answer), "src": src[domain]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def jsonl_run(prefix, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("jsonl")
    write_jsonl(folder / "train.jsonl", {"reverse": 40, "caesar": 40}, "train", {"reverse": "flip", "caesar": "plain"})
    write_jsonl(folder / "eval.jsonl", {"reverse": 5}, "eval", {"reverse": "flip"})
    run_dir = folder / "jsonl"
    run_mopd("run", str(ASSET), *opd_only(run_dir, prefix), "data.source=jsonl", f"data.path={folder / 'train.jsonl'}",
             f"data.eval_path={folder / 'eval.jsonl'}", "eval.num_prompts=3", "student.train.steps=2",
             "distill.router.rules=[{teacher: rot, metadata_key: src, metadata_pattern: '^flip$'}]", "--resume")
    return run_dir


def test_a_metadata_rule_routes_by_the_records_fields_in_the_loop(jsonl_run):
    # Every reverse record says src=flip, and the rule sends those to rot: rev (the domain's own
    # teacher) supervises nothing, rot everything.
    rows = steps(jsonl_run)
    assert len(rows) == 2
    for r in rows:
        assert r["teacher/rev/routed_tokens"] == 0 and r["teacher/rot/routed_tokens"] == r["train/tokens"] > 0
        assert r["teacher/rot/routed_rollouts"] == 16


def test_jsonl_evaluation_reads_the_held_out_file_and_takes_eval_num_prompts(jsonl_run):
    evaluation = output(jsonl_run)["eval"]
    assert set(evaluation) == {"reverse"}  # the eval file has one domain; training had two
    assert evaluation["reverse"]["num_prompts"] == 3  # of the file's 5


def test_hf_evaluation_reads_the_eval_split_and_takes_eval_num_prompts(prefix, tmp_path):
    import datasets

    def split(domain: str, count: int, name: str) -> datasets.Dataset:
        return datasets.Dataset.from_list([{"prompt": ex.prompt, "domain": domain, "reference": ex.reference}
                                           for ex in generate(domain, count, name, seed=5)])

    train = datasets.concatenate_datasets([split("reverse", 10, "train"), split("caesar", 10, "train")])
    datasets.DatasetDict({"train": train, "test": split("caesar", 6, "eval")}).save_to_disk(str(tmp_path / "ds"))
    proc = run_mopd("eval", str(ASSET), "--hf-dir", str(prefix / "stages" / "base" / "hf"), "data.source=hf",
                    f"data.path={tmp_path / 'ds'}", "data.eval_split=test", "eval.num_prompts=4")
    printed = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert set(printed) == {"caesar"} and printed["caesar"]["num_prompts"] == 4


@pytest.mark.parametrize("overrides,key", [
    (["data.source=jsonl", "data.path=/data/train.jsonl"], "data.eval_path"),
    (["data.source=jsonl", "data.path=/data/train.jsonl", "data.eval_path=/data/train.jsonl"], "data.eval_path"),
    (["data.source=hf", "data.path=/data/ds", "data.eval_split=train"], "data.eval_split"),
    (["data.eval_split=train"], "data.eval_split"),
    (["data.source=jsonl", "data.path=/data/train.jsonl", "data.eval_path=/data/eval.jsonl", "data.split=test"],
     "data.split"),
])
def test_evaluating_on_the_training_prompts_is_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ASSET, overrides)
    if key != "data.split":
        load_config(ASSET, [*overrides, "eval.allow_train_prompts=true"])  # unless asked for


def _stage_run(overlong: str, max_seq_len: int = 10):
    from types import SimpleNamespace

    from mopd.data.tokenizer import build_char_tokenizer

    config = load_config(ASSET, [f"student.train.max_seq_len={max_seq_len}", f"student.train.overlong={overlong}"])
    return SimpleNamespace(config=config, ctx=SimpleNamespace(tokenizer=build_char_tokenizer()), length_metrics={})


def _rollout(prompt: int, response: int, index: int = 0):
    import torch

    from mopd.types import Rollout

    return Rollout(prompt_ids=torch.arange(2, 2 + prompt), response_ids=torch.arange(3, 3 + response),
                   behaviour_logprobs=torch.full((response,), -0.5), finish="stop", weight_version=0,
                   domain="reverse", prompt_index=index)


def test_max_seq_len_truncates_the_response_and_counts_or_refuses_naming_the_key():
    from mopd.errors import DataError
    from mopd.stages.training import fit_to_max_seq_len

    run = _stage_run("truncate")
    fitted = fit_to_max_seq_len(run, [_rollout(4, 3), _rollout(6, 9, index=1)])
    assert [r.response_ids.numel() for r in fitted] == [3, 4]  # 6 + 4 = max_seq_len
    assert fitted[1].finish == "length" and fitted[1].behaviour_logprobs.numel() == 4
    assert run.length_metrics == {"train/truncated_rollouts": 1.0, "train/truncated_tokens": 5.0}
    with pytest.raises(DataError, match=r"student\.train\.max_seq_len=10: rollout 1 \(prompt 1"):
        fit_to_max_seq_len(_stage_run("refuse"), [_rollout(4, 3), _rollout(6, 9, index=1)])
    with pytest.raises(DataError, match="its prompt alone fills it"):
        fit_to_max_seq_len(run, [_rollout(10, 2)])


def test_config_time_refusals_name_their_keys():
    with pytest.raises(ConfigError, match=r"rollout\.max_staleness=2"):
        load_config(ASSET, ["rollout.max_staleness=2"])
    with pytest.raises(ConfigError, match=r"distill\.objectives\[0\]\.name='reverse_kl_student_topk'.*in-trainer"):
        load_config(ASSET, ["distill.objectives=[{name: reverse_kl_student_topk}]"])
    with pytest.raises(ConfigError, match=r"student\.train\.max_seq_len=128: must not exceed model\.max_position"):
        load_config(ASSET, ["student.train.max_seq_len=128"])
