"""Logit parity: HF models of every family, imported into Megatron-Core, give the HF logits at TP=1, TP=2
and PP=2 (two gloo ranks on CPU, spawned once for all cases and layouts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_utils import full_logits, run_on_ranks

from mopd.config import ParallelConfig, StudentConfig
from mopd.hf import import_hf

pytestmark = pytest.mark.timeout(300)

SEQ, BATCH = 9, 2
LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (tp, pp); with 2 ranks, (1, 1) runs data-parallel


def _tiny(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    base = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, max_position_embeddings=64, rms_norm_eps=1e-6)
    base.update(overrides)
    cls, arch = {"llama": (LlamaConfig, "LlamaForCausalLM"), "qwen2": (Qwen2Config, "Qwen2ForCausalLM"),
                 "qwen3": (Qwen3Config, "Qwen3ForCausalLM"), "mistral": (MistralConfig, "MistralForCausalLM")}[family]
    return cls(architectures=[arch], **base)


CASES = {
    "llama_gqa_untied": lambda: _tiny("llama", rope_theta=500000.0),
    "llama_mha_tied": lambda: _tiny("llama", num_key_value_heads=4, tie_word_embeddings=True),
    "qwen2_qkv_bias_tied": lambda: _tiny("qwen2", tie_word_embeddings=True),
    "qwen3_qk_norm_head_dim": lambda: _tiny("qwen3", head_dim=24, tie_word_embeddings=False),
    "mistral_gqa_untied": lambda: _tiny("mistral", sliding_window=None, tie_word_embeddings=False),
}


IMPORT_TP = {"qwen3_qk_norm_head_dim": 2}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights far from their init (norm gains != 1, biases != 0), so a swapped or mis-split tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)


def _parity_worker(rank: int, world: int, root: str) -> dict:
    from mopd.parallel import destroy_parallel, init_parallel

    results = {}
    for tp, pp in LAYOUTS:
        layout = init_parallel(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp), seed=0)
        for case in CASES:
            results[f"{case}/tp{tp}pp{pp}/rank{rank}"] = _check_case(Path(root) / case, layout)
        destroy_parallel()
    return results


def _check_case(case_dir: Path, layout) -> dict:
    """Logit difference (last stage only) and the HF tensors this rank streams from its model chunk."""
    from safetensors.torch import load_file

    from mopd.hf import megatron_to_hf
    from mopd.hf.convert import read_model_yaml
    from mopd.student import build_model, load_model_weights, save_model_weights

    ckpt = case_dir / "megatron"
    cfg = read_model_yaml(ckpt / "mopd_model.yaml")
    student = StudentConfig(model=cfg, parallel=ParallelConfig(tensor_parallel=layout.tp, pipeline_parallel=layout.pp))
    (model,) = build_model(student, layout, wrap_ddp=False)
    load_model_weights(ckpt, [model])
    model.eval()
    if layout.tp * layout.pp > 1:
        # a training-side save at this layout, exported by the parent process
        save_model_weights(case_dir / f"saved_tp{layout.tp}pp{layout.pp}", [model])
    row = {"logits": _megatron_logits_diff(case_dir, cfg, model, layout)}
    original = load_file(case_dir / "hf" / "model.safetensors")
    streamed = dict(megatron_to_hf([model], cfg))
    row["streamed"] = sorted(streamed)
    row["streamed_mismatch"] = sorted(n for n, t in streamed.items() if not torch.equal(t, original.get(n)))
    return row


def _megatron_logits_diff(case_dir: Path, cfg, model, layout) -> dict | None:
    """The forward at this layout (p2p between stages) against the HF logits."""
    ref = torch.load(case_dir / "hf_logits.pt")
    logits = full_logits(model, ref["ids"], layout, cfg.vocab_size)
    if logits is None:
        return None
    return {"max_abs_diff": (logits - ref["logits"]).abs().max().item(), "ref_std": ref["logits"].std().item()}


@pytest.fixture(scope="module")
def parity_results(tmp_path_factory) -> dict:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hf_parity")
    for seed, (case, make_config) in enumerate(CASES.items()):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(make_config(), dtype=torch.float32)
        randomise(model, seed)
        model.eval()
        model.save_pretrained(root / case / "hf")
        ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            logits = model(ids).logits
        torch.save({"ids": ids, "logits": logits}, root / case / "hf_logits.pt")
        # one case is padded for TP=2 (vocab 300 -> 512 rows) and loaded at TP=1 (384 rows) too
        import_hf(root / case / "hf", root / case / "megatron", tp=IMPORT_TP.get(case, 1))
    out = {"_root": str(root)}
    for rank_results in run_on_ranks(_parity_worker, 2, str(root), timeout=240):
        out.update(rank_results)
    return out


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{tp}_pp{pp}" for tp, pp in LAYOUTS])
@pytest.mark.parametrize("case", list(CASES))
def test_imported_megatron_model_reproduces_hf_logits(parity_results, case, tp, pp):
    rows = {k: v["logits"] for k, v in _rows(parity_results, case, tp, pp).items() if v["logits"] is not None}
    assert rows, f"no logits came back for {case} at tp={tp} pp={pp}"
    for key, row in rows.items():
        assert row["ref_std"] > 0.1, f"{key}: HF logits are too flat to tell a wrong mapping apart"
        assert row["max_abs_diff"] < 1e-4, f"{key}: max |megatron - hf| = {row['max_abs_diff']:.3g}"


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{tp}_pp{pp}" for tp, pp in LAYOUTS])
@pytest.mark.parametrize("case", ["llama_gqa_untied", "qwen2_qkv_bias_tied", "qwen3_qk_norm_head_dim"])
def test_model_chunks_stream_the_original_hf_tensors_bit_for_bit(parity_results, case, tp, pp):
    from safetensors import safe_open

    rows = _rows(parity_results, case, tp, pp)
    names = set().union(*(row["streamed"] for row in rows.values()))
    root = Path(parity_results["_root"])
    with safe_open(root / case / "hf" / "model.safetensors", framework="pt") as f:
        assert names == set(f.keys()), f"{case}: streamed names differ from the HF checkpoint's"
    for key, row in rows.items():
        assert not row["streamed_mismatch"], f"{key}: streamed tensors differ: {row['streamed_mismatch'][:3]}"


def _rows(results: dict, case: str, tp: int, pp: int) -> dict:
    return {k: v for k, v in results.items() if k.startswith(f"{case}/tp{tp}pp{pp}/")}


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
@pytest.mark.parametrize("case", ["llama_gqa_untied", "qwen2_qkv_bias_tied"])
def test_weights_saved_by_training_at_tp2_or_pp2_export_to_the_original_hf_tensors(parity_results, case, tp, pp,
                                                                                      tmp_path):
    from safetensors.torch import load_file

    from mopd.hf import export_hf
    from mopd.hf.convert import read_model_yaml

    case_dir = Path(parity_results["_root"]) / case
    cfg = read_model_yaml(case_dir / "megatron" / "mopd_model.yaml")
    export_hf(case_dir / f"saved_tp{tp}pp{pp}", tmp_path / "hf", model_cfg=cfg, assets_from=case_dir / "hf")
    original, exported = load_file(case_dir / "hf" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[n], t) for n, t in original.items())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    original_config = json.loads((case_dir / "hf" / "config.json").read_text())
    assert (config["eos_token_id"], config["rms_norm_eps"]) == (original_config["eos_token_id"], 1e-6)
