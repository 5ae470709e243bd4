"""HF model families the in-house mapping covers, and their config.json <-> ModelConfig translation.

One table per family says what the HF architecture adds on top of the Llama layout (QKV bias for
Qwen2, QK-norm and an explicit head_dim for Qwen3). Anything the Megatron student cannot represent
exactly (sliding windows, RoPE scaling other than Llama 3's, biases on other projections, a non-SiLU
activation) is refused with the config.json key at fault, rather than converted into a model with
different logits.

RoPE parameters are read the way transformers 5 reads them: `rope_scaling` (the key Llama 3.1 / 3.3
checkpoints on the Hub still use) wins over `rope_parameters`, and `rope_theta` falls back to the
top-level key. Exports write transformers 5's `rope_parameters`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mopd.config import Family, ModelConfig
from mopd.config.model import MEGATRON_LLAMA3_ROPE, RopeScaling
from mopd.errors import CheckpointError


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    """What one HF family looks like on disk."""

    family: Family
    architecture: str
    """`architectures[0]` in config.json."""
    model_type: str
    qkv_bias: bool
    """q/k/v projections carry a bias (Qwen2)."""
    qk_norm: bool
    """RMSNorm on each query/key head (Qwen3)."""


FAMILIES: dict[Family, FamilySpec] = {
    Family.llama: FamilySpec(family=Family.llama, architecture="LlamaForCausalLM", model_type="llama",
                             qkv_bias=False, qk_norm=False),
    Family.mistral: FamilySpec(family=Family.mistral, architecture="MistralForCausalLM", model_type="mistral",
                               qkv_bias=False, qk_norm=False),
    Family.qwen2: FamilySpec(family=Family.qwen2, architecture="Qwen2ForCausalLM", model_type="qwen2",
                             qkv_bias=True, qk_norm=False),
    Family.qwen3: FamilySpec(family=Family.qwen3, architecture="Qwen3ForCausalLM", model_type="qwen3",
                             qkv_bias=False, qk_norm=True),
}
_BY_ARCH = {spec.architecture: spec for spec in FAMILIES.values()}
_BY_TYPE = {spec.model_type: spec for spec in FAMILIES.values()}


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """config.json of an HF checkpoint folder, as a plain dict."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; an HF checkpoint folder needs its config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def detect_family(hf_config: dict[str, Any]) -> FamilySpec:
    """The family of an HF config, from `architectures` (or `model_type` when that is missing)."""
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in _BY_ARCH:
            return _BY_ARCH[arch]
    model_type = hf_config.get("model_type")
    if not archs and model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    known = ", ".join(sorted(_BY_ARCH))
    raise CheckpointError(
        f"config.json: architectures={archs} (model_type={model_type!r}) is not supported by the built-in "
        f"mapping (supported: {known}); use --backend bridge for other families")


def model_config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """The mopd ModelConfig that reproduces an HF config.json exactly, or a CheckpointError naming the key."""
    spec = detect_family(hf_config)
    _refuse_unsupported(hf_config, spec)
    heads = _required(hf_config, "num_attention_heads")
    hidden = _required(hf_config, "hidden_size")
    head_dim = hf_config.get("head_dim") or hidden // heads
    return ModelConfig(
        family=spec.family,
        num_layers=_required(hf_config, "num_hidden_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        ffn_hidden_size=_required(hf_config, "intermediate_size"),
        vocab_size=_required(hf_config, "vocab_size"),
        max_position_embeddings=hf_config.get("max_position_embeddings", 2048),
        **_rope_fields(hf_config),
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        qk_layernorm=spec.qk_norm,
        add_qkv_bias=spec.qkv_bias,
        init_method_std=float(hf_config.get("initializer_range", 0.02)),
    )


def hf_config_from_model(model: ModelConfig, *, dtype: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json for an HF export of `model`; `extra` carries token ids etc. from the original config."""
    spec = FAMILIES[model.family]
    heads = model.num_attention_heads
    out: dict[str, Any] = dict(extra or {})
    out.update(
        architectures=[spec.architecture],
        model_type=spec.model_type,
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=model.num_query_groups or heads,
        head_dim=model.head_dim or model.hidden_size // heads,
        hidden_act="silu",
        max_position_embeddings=model.max_position_embeddings,
        rms_norm_eps=model.rms_norm_eps,
        rope_parameters=_hf_rope_parameters(model),
        tie_word_embeddings=model.tie_word_embeddings,
        initializer_range=model.init_method_std,
        dtype=dtype,
    )
    out.pop("rope_theta", None)
    out.pop("rope_scaling", None)
    if spec.family in (Family.llama, Family.qwen3):
        out["attention_bias"] = False
    if spec.family == Family.llama:
        out["mlp_bias"] = False
    return out


def _required(hf_config: dict[str, Any], key: str) -> int:
    if key not in hf_config:
        raise CheckpointError(f"config.json: required key {key!r} is missing")
    return hf_config[key]


# config.json's llama3 keys -> ModelConfig fields
_LLAMA3_FIELDS = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
                  "high_freq_factor": "rope_high_freq_factor",
                  "original_max_position_embeddings": "rope_original_max_position_embeddings"}


def _rope_section(hf_config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The config.json key that holds the RoPE parameters, and its dict ({} when there is none)."""
    for key in ("rope_scaling", "rope_parameters"):  # transformers 5 lets rope_scaling win
        if hf_config.get(key):
            return key, hf_config[key]
    return "rope_parameters", {}


def _rope_type(rope: dict[str, Any]) -> str:
    return rope.get("rope_type", rope.get("type", "default"))


def _llama3_values(hf_config: dict[str, Any]) -> dict[str, Any]:
    """config.json's llama3 parameters by their HF name, resolved as transformers does: a top-level
    original_max_position_embeddings wins, a missing one falls back to max_position_embeddings.
    Missing factors are left out."""
    rope = _rope_section(hf_config)[1]
    values = {k: rope[k] for k in _LLAMA3_FIELDS if k in rope}
    original = hf_config.get("original_max_position_embeddings")
    if original is not None:
        values["original_max_position_embeddings"] = original
    values.setdefault("original_max_position_embeddings", hf_config.get("max_position_embeddings", 2048))
    return values


def _rope_fields(hf_config: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's RoPE fields for a config.json that `_rope_problems` accepted."""
    rope = _rope_section(hf_config)[1]
    fields: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))}
    if _rope_type(rope) == RopeScaling.llama3.value:
        fields["rope_scaling"] = RopeScaling.llama3
        for hf_key, value in _llama3_values(hf_config).items():
            cast = int if hf_key == "original_max_position_embeddings" else float
            fields[_LLAMA3_FIELDS[hf_key]] = cast(value)
    return fields


def _rope_problems(hf_config: dict[str, Any]) -> list[str]:
    """RoPE settings Megatron-Core would get wrong, each as `key=value (why)` with its config.json key."""
    key, rope = _rope_section(hf_config)
    rope_type = _rope_type(rope)
    out = []
    partial = rope.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        out.append(f"partial_rotary_factor={partial!r} (RoPE on part of each head is not supported)")
    if rope_type == "default":
        return out
    if rope_type != RopeScaling.llama3.value:
        return out + [f"{key}.rope_type={rope_type!r} (Megatron-Core reproduces only 'default' and 'llama3' RoPE "
                      "exactly; use --backend bridge)"]
    values = _llama3_values(hf_config)
    out += [f"{key}.{k} (missing; rope_type 'llama3' needs it)" for k in _LLAMA3_FIELDS if k not in values]
    factor = values.get("factor", 1.0)
    if not isinstance(factor, int | float) or factor < 1.0:
        out.append(f"{key}.factor={factor!r} (llama3 RoPE scaling needs a number >= 1)")
    for hf_key, value in values.items():
        fixed = MEGATRON_LLAMA3_ROPE.get(_LLAMA3_FIELDS[hf_key])
        if fixed is not None and value != fixed:
            out.append(f"{key}.{hf_key}={value!r} (Megatron-Core's llama3 RoPE scaling hard-codes {fixed})")
    return out


def _hf_rope_parameters(model: ModelConfig) -> dict[str, Any]:
    """transformers 5's `rope_parameters` for `model`."""
    if model.rope_scaling == RopeScaling.none:
        return {"rope_type": "default", "rope_theta": model.rope_theta}
    return {"rope_type": model.rope_scaling.value, "rope_theta": model.rope_theta,
            **{hf_key: getattr(model, field) for hf_key, field in _LLAMA3_FIELDS.items()}}


def _refuse_unsupported(hf_config: dict[str, Any], spec: FamilySpec) -> None:
    """Settings the Megatron student would silently get wrong; each names its config.json key."""
    problems = []
    if hf_config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf_config['hidden_act']!r} (only 'silu' / SwiGLU is supported)")
    problems += _rope_problems(hf_config)
    if hf_config.get("mlp_bias"):
        problems.append("mlp_bias=true")
    if spec.family in (Family.llama, Family.mistral, Family.qwen3) and hf_config.get("attention_bias"):
        problems.append("attention_bias=true")
    window = hf_config.get("sliding_window")
    uses_window = hf_config.get("use_sliding_window", spec.family == Family.mistral)
    # a window at least as long as any sequence the model takes is plain causal attention
    if window is not None and uses_window and window < hf_config.get("max_position_embeddings", 2048):
        problems.append(f"sliding_window={window} (sliding-window attention is not supported)")
    if problems:
        raise CheckpointError(f"config.json ({spec.architecture}): unsupported " + "; ".join(problems))


__all__ = ["FAMILIES", "FamilySpec", "detect_family", "hf_config_from_model", "model_config_from_hf",
           "read_hf_config"]
