"""`mopd run` with a teacher of another tokenizer: a byte-level BPE student (mopd.data.domain_bpe) distils
from a character-tokenizer expert for a few opd steps. The start-up log says which path each teacher takes,
and the logged cross-tokenizer metrics and loss agree with each other."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mopd.data.domain_bpe import save_domain_bpe
from mopd.data.tokenizer import build_char_tokenizer
from test_pipeline_e2e import ASSET, run_mopd


def char_expert(folder: Path) -> Path:
    """A small random Llama reading characters, saved with its tokenizer like an sft stage's hf/ folder."""
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_bpe_student_distils_from_a_char_expert_through_the_cross_tokenizer_path(tmp_path):
    bpe = save_domain_bpe(tmp_path / "bpe", ["reverse", "caesar"])
    expert = char_expert(tmp_path / "expert")
    teacher = f"{{name: chars, checkpoint: {expert}, tokenizer: char, domains: [reverse, caesar], top_k: 4}}"
    objectives = "[{name: forward_kl_topk}, {name: reverse_kl_sampled}, {name: uld, coef: 0.5}]"
    stages = ("[{name: base, kind: sft, role: base, overrides: [student.train.steps=2]}, "
              "{name: unify, kind: opd, role: student, init_from: base, overrides: [student.train.steps=3]}]")
    proc = run_mopd("run", str(ASSET), f"output_dir={tmp_path}", "name=cross", f"data.tokenizer={bpe}",
                    "student.model.vocab_size=320", f"distill.teachers=[{teacher}]",
                    f"distill.objectives={objectives}", f"stages={stages}", "eval.every_steps=0")
    # 96 characters map to the BPE's byte tokens; <pad> and <bos> to its own, <eos> to its <eos>.
    assert "teacher 'chars': cross-tokenizer (100 teacher tokens, 99 of them map to a student token" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "cross" / "stages" / "unify" / "metrics.jsonl").open()]
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
