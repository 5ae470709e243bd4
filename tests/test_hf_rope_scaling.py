"""Llama 3.1 / 3.2 / 3.3 RoPE scaling (HF rope_type "llama3"): config fields, the HF mapping both ways,
logit parity of an imported model at TP=1, TP=2 and PP=2 (one spawn of two gloo ranks), the export
round trip, and clear refusals of the variants Megatron-Core cannot reproduce."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from dist_utils import run_on_ranks
from test_hf_parity import _megatron_logits_diff, randomise

from mopd.config import ParallelConfig, StudentConfig, build_config, load_config
from mopd.config.model import MEGATRON_LLAMA3_ROPE, ModelConfig, RopeScaling
from mopd.errors import CheckpointError, ConfigError
from mopd.hf import export_hf, hf_config_from_model, import_hf, model_config_from_hf

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
# Megatron's RoPE runs over positions 0..S-1; at S=128 the medium band (wavelengths 2048..8192, where
# the ramp applies) turns ~0.1 rad further than unscaled, enough to move the logits.
SEQ, BATCH = 128, 2
LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (tp, pp); with 2 ranks, (1, 1) runs data-parallel

# config.json of meta-llama/Llama-3.3-70B-Instruct (architecture and RoPE keys, verbatim)
LLAMA_3_3_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 8192,
    "initializer_range": 0.02, "intermediate_size": 28672, "max_position_embeddings": 131072, "mlp_bias": False,
    "attention_bias": False, "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256,
}


def _tiny_hf_config(**overrides) -> dict:
    """config.json (transformers 5 layout) of a tiny Llama with llama3 scaling and a large rope_theta."""
    from transformers import LlamaConfig

    base = dict(architectures=["LlamaForCausalLM"], vocab_size=300, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, max_position_embeddings=131072,
                rms_norm_eps=1e-6, rope_theta=500000.0, rope_scaling=dict(LLAMA3))
    base.update(overrides)
    return LlamaConfig(**base).to_dict()


def _legacy(hf_config: dict) -> dict:
    """The same config as Llama 3.1 / 3.3 checkpoints on the Hub write it: rope_scaling + top-level rope_theta."""
    out = copy.deepcopy(hf_config)
    rope = out.pop("rope_parameters")
    out["rope_theta"] = rope.pop("rope_theta")
    out["rope_scaling"] = rope
    return out


def _logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _llama3_inv_freq_float64(head_dim: int, theta: float, factor: float) -> torch.Tensor:
    """The Llama 3.1 frequency rule written out per frequency, in float64 (low 1, high 4, original 8192)."""
    out = []
    for i in range(0, head_dim, 2):
        freq = theta ** (-i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            out.append(freq)
        elif wavelen > 8192 / 1:
            out.append(freq / factor)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- mapping


def test_megatron_hard_codes_exactly_the_llama3_parameters_the_config_accepts():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    params = inspect.signature(RotaryEmbedding._apply_scaling).parameters
    megatron = {f"rope_{k}": params[k].default for k in ("low_freq_factor", "high_freq_factor",
                                                           "original_max_position_embeddings")}
    assert megatron == MEGATRON_LLAMA3_ROPE
    assert "low_freq_factor" not in inspect.signature(RotaryEmbedding.__init__).parameters


@pytest.mark.parametrize("layout", ["transformers5", "legacy"])
def test_llama3_config_json_maps_to_the_scaling_fields(layout):
    hf = _tiny_hf_config()
    cfg = model_config_from_hf(hf if layout == "transformers5" else _legacy(hf))
    assert cfg.rope_scaling == RopeScaling.llama3 and cfg.rope_theta == 500000.0
    assert (cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
            cfg.rope_original_max_position_embeddings) == (8.0, 1.0, 4.0, 8192)
    assert cfg.max_position_embeddings == 131072


def test_exported_config_json_gives_transformers_the_same_rope_parameters():
    from transformers import AutoConfig

    cfg = model_config_from_hf(_tiny_hf_config(rope_scaling={**LLAMA3, "factor": 32.0}))  # Llama 3.2 1B / 3B
    back = AutoConfig.for_model(**hf_config_from_model(cfg, dtype="float32"))
    assert back.rope_parameters == {**LLAMA3, "factor": 32.0, "rope_theta": 500000.0}
    assert model_config_from_hf(back.to_dict()) == cfg


def test_unscaled_models_still_export_default_rope():
    cfg = model_config_from_hf(_tiny_hf_config(rope_scaling=None))
    assert cfg.rope_scaling == RopeScaling.none
    assert hf_config_from_model(cfg, dtype="float32")["rope_parameters"] == {"rope_type": "default",
                                                                            "rope_theta": 500000.0}


def test_the_70b_recipe_is_what_llama_3_3_70b_config_json_imports_as():
    recipe = load_config(ROOT / "configs" / "recipes" / "llama3_70b_mopd.yaml").student.model
    imported = model_config_from_hf(LLAMA_3_3_70B)
    assert imported == dataclasses.replace(recipe, head_dim=8192 // 64)
    assert hf_config_from_model(recipe, dtype="bfloat16")["rope_parameters"] == {**LLAMA3, "rope_theta": 500000.0}


@pytest.mark.parametrize("change,needle", [
    ({"original_max_position_embeddings": 4096}, r"rope_scaling\.original_max_position_embeddings=4096 .*8192"),
    ({"low_freq_factor": 2.0}, r"rope_scaling\.low_freq_factor=2\.0 .*hard-codes 1\.0"),
    ({"high_freq_factor": 8.0}, r"rope_scaling\.high_freq_factor=8\.0 .*hard-codes 4\.0"),
    ({"factor": 0.5}, r"rope_scaling\.factor=0\.5"),
    ({"factor": None}, r"rope_scaling\.factor=None"),
    ({"rope_type": "yarn"}, r"rope_scaling\.rope_type='yarn'"),
    ({"rope_type": "dynamic"}, r"rope_scaling\.rope_type='dynamic'"),
    ({"rope_type": "linear"}, r"rope_scaling\.rope_type='linear'"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0\.5"),
])
def test_llama3_variants_megatron_cannot_reproduce_are_refused_naming_the_key_and_value(change, needle):
    hf = _legacy(_tiny_hf_config())
    hf["rope_scaling"].update(change)
    with pytest.raises(CheckpointError, match=needle):
        model_config_from_hf(hf)


def test_a_missing_llama3_key_is_refused_naming_it():
    hf = _legacy(_tiny_hf_config())
    del hf["rope_scaling"]["high_freq_factor"]
    with pytest.raises(CheckpointError, match=r"rope_scaling\.high_freq_factor \(missing"):
        model_config_from_hf(hf)


def test_a_missing_original_context_falls_back_to_max_position_embeddings_as_in_transformers():
    hf = _legacy(_tiny_hf_config(max_position_embeddings=8192))
    del hf["rope_scaling"]["original_max_position_embeddings"]
    assert model_config_from_hf(hf).rope_original_max_position_embeddings == 8192
    hf["max_position_embeddings"] = 16384
    with pytest.raises(CheckpointError, match=r"original_max_position_embeddings=16384"):
        model_config_from_hf(hf)


@pytest.mark.parametrize("key,value", [("rope_original_max_position_embeddings", 4096),
                                       ("rope_low_freq_factor", 2.0), ("rope_high_freq_factor", 2.0),
                                       ("rope_scaling_factor", 0.5)])
def test_yaml_llama3_values_megatron_cannot_reproduce_are_config_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"model\.{key}={value!r}"):
        build_config(StudentConfig, {"model": {"rope_scaling": "llama3", key: value}})


def test_building_the_student_from_a_code_made_config_refuses_other_llama3_values():
    from mopd.student.model import gpt_rope_kwargs

    with pytest.raises(ConfigError, match=r"student\.model\.rope_high_freq_factor=2\.0"):
        gpt_rope_kwargs(ModelConfig(rope_scaling=RopeScaling.llama3, rope_high_freq_factor=2.0))
    assert gpt_rope_kwargs(ModelConfig(rope_scaling=RopeScaling.llama3, rope_scaling_factor=32.0,
                                       rope_theta=5e5))["rope_scaling_factor"] == 32.0


# ----------------------------------------------------------------------------------- parity and export


def _parity_worker(rank: int, world: int, root: str) -> dict:
    from mopd.hf.convert import read_model_yaml
    from mopd.parallel import destroy_parallel, init_parallel
    from mopd.student import build_model, load_model_weights

    case_dir = Path(root)
    cfg = read_model_yaml(case_dir / "megatron" / "mopd_model.yaml")
    results = {}
    for tp, pp in LAYOUTS:
        layout = init_parallel(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp), seed=0)
        student = StudentConfig(model=cfg, parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
        (model,) = build_model(student, layout, wrap_ddp=False)
        load_model_weights(case_dir / "megatron", [model])
        model.eval()
        results[f"tp{tp}pp{pp}/rank{rank}"] = {"logits": _megatron_logits_diff(case_dir, cfg, model, layout),
                                               "inv_freq": model.rotary_pos_emb.inv_freq.clone()}
        destroy_parallel()
    return results


@pytest.fixture(scope="module")
def scaled(tmp_path_factory) -> dict:
    """A tiny random Llama 3.1-style checkpoint, its HF logits, the unscaled model's logits on the same
    weights, the Megatron ranks' results, and the export of its import."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("rope_llama3")
    torch.manual_seed(0)
    config = LlamaConfig(**_tiny_hf_config())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomise(model, 0)
    model.eval().save_pretrained(root / "hf")
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        unscaled = AutoModelForCausalLM.from_config(LlamaConfig(**_tiny_hf_config(rope_scaling=None)),
                                                    dtype=torch.float32)
        unscaled.load_state_dict(model.state_dict())
        unscaled_logits = unscaled.eval()(ids).logits
    torch.save({"ids": ids, "logits": logits}, root / "hf_logits.pt")
    import_hf(root / "hf", root / "megatron")
    export_hf(root / "megatron", root / "exported")
    out = {"root": root, "ids": ids, "logits": logits, "unscaled_logits": unscaled_logits,
           "hf_inv_freq": model.model.rotary_emb.inv_freq.clone()}
    for rank_results in run_on_ranks(_parity_worker, 2, str(root), timeout=150):
        out.update(rank_results)
    return out


def test_the_scaling_changes_the_hf_logits_so_parity_can_fail(scaled):
    diff = (scaled["logits"] - scaled["unscaled_logits"]).abs().max().item()
    assert diff > 0.1, f"llama3 scaling moves the logits by only {diff:.3g}; the parity test could not tell"


def test_megatron_frequencies_equal_hf_and_the_float64_rule(scaled):
    ref = _llama3_inv_freq_float64(16, 500000.0, 8.0)
    assert torch.allclose(scaled["hf_inv_freq"].double(), ref, rtol=1e-6, atol=0)
    unscaled = 500000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert (ref != unscaled).sum() >= 3, "too few frequencies fall in the scaled bands"
    for key in (k for k in scaled if k.startswith("tp")):
        assert torch.equal(scaled[key]["inv_freq"], scaled["hf_inv_freq"]), key


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{tp}_pp{pp}" for tp, pp in LAYOUTS])
def test_imported_llama3_scaled_model_reproduces_hf_logits(scaled, tp, pp):
    rows = {k: v["logits"] for k, v in scaled.items() if k.startswith(f"tp{tp}pp{pp}/") and v["logits"]}
    assert rows, f"no logits came back at tp={tp} pp={pp}"
    for key, row in rows.items():
        assert row["ref_std"] > 0.1, f"{key}: HF logits are too flat to tell a wrong mapping apart"
        assert row["max_abs_diff"] < 1e-4, f"{key}: max |megatron - hf| = {row['max_abs_diff']:.3g}"


def test_export_of_the_import_keeps_rope_scaling_and_gives_identical_logits(scaled):
    root = scaled["root"]
    original = json.loads((root / "hf" / "config.json").read_text())
    exported = json.loads((root / "exported" / "config.json").read_text())
    assert exported["rope_parameters"] == original["rope_parameters"] == {**LLAMA3, "rope_theta": 500000.0}
    assert exported["max_position_embeddings"] == 131072
    assert torch.equal(_logits(root / "exported", scaled["ids"]), scaled["logits"])


def test_a_hub_style_llama3_checkpoint_imports_to_the_same_model(scaled, tmp_path):
    """Llama 3.1 / 3.3 config.json keeps rope_scaling + rope_theta; transformers and the import read it alike."""
    root = scaled["root"]
    legacy = tmp_path / "hf_legacy"
    shutil.copytree(root / "hf", legacy)
    (legacy / "config.json").write_text(json.dumps(_legacy(json.loads((root / "hf" / "config.json").read_text()))))
    assert torch.equal(_logits(legacy, scaled["ids"]), scaled["logits"])
    cfg = import_hf(legacy, tmp_path / "megatron")
    assert cfg == model_config_from_hf(json.loads((root / "hf" / "config.json").read_text()))
    export_hf(tmp_path / "megatron", tmp_path / "exported")
    assert torch.equal(_logits(tmp_path / "exported", scaled["ids"]), scaled["logits"])
