"""Pure parts of the HF converter: family configs, the QKV / SwiGLU / vocab layouts, streaming safetensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mopd.config import Family, ModelConfig
from mopd.errors import CheckpointError, ConfigError
from mopd.hf.convert import check_layout
from mopd.hf.families import detect_family, hf_config_from_model, model_config_from_hf
from mopd.hf.mapping import (
    all_rules,
    expected_hf_shapes,
    interleave_qkv,
    megatron_to_hf,
    padded_vocab_size,
    split_qkv,
    to_megatron,
)
from mopd.hf.stream import INDEX_NAME, ShardedSafetensorsWriter, TensorSpec


def _hf_config(family: str, **kw) -> dict:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[family]
    base = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96)
    base.update(kw)
    cfg = cls(**base).to_dict()
    cfg["architectures"] = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                             "mistral": "MistralForCausalLM"}[family]]
    return cfg


@pytest.mark.parametrize("family,qkv_bias,qk_norm", [("llama", False, False), ("qwen2", True, False),
                                                     ("qwen3", False, True), ("mistral", False, False)])
def test_each_family_config_maps_to_a_model_config_and_back(family, qkv_bias, qk_norm):
    from transformers import AutoConfig

    hf = _hf_config(family, rope_theta=250000.0, tie_word_embeddings=True, sliding_window=None, head_dim=24)
    cfg = model_config_from_hf(hf)
    assert (cfg.family, cfg.add_qkv_bias, cfg.qk_layernorm) == (Family(family), qkv_bias, qk_norm)
    assert (cfg.num_query_groups, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size) == (2, 24, 96, 300)
    assert cfg.rope_theta == 250000.0 and cfg.tie_word_embeddings
    back = AutoConfig.for_model(**hf_config_from_model(cfg, dtype="float32"))
    assert back.architectures == hf["architectures"]
    assert (back.num_key_value_heads, back.head_dim, back.intermediate_size) == (2, 24, 96)
    assert back.rope_parameters["rope_theta"] == 250000.0 and back.tie_word_embeddings


def test_old_style_rope_theta_key_is_read():
    hf = _hf_config("llama")
    hf.pop("rope_parameters")
    hf["rope_theta"] = 1e6
    assert model_config_from_hf(hf).rope_theta == 1e6


def test_unsupported_architecture_is_refused_naming_it_and_the_bridge_backend():
    with pytest.raises(CheckpointError, match=r"GPT2LMHeadModel.*--backend bridge"):
        detect_family({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


@pytest.mark.parametrize("change,needle", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "llama3"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
])
def test_settings_the_student_cannot_reproduce_are_refused_naming_the_key(change, needle):
    hf = {**_hf_config("llama"), **change}
    with pytest.raises(CheckpointError, match=needle):
        model_config_from_hf(hf)


def test_mistral_sliding_window_is_refused():
    with pytest.raises(CheckpointError, match="sliding_window=4096"):
        model_config_from_hf(_hf_config("mistral", sliding_window=4096))


def test_qkv_interleave_puts_each_query_group_before_its_key_and_value():
    cfg = ModelConfig(hidden_size=4, num_attention_heads=4, num_query_groups=2, head_dim=1)
    q = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    k = torch.tensor([[10.0], [11.0]])
    v = torch.tensor([[20.0], [21.0]])
    fused = interleave_qkv(q, k, v, cfg)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, cfg), (q, k, v)))


def test_qkv_bias_interleaves_like_the_weight():
    cfg = ModelConfig(hidden_size=8, num_attention_heads=2, num_query_groups=1, head_dim=2)
    q, k, v = torch.arange(4.0), torch.arange(10.0, 12.0), torch.arange(20.0, 22.0)
    assert interleave_qkv(q, k, v, cfg).tolist() == [0, 1, 2, 3, 10, 11, 20, 21]


def test_fc1_stacks_gate_over_up_and_vocab_rows_are_zero_padded():
    cfg = ModelConfig(vocab_size=3, hidden_size=2, num_attention_heads=1, ffn_hidden_size=2, num_layers=1)
    rules = {r.megatron: r for r in all_rules(cfg)}
    gate, up = torch.ones(2, 2), 2 * torch.ones(2, 2)
    fc1 = to_megatron(rules["decoder.layers.0.mlp.linear_fc1.weight"], [gate, up], cfg, padded_vocab=8)
    assert fc1[:, 0].tolist() == [1, 1, 2, 2]
    emb = to_megatron(rules["embedding.word_embeddings.weight"], [torch.ones(3, 2)], cfg, padded_vocab=8)
    assert emb.shape == (8, 2) and emb[3:].abs().sum() == 0


def test_vocab_padding_does_not_depend_on_tp_that_divides_the_divisor():
    cfg = ModelConfig(vocab_size=300)
    assert [padded_vocab_size(cfg, tp) for tp in (1, 2, 4, 8)] == [384, 384, 384, 384]
    assert padded_vocab_size(ModelConfig(vocab_size=300, make_vocab_size_divisible_by=64), 3) == 384


def test_tied_models_have_no_lm_head_and_untied_ones_do():
    assert "lm_head.weight" not in expected_hf_shapes(ModelConfig(tie_word_embeddings=True))
    assert expected_hf_shapes(ModelConfig(vocab_size=50, hidden_size=8, num_attention_heads=2))["lm_head.weight"] == (50, 8)


@pytest.mark.parametrize("heads,groups,tp,needle", [(6, 6, 4, "num_attention_heads=6"), (8, 2, 4, "query groups")])
def test_tp_that_does_not_divide_heads_or_query_groups_is_refused_naming_the_field(heads, groups, tp, needle):
    cfg = ModelConfig(hidden_size=48, num_attention_heads=heads, num_query_groups=groups, ffn_hidden_size=64)
    with pytest.raises(ConfigError, match=rf"parallel.tensor_parallel=4.*{needle}"):
        check_layout(cfg, tp, 1)


def test_pp_that_does_not_divide_layers_is_refused():
    with pytest.raises(ConfigError, match="parallel.pipeline_parallel=2.*num_layers=3"):
        check_layout(ModelConfig(num_layers=3), 1, 2)


def test_unknown_megatron_tensor_is_refused_by_name():
    with pytest.raises(CheckpointError, match="decoder.layers.0.mystery.weight"):
        list(megatron_to_hf({"decoder.layers.0.mystery.weight": torch.zeros(1)}, ModelConfig()))


def test_streaming_writer_shards_read_back_with_safetensors(tmp_path):
    tensors = {f"t{i}": torch.randn(4, 8, dtype=dtype) for i, dtype in enumerate([torch.float32, torch.bfloat16] * 3)}
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, specs, max_shard_bytes=200)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    loaded = {}
    for f in files:
        loaded.update(load_file(tmp_path / f))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], t) and loaded[n].dtype == t.dtype for n, t in tensors.items())


def test_streaming_writer_refuses_out_of_plan_and_unfinished_writes(tmp_path):
    specs = [TensorSpec("a", (2,), torch.float32), TensorSpec("b", (2,), torch.float32)]
    writer = ShardedSafetensorsWriter(tmp_path, specs)
    with pytest.raises(CheckpointError, match="'b'.*arrived where 'a'"):
        writer.write("b", torch.zeros(2))
    writer.write("a", torch.zeros(2))
    with pytest.raises(CheckpointError, match="first: 'b'"):
        writer.close()


@pytest.mark.parametrize("vocab,tp,padded", [
    (1, 1, 128), (127, 2, 128), (128, 8, 128), (300, 1, 384), (300, 8, 384), (151_936, 1, 151_936),
    (151_936, 8, 151_936),
    # A TP that does not divide 128: lcm(128, 3) = 384 rows per multiple.
    (300, 3, 384), (151_936, 3, 152_064),
])
def test_vocab_padding_is_the_vocabulary_rounded_up_to_lcm_of_the_divisor_and_tp(vocab, tp, padded):
    """Hand-computed sizes (make_vocab_size_divisible_by=128): the HF converter and the student share
    one function, so this table is what keeps their checkpoints' embedding shapes right."""
    assert padded_vocab_size(ModelConfig(vocab_size=vocab, make_vocab_size_divisible_by=128), tp) == padded


# --- Transformer Engine layer-spec names ------------------------------------------------------------------
# TE's LayerNormLinear registers its fused norm as "layer_norm_weight" (and "layer_norm_bias" only for LayerNorm):
# NVIDIA/TransformerEngine transformer_engine/pytorch/module/layernorm_linear.py lines 1449-1465
# (commit d0067d0d, v2.20.0.dev0). TE itself cannot be imported on CPU machines, so that one name is pinned here;
# which modules fuse a norm, and which norms disappear, comes from megatron-core's own TE spec function below.
TE_LAYER_NORM_LINEAR_PARAMS = ("layer_norm_weight", "weight")


def _te_spec_layer_parameter_names(monkeypatch, *, qk_layernorm: bool, qkv_bias: bool) -> set[str]:
    """Parameter names inside one layer built from `get_gpt_layer_with_transformer_engine_submodules`.

    The spec function runs for real with a provider that hands out marker classes in place of
    TESpecProvider's TE modules (same interface: megatron/core/extensions/transformer_engine_spec_provider.py);
    walking the submodule tree it returns gives each parameter's module path.
    """
    import dataclasses
    import functools

    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec

    class FusedNormLinear:  # TELayerNormColumnParallelLinear
        pass

    class Linear:  # TEColumnParallelLinear / TERowParallelLinear / TELinear
        pass

    class Norm:  # TENorm
        pass

    class NoParameters:  # TEDotProductAttention
        pass

    class RecordingTESpecProvider:
        def linear(self):
            return Linear

        def column_parallel_linear(self):
            return Linear

        def row_parallel_linear(self):
            return Linear

        def fuse_layernorm_and_linear(self):
            return True

        def column_parallel_layer_norm_linear(self):
            return FusedNormLinear

        def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
            return Norm

        def core_attention(self):
            return NoParameters

        def activation_func(self):
            return None

    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", RecordingTESpecProvider, raising=False)
    submodules = gpt_layer_specs.get_gpt_layer_with_transformer_engine_submodules(qk_layernorm=qk_layernorm)

    def walk(node, path: tuple[str, ...]):
        if isinstance(node, ModuleSpec):
            yield from walk(node.submodules if node.submodules is not None else node.module, path)
        elif isinstance(node, functools.partial):
            yield from walk(node.keywords.get("submodules"), path)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for field in dataclasses.fields(node):
                yield from walk(getattr(node, field.name), (*path, field.name))
        elif isinstance(node, type) and not issubclass(node, (IdentityOp, IdentityFuncOp)):
            yield ".".join(path), node

    names = set()
    for path, module in walk(submodules, ()):
        if module is FusedNormLinear:
            names.update(f"{path}.{p}" for p in TE_LAYER_NORM_LINEAR_PARAMS)
        elif module in (Linear, Norm):
            names.add(f"{path}.weight")
        if module in (Linear, FusedNormLinear) and qkv_bias and path == "self_attention.linear_qkv":
            names.add(f"{path}.bias")  # add_qkv_bias: TransformerConfig.add_qkv_bias gives linear_qkv a bias
    return names


def _tiny_model_config(family: str) -> ModelConfig:
    hf = _hf_config(family, tie_word_embeddings=False, sliding_window=None, num_hidden_layers=2)
    return model_config_from_hf(hf)


def _local_spec_parameter_names(cfg: ModelConfig) -> set[str]:
    from mopd.hf.layout import build_gpt, single_process_megatron

    with single_process_megatron(), torch.device("meta"):
        model = build_gpt(cfg, padded_vocab_size(cfg, 1), torch.float32)
    return {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_te_spec_names_are_what_megatron_cores_te_spec_builds(family, monkeypatch):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules

    from mopd.hf.mapping import TE_SPEC_NAMES, local_spec_name

    cfg = _tiny_model_config(family)
    local = _local_spec_parameter_names(cfg)
    local_layer0 = {n.removeprefix("decoder.layers.0.") for n in local if n.startswith("decoder.layers.0.")}
    te_layer = _te_spec_layer_parameter_names(monkeypatch, qk_layernorm=cfg.qk_layernorm, qkv_bias=cfg.add_qkv_bias)
    assert te_layer != local_layer0 and set(TE_SPEC_NAMES) <= te_layer
    assert {local_spec_name(f"decoder.layers.0.{n}") for n in te_layer} == {f"decoder.layers.0.{n}" for n in local_layer0}
    # megatron-core's local spec saves its norms under the same TE names (its checkpoint key map).
    keys_map = get_gpt_layer_local_submodules(normalization="RMSNorm").sharded_state_dict_keys_map
    for te_name, local_name in TE_SPEC_NAMES.items():
        local_prefix = local_name.removesuffix("weight")
        assert te_name == keys_map[local_prefix] + "weight"


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_megatron_to_hf_gives_the_same_hf_tensors_for_local_and_te_spec_names(family):
    """Export, weight sync and EMA teachers all stream through megatron_to_hf, so this covers each."""
    from mopd.hf.mapping import TE_SPEC_NAMES, local_spec_name

    cfg = _tiny_model_config(family)
    gen = torch.Generator().manual_seed(0)
    hf = {name: torch.randn(shape, generator=gen) for name, shape in expected_hf_shapes(cfg).items()}
    padded = padded_vocab_size(cfg, 1)
    local = {rule.megatron: to_megatron(rule, [hf[n] for n in rule.hf], cfg, padded) for rule in all_rules(cfg)}
    assert set(local) == _local_spec_parameter_names(cfg)
    to_te = {local_name: te_name for te_name, local_name in TE_SPEC_NAMES.items()}
    te = {}
    for name, tensor in local.items():
        suffix = name.split(".", 3)[-1] if name.startswith("decoder.layers.") else None
        te[name.removesuffix(suffix) + to_te[suffix] if suffix in to_te else name] = tensor
    assert sum(n.endswith("layer_norm_weight") for n in te) == 2 * cfg.num_layers
    assert all(local_spec_name(n) in local for n in te)
    for named in (local, te):
        streamed = dict(megatron_to_hf(named.items(), cfg))
        assert streamed.keys() == hf.keys() and all(torch.equal(streamed[n], t) for n, t in hf.items())
