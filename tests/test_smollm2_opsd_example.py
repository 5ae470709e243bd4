"""The real-model example (configs/local/smollm2_opsd.yaml): its data, its config, and that its first stage
starts from the imported SmolLM2 checkpoint with the rule shown to the self-teacher as a system message.
The full run is measured by hand (see the config's header), not here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mopd.config import PIPlacement, TeacherKind, load_config
from mopd.data import identity
from mopd.data.sources import build_source
from mopd.pipeline import load_tokenizer
from mopd.stages.context import RunContext
from mopd.stages.training import init_weights
from mopd.teachers import Router, SelfPITeacher, check_pi_coverage
from mopd.types import Rollout

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "local" / "smollm2_opsd.yaml"
DATA = ROOT / "configs" / "local" / "data"


def test_the_committed_questions_are_what_the_generator_writes_and_eval_phrasings_never_train(tmp_path):
    train, eval_ = identity.write(tmp_path, "Zorblax")
    assert train.read_bytes() == (DATA / "zorblax_train.jsonl").read_bytes()
    assert eval_.read_bytes() == (DATA / "zorblax_eval.jsonl").read_bytes()
    train_q = [json.loads(line)["prompt"] for line in train.read_text().splitlines()]
    eval_q = [json.loads(line)["prompt"] for line in eval_.read_text().splitlines()]
    assert len(set(train_q)) == len(train_q) == 96 and len(set(eval_q)) == len(eval_q) == 24
    for core in identity.EVAL_CORES:  # no eval core phrasing occurs in any training question
        assert not any(core[1:].rstrip("?.").lower() in q.lower() for q in train_q), core
    assert {c for c in identity.EVAL_CORES if any(c[1:] in q for q in eval_q)} == set(identity.EVAL_CORES)


@pytest.fixture()
def config(monkeypatch, smollm2_hf, smollm2_megatron_tp1):
    monkeypatch.setenv("MOPD_SMOLLM2_HF", str(smollm2_hf))
    monkeypatch.setenv("MOPD_SMOLLM2_MEGATRON", str(smollm2_megatron_tp1))
    monkeypatch.chdir(ROOT)  # the data paths are relative to the repository, as `mopd run` is started
    return load_config(CONFIG)


def test_the_example_starts_its_first_stage_from_the_imported_checkpoint_it_matches(config, smollm2_megatron_tp1):
    (stage,) = config.stages
    ctx = RunContext(config=config, layout=None, run_dir=Path("unused"), tokenizer=None)
    assert init_weights(ctx, stage) == smollm2_megatron_tp1
    assert (smollm2_megatron_tp1 / "metadata.json").is_file()  # a dist_checkpointing folder, not an HF one
    imported = yaml.safe_load((smollm2_megatron_tp1 / "mopd_model.yaml").read_text())["student"]["model"]
    ours = {k: (v.value if hasattr(v, "value") else v) for k, v in vars(config.student.model).items()}
    assert ours == imported  # the student built from this config is the checkpoint's architecture
    assert config.student.parallel.tensor_parallel == 1


def test_the_example_shows_the_rule_as_a_system_message_and_evaluates_on_held_out_questions(config):
    tokenizer = load_tokenizer(config)
    assert len(tokenizer) == config.student.model.vocab_size == 49152
    train = build_source(config.data, tokenizer, seed=config.seed)
    held_out = build_source(config.data, tokenizer, seed=config.seed, split="eval")
    assert len(train) == 96 and len(held_out) == 24
    assert not {p.text for p in train} & {p.text for p in held_out}
    for p in held_out:  # held-out prompts without the rule: the template's default system message only
        assert p.messages == ({"role": "user", "content": p.text},)
        assert p.reference == "Zorblax" and p.pi is None
    (cfg,) = config.distill.teachers
    assert cfg.kind == TeacherKind.self_pi and cfg.pi_placement == PIPlacement.system
    check_pi_coverage(list(train), config.distill.teachers, Router(config.distill.router, config.distill.teachers))
    teacher = SelfPITeacher(cfg, None, tokenizer)  # the context needs no engine
    p = train[0]
    r = Rollout(prompt_ids=p.ids, response_ids=torch.tensor([2]), behaviour_logprobs=torch.zeros(1), finish="stop",
                weight_version=0, domain=p.domain, prompt_index=p.index, messages=p.messages)
    expected = tokenizer.apply_chat_template([{"role": "system", "content": cfg.shared_pi},
                                              {"role": "user", "content": p.text}],
                                             tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(teacher.context(r)) == expected
    assert config.eval.at_start and config.eval.teacher_kl == ["self"] and config.data.verifiers == {"identity": "mentions"}
