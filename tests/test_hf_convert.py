"""HF -> Megatron -> HF round trips, bad checkpoints, and atomic outputs (in-process, world size 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mopd.config import load_config
from mopd.errors import CheckpointError
from mopd.hf import export_hf, import_hf
from mopd.hf import mapping as hf_mapping
from mopd.hf.cli import main as cli_main

pytestmark = pytest.mark.timeout(240)


def _save_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1").save_pretrained(path)


def _hf_checkpoint(path: Path, family: str, dtype: torch.dtype, *, tied: bool, shard: str | None = None):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls, arch = {"llama": (LlamaConfig, "LlamaForCausalLM"), "qwen2": (Qwen2Config, "Qwen2ForCausalLM")}[family]
    config = cls(architectures=[arch], vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    _save_tokenizer(path, 200)
    return model


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def llama_fp32_sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    model = _hf_checkpoint(root / "hf", "llama", torch.float32, tied=False, shard="30KB")
    return root, model


@pytest.mark.parametrize("family,dtype,tied,shard", [("llama", torch.float32, False, "30KB"),
                                                     ("qwen2", torch.bfloat16, True, None)])
def test_export_of_import_is_bit_identical_to_the_original_safetensors(tmp_path, family, dtype, tied, shard):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = _hf_checkpoint(tmp_path / "hf", family, dtype, tied=tied, shard=shard)
    import_hf(tmp_path / "hf", tmp_path / "meg", tp=2)
    export_hf(tmp_path / "meg", tmp_path / "out", max_shard_bytes=40_000)
    original, exported = _tensors(tmp_path / "hf"), _tensors(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name
    assert PreTrainedTokenizerFast.from_pretrained(tmp_path / "out")("w5 w7")["input_ids"] == [5, 7]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["eos_token_id"], config["tie_word_embeddings"]) == (1, tied)
    assert (tmp_path / "out" / "generation_config.json").is_file()


def test_import_writes_a_model_section_a_run_config_can_include(llama_fp32_sharded, tmp_path):
    root, model = llama_fp32_sharded
    cfg = import_hf(root / "hf", tmp_path / "meg")
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(f"include: [{tmp_path / 'meg' / 'mopd_model.yaml'}]\n")
    loaded = load_config(run_yaml).student.model
    assert loaded == cfg
    assert (loaded.num_query_groups, loaded.ffn_hidden_size, loaded.vocab_size) == (2, 48, 200)
    assert (tmp_path / "meg" / "tokenizer.json").is_file() and (tmp_path / "meg" / "metadata.json").is_file()


def _single_file_copy(src: Path, dst: Path, edit) -> Path:
    """`src` as one model.safetensors with `edit(tensors)` applied, plus its config and tokenizer."""
    dst.mkdir()
    tensors = edit(_tensors(src))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if not f.name.endswith((".safetensors", ".index.json")):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "a half-written folder was left behind"


@pytest.mark.parametrize("edit,message", [
    (lambda t: {k: v for k, v in t.items() if k != "model.layers.1.self_attn.k_proj.weight"},
     r"missing tensor 'model.layers.1.self_attn.k_proj.weight'"),
    (lambda t: {**t, "model.layers.0.self_attn.rogue.weight": torch.zeros(2)},
     r"does not know, e.g. 'model.layers.0.self_attn.rogue.weight'"),
    (lambda t: {**t, "model.layers.0.mlp.up_proj.weight": torch.zeros(40, 32)},
     r"'model.layers.0.mlp.up_proj.weight' has shape \(40, 32\), but config.json implies \(48, 32\)"),
], ids=["missing", "extra", "wrong_shape"])
def test_bad_hf_tensors_are_refused_naming_the_tensor_and_nothing_is_written(llama_fp32_sharded, tmp_path, edit,
                                                                              message):
    root, _ = llama_fp32_sharded
    bad = _single_file_copy(root / "hf", tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=message):
        import_hf(bad, tmp_path / "meg")
    _assert_nothing_written(tmp_path / "meg")


def test_tp_that_does_not_divide_query_groups_is_refused_before_writing(llama_fp32_sharded, tmp_path):
    root, _ = llama_fp32_sharded
    with pytest.raises(Exception, match=r"parallel.tensor_parallel=4: must divide the query groups \(2\)"):
        import_hf(root / "hf", tmp_path / "meg", tp=4)
    _assert_nothing_written(tmp_path / "meg")


def test_import_that_fails_midway_leaves_no_output_folder(llama_fp32_sharded, tmp_path, monkeypatch):
    root, _ = llama_fp32_sharded
    calls = []
    real = hf_mapping.to_megatron

    def failing(rule, *args):
        calls.append(rule.megatron)
        if len(calls) == 5:
            raise OSError("disk full (simulated)")
        return real(rule, *args)

    monkeypatch.setattr(hf_mapping, "to_megatron", failing)
    with pytest.raises(OSError, match="simulated"):
        import_hf(root / "hf", tmp_path / "meg")
    assert len(calls) == 5
    _assert_nothing_written(tmp_path / "meg")


def test_export_that_fails_midway_leaves_no_output_folder(llama_fp32_sharded, tmp_path, monkeypatch):
    root, _ = llama_fp32_sharded
    import_hf(root / "hf", tmp_path / "meg")
    from mopd.hf import stream

    real = stream.ShardedSafetensorsWriter.write

    def failing(self, name, tensor):
        if name == "model.layers.1.input_layernorm.weight":
            raise OSError("disk full (simulated)")
        return real(self, name, tensor)

    monkeypatch.setattr(stream.ShardedSafetensorsWriter, "write", failing)
    with pytest.raises(OSError, match="simulated"):
        export_hf(tmp_path / "meg", tmp_path / "out", max_shard_bytes=10_000)
    _assert_nothing_written(tmp_path / "out")


def test_existing_output_folder_is_never_overwritten(llama_fp32_sharded, tmp_path):
    root, _ = llama_fp32_sharded
    (tmp_path / "meg").mkdir()
    (tmp_path / "meg" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        import_hf(root / "hf", tmp_path / "meg")
    assert (tmp_path / "meg" / "keep.txt").read_text() == "mine"


def test_export_of_a_folder_that_is_not_a_checkpoint_names_it(tmp_path):
    with pytest.raises(CheckpointError, match=r"not a Megatron dist_checkpointing checkpoint \(no metadata.json\)"):
        export_hf(tmp_path, tmp_path / "out")


def test_cli_round_trip_and_error_exit_code(llama_fp32_sharded, tmp_path, capsys):
    root, _ = llama_fp32_sharded
    assert cli_main(["import", "--hf-dir", str(root / "hf"), "--megatron-dir", str(tmp_path / "meg"), "--tp", "2"]) == 0
    assert cli_main(["export", "--megatron-dir", str(tmp_path / "meg"), "--hf-dir", str(tmp_path / "out"),
                     "--dtype", "bf16"]) == 0
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    assert emb.dtype == torch.bfloat16
    assert torch.equal(emb, _tensors(root / "hf")["model.embed_tokens.weight"].to(torch.bfloat16))
    assert cli_main(["import", "--hf-dir", str(tmp_path / "nowhere"), "--megatron-dir", str(tmp_path / "m2")]) == 2
    assert "config.json does not exist" in capsys.readouterr().err


def test_bridge_backend_without_megatron_bridge_says_how_to_install(llama_fp32_sharded, tmp_path, capsys):
    pytest.importorskip("transformers")
    try:
        import megatron.bridge  # noqa: F401
        pytest.skip("megatron-bridge is installed here")
    except Exception:
        pass
    root, _ = llama_fp32_sharded
    code = cli_main(["import", "--backend", "bridge", "--hf-dir", str(root / "hf"), "--megatron-dir",
                     str(tmp_path / "meg")])
    err = capsys.readouterr().err
    assert code == 2
    assert "pip install megatron-bridge" in err and "Transformer Engine" in err
    _assert_nothing_written(tmp_path / "meg")


def test_export_with_a_model_config_that_does_not_match_the_checkpoint_names_the_tensors(llama_fp32_sharded,
                                                                                         tmp_path):
    import dataclasses

    root, _ = llama_fp32_sharded
    cfg = import_hf(root / "hf", tmp_path / "meg")
    wrong = dataclasses.replace(cfg, ffn_hidden_size=64)
    with pytest.raises(CheckpointError, match=r"cannot read \[.*mlp.linear_fc1.weight.*shape mismatch"):
        export_hf(tmp_path / "meg", tmp_path / "out", model_cfg=wrong)
    _assert_nothing_written(tmp_path / "out")


def test_the_converter_command_prints_none_of_the_library_notices_mopd_filters(llama_fp32_sharded, tmp_path):
    """tools/convert_hf.py shares mopd's filter (mopd/library_noise.py): no Apex/TE fallback or deprecation lines."""
    import os
    import re
    import subprocess
    import sys

    from mopd.library_noise import MEGATRON_LOG_RECORDS, WARNINGS

    root, _ = llama_fp32_sharded  # the command runs without the test suite's PYTHONWARNINGS=ignore
    tool = Path(__file__).resolve().parents[1] / "tools" / "convert_hf.py"
    proc = subprocess.run([sys.executable, str(tool), "import", "--hf-dir", str(root / "hf"), "--megatron-dir",
                           str(tmp_path / "meg")], capture_output=True, text=True, timeout=200,
                          env={**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = [p for p in (*WARNINGS, *map(re.escape, MEGATRON_LOG_RECORDS)) if re.search(p, proc.stderr)]
    assert shown == [] and "UserWarning" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.startswith("imported llama")
