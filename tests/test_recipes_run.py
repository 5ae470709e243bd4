"""Each shipped recipe (configs/recipes/*.yaml) runs end to end at its real shape of options.

Kept from the recipe: its stages, objectives, teachers (names, kinds, engines, domains, PI template,
top-K), router, sampling (``n``), the SGLang client settings (weight_sync, num_servers) and the
data source kind. Replaced: the model by a 2-layer one of the same family, the parallel sizes by
one CPU rank (fp32, no FP8/sequence parallelism), the step counts and lengths, every path (a tiny
converted checkpoint as the first stage's ``init_from``, JSONL files written here, the HF folder of
that checkpoint for every SGLang model), and every SGLang server by the protocol server
(tests/sglang_protocol_server.py: a real HTTP server speaking SGLang's wire protocol, joining the
weight-update group over gloo). A recipe that would fail at stage start fails here.

Departure, said where it applies: a recipe with ``rollout.sglang.launch: true`` is run with
``launch: false`` on servers started here, since a CPU machine has no GPUs to place launched
servers on (the launch path itself: tests/test_sglang_launcher.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from sglang_protocol_server import ProtocolServer
from test_pipeline_e2e import ASSET, env

from mopd.data.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
TINY = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 128,
        "vocab_size": 100, "make_vocab_size_divisible_by": 32, "max_position_embeddings": 64}


def tiny_model(recipe_model: dict) -> dict:
    """The recipe's model section at tiny sizes: same family, RoPE, norms and qk-layernorm."""
    model = {**recipe_model, **TINY}
    if "head_dim" in model:
        model["head_dim"] = TINY["hidden_size"] // TINY["num_attention_heads"]
    return model


def prefix_checkpoint(model: dict, out: Path) -> Path:
    """One sft step of the tiny model: its Megatron weights and HF folder (with the char tokenizer)."""
    cfg = yaml.safe_load(ASSET.read_text())
    cfg.update(name="prefix", stages=[{"name": "base", "kind": "sft", "evaluate": False}])
    cfg["student"]["model"] = model
    cfg["student"]["train"]["steps"] = 1
    cfg["logging"] = {"wandb_mode": "disabled", "progress_bar": False}
    path = out / "prefix.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "mopd.cli", "run", str(path), f"output_dir={out}"], env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out / "prefix" / "stages" / "base"


def write_jsonl(path: Path, domains: list[str], split: str, pi_field: str | None) -> None:
    """Prompts for the recipe's domains (synthetic tasks under the recipe's domain names)."""
    tasks = ("reverse", "caesar", "addition")
    rows = []
    for i, domain in enumerate(domains):
        for ex in generate(tasks[i % len(tasks)], 12, split, seed=3):
            row = {"prompt": ex.prompt, "domain": domain, "reference": ex.reference}
            if pi_field:
                row[pi_field] = ex.reference
            rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def servers(hf_dir: Path, count: int) -> list[ProtocolServer]:
    from mopd.rollout.embedded import EmbeddedEngine

    torch.set_num_threads(1)
    return [ProtocolServer(EmbeddedEngine.from_pretrained(hf_dir, name=f"server{i}"), None,
                           model_path=str(hf_dir)).start() for i in range(count)]


def shrink(recipe: dict, base: Path, data_dir: Path, rollout: list[ProtocolServer]) -> dict:
    cfg = json.loads(json.dumps(recipe))  # a deep copy
    hf = str(base / "hf")
    student = cfg["student"]
    student["model"] = tiny_model(student["model"])
    student["parallel"] = {"tensor_parallel": 1, "pipeline_parallel": 1}
    student["precision"] = {"dtype": "fp32"}
    n = cfg.get("rollout", {}).get("sampling", {}).get("n", 1)
    student["train"] = {**student.get("train", {}), "steps": 2, "global_batch_size": 4 * n, "micro_batch_size": 2 * n,
                        "max_seq_len": 40, "loss_chunk_tokens": 256}
    student["optimizer"] = {**student.get("optimizer", {}), "warmup_steps": 0}
    cfg["rollout"]["sampling"]["max_new_tokens"] = 8
    sg = cfg["rollout"]["sglang"]
    sg.update({"launch": False, "model_path": hf, "tp": 1, "endpoints": [rollout[0].url],
               "worker_urls": [s.url for s in rollout], "num_servers": len(rollout),
               "weight_sync_address": "127.0.0.1"})
    for teacher in cfg["distill"]["teachers"]:
        if teacher.get("checkpoint"):
            teacher["checkpoint"] = hf
        teacher["top_k"] = 4
    data = cfg["data"]
    domains = sorted({d for t in cfg["distill"]["teachers"] for d in t.get("domains", [])}) or ["math"]
    pi_field = data.get("pi_field") if any(t.get("kind") == "self_pi" for t in cfg["distill"]["teachers"]) else None
    write_jsonl(data_dir / "train.jsonl", domains, "train", pi_field)
    write_jsonl(data_dir / "eval.jsonl", domains, "eval", pi_field)
    data.update({"path": str(data_dir / "train.jsonl"), "eval_path": str(data_dir / "eval.jsonl"),
                 "tokenizer": "char", "max_prompt_tokens": 32})
    cfg["eval"] = {**cfg.get("eval", {}), "num_prompts": 2, "samples_per_prompt": 0, "pass_k": []}
    cfg["checkpoint"] = {k: v for k, v in cfg.get("checkpoint", {}).items() if k not in ("load", "dir")}
    cfg["checkpoint"]["save_every"] = 1
    cfg["logging"] = {"wandb_mode": "disabled", "progress_bar": False}
    cfg["stages"][0]["init_from"] = str(base / "weights")  # the recipe's starting checkpoint
    return cfg


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_the_recipe_runs_every_stage_against_sglang_protocol_servers(recipe, tmp_path):
    spec = yaml.safe_load(recipe.read_text())
    base = prefix_checkpoint(tiny_model(spec["student"]["model"]), tmp_path)
    num = spec["rollout"]["sglang"].get("num_servers", 1)
    rollout = servers(base / "hf", num)
    sglang_teachers = [t for t in spec["distill"]["teachers"] if t.get("engine") == "sglang"]
    teacher_servers = servers(base / "hf", len(sglang_teachers))
    teacher_env = {f"MOPD_TEACHER_URL_{t['name'].upper()}": s.url for t, s in zip(sglang_teachers, teacher_servers)}
    (tmp_path / "data").mkdir()
    config = tmp_path / recipe.name
    config.write_text(yaml.safe_dump(shrink(spec, base, tmp_path / "data", rollout)))
    try:
        proc = subprocess.run([sys.executable, "-m", "mopd.cli", "run", str(config), f"output_dir={tmp_path / 'runs'}"],
                              env={**env(), **teacher_env}, capture_output=True, text=True, timeout=900)
    finally:
        for s in rollout + teacher_servers:
            s.stop()
    assert proc.returncode == 0, f"{recipe.name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    run_dir = tmp_path / "runs" / spec["name"]
    for stage in spec["stages"]:
        assert (run_dir / "stages" / stage["name"] / "output.json").is_file(), stage["name"]
    # The rollouts came from the servers, and every worker received the weights of every step
    # through the recipe's weight sync.
    assert rollout[0].generate_calls > 0
    for s in rollout:
        assert s.engine.weight_version == 2, (s.url, s.engine.weight_version)
    # The SGLang teachers scored the rollouts (prefill-only /generate calls).
    assert sum(s.generate_calls for s in teacher_servers) > 0 or not teacher_servers
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["stages"]) == {s["name"] for s in spec["stages"]}
