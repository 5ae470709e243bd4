"""`mopd run` with a teacher of another tokenizer: a byte-level BPE student (mopd.data.domain_bpe) distils
from a character-tokenizer expert for a few opd steps. The expert is a stage of the same run, trained with
the char tokenizer its overrides name (pipeline.stage_tokenizers). The start-up log says which path each
teacher takes, and the logged cross-tokenizer metrics and loss agree with each other."""

from __future__ import annotations

import json
import math

import pytest

from mopd.config import load_config
from mopd.data.domain_bpe import save_domain_bpe
from mopd.errors import ConfigError
from mopd.pipeline import run_pipeline
from test_pipeline_e2e import ASSET, run_mopd

pytestmark = pytest.mark.one_process
CHAR_STAGE = ("{name: char_expert, kind: sft, role: teacher, overrides: [data.tokenizer=char, student.model.vocab_size=100, "
              "student.train.steps=2]}")


def test_a_bpe_student_distils_from_a_char_expert_through_the_cross_tokenizer_path(tmp_path):
    bpe = save_domain_bpe(tmp_path / "bpe", ["reverse", "caesar"])
    teacher = "{name: chars, checkpoint: char_expert, tokenizer: char_expert, domains: [reverse, caesar], top_k: 4}"
    objectives = "[{name: forward_kl_topk}, {name: reverse_kl_sampled}, {name: uld, coef: 0.5}]"
    stages = (f"[{CHAR_STAGE}, {{name: base, kind: sft, role: base, overrides: [student.train.steps=2]}}, "
              "{name: unify, kind: opd, role: student, init_from: base, overrides: [student.train.steps=3]}]")
    proc = run_mopd("run", str(ASSET), f"output_dir={tmp_path}", "name=cross", f"data.tokenizer={bpe}",
                    "student.model.vocab_size=320", f"distill.teachers=[{teacher}]",
                    f"distill.objectives={objectives}", f"stages={stages}", "eval.every_steps=0")
    # The expert's own folder holds the char tokenizer it was trained with; the student's the BPE.
    run = tmp_path / "cross" / "stages"
    assert json.loads((run / "char_expert" / "hf" / "config.json").read_text())["vocab_size"] == 100
    assert json.loads((run / "unify" / "hf" / "config.json").read_text())["vocab_size"] == 320
    # 96 characters map to the BPE's byte tokens; <pad> and <bos> to its own, <eos> to its <eos>.
    assert "teacher 'chars': cross-tokenizer (100 teacher tokens, 99 of them map to a student token" in proc.stdout
    rows = [json.loads(line) for line in (run / "unify" / "metrics.jsonl").open()]
    steps = [r for r in rows if "teacher/chars/aligned_fraction" in r]
    assert len(steps) == 3
    for r in steps:
        m = {k.removeprefix("teacher/chars/"): v for k, v in r.items() if k.startswith("teacher/chars/")}
        # A BPE student writes merged pieces ("ey", "rev"): one student token against several characters,
        # so not every chunk is 1:1, while a character never spans two student tokens.
        assert 0.0 < m["aligned_fraction"] < 1.0 and m["unscored_fraction"] >= 0.0
        assert m["chunks/len"] == 1.0
        assert 0.0 < m["aligned/mapped_topk_mass"] <= 1.0 + 1e-6
        terms = m["loss/forward_kl_topk"] + m["loss/reverse_kl_sampled"] + 0.5 * m["loss/uld"]
        assert math.isclose(m["loss"], terms, rel_tol=1e-4, abs_tol=1e-6)
        # Per token, the chunk KL estimate summed over chunks equals the per-chunk mean times chunks/token.
        chunks_per_token = m["chunks/tokens"] / m["tokens"]
        assert math.isclose(m["reverse_kl_est"], m["chunks/kl_est"] * chunks_per_token, rel_tol=1e-4, abs_tol=1e-5)
        assert all(math.isfinite(v) for v in m.values())
    # Each stage is seeded afresh: the base draws the same random weights as where it is the first stage.
    run_mopd("run", str(ASSET), f"output_dir={tmp_path}", "name=alone", f"data.tokenizer={bpe}",
             "student.model.vocab_size=320", "stages=[{name: base, kind: sft, role: base, overrides: [student.train.steps=2]}]")
    first_loss = [json.loads((tmp_path / name / "stages" / "base" / "metrics.jsonl").open().readline())["train/loss"]
                  for name in ("cross", "alone")]
    assert first_loss[0] == first_loss[1]


def test_weights_and_sft_targets_pass_only_between_stages_of_one_tokenizer(tmp_path):
    bpe = save_domain_bpe(tmp_path / "bpe", ["reverse", "caesar"])
    run = [f"output_dir={tmp_path}", f"data.tokenizer={bpe}", "student.model.vocab_size=320"]
    with pytest.raises(ConfigError, match=r"stages\[unify\]\.init_from='char_expert': that stage's tokenizer is "
                                          r"data.tokenizer='char' \(student.model.vocab_size=100\), this one's "):
        run_pipeline(load_config(ASSET, [*run, f"stages=[{CHAR_STAGE}, {{name: unify, kind: opd, role: student, "
                                               "init_from: char_expert}]"]))
    with pytest.raises(ConfigError, match=r"stages\[sft\]\.sources='char_expert': that stage's tokenizer"):
        run_pipeline(load_config(ASSET, [*run, "distill.teachers=[{name: c, checkpoint: char_expert, domains: [reverse]}]",
                                         f"stages=[{CHAR_STAGE}, {{name: sft, kind: sft, sources: [char_expert]}}]"]))
    assert not (tmp_path / "tiny").exists()  # refused before the run folder was made
