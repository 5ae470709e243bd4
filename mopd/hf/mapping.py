"""HF <-> Megatron-Core parameter mapping for Llama-style decoders: the one place that knows both layouts.

Megatron names are the module names of a GPTModel built with the local layer spec
(`decoder.layers.{i}.self_attention.linear_qkv.weight`, layer index global, i.e. counted over all
pipeline stages). The Transformer Engine spec fuses each layer's two RMSNorms into the linear layer
after them (TELayerNormColumnParallelLinear), so its parameters are named
`self_attention.linear_qkv.layer_norm_weight` and `mlp.linear_fc1.layer_norm_weight` instead of
`input_layernorm.weight` and `pre_mlp_layernorm.weight`; `megatron_to_hf` accepts both (`TE_SPEC_NAMES`).
Checkpoints need no translation: the local spec saves its norms under the TE names
(its `sharded_state_dict_keys_map`), so one checkpoint loads into either spec. Layout differences:

- QKV: Megatron fuses q/k/v into one `linear_qkv` whose rows are grouped per query group g:
  `[q heads of g (heads/groups * head_dim rows), k_g (head_dim rows), v_g (head_dim rows)]` for
  g = 0..groups-1. Tensor parallelism splits these rows by whole groups, so the layout is the same at
  every TP size. The bias (Qwen2) follows the weight.
- SwiGLU: `linear_fc1` = `[gate_proj; up_proj]` along rows (a TP shard holds `[gate_r; up_r]`).
- Vocabulary: Megatron pads embedding / output rows to a multiple of make_vocab_size_divisible_by * TP;
  import pads with zeros, export cuts the padding off.
- Tied embeddings: no `output_layer.weight` in Megatron, no `lm_head.weight` in HF.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from mopd.config import ModelConfig, padded_vocab_size
from mopd.errors import CheckpointError


class Kind(enum.Enum):
    copy = "copy"
    qkv = "qkv"
    """q, k, v -> per-group interleaved rows."""
    fc1 = "fc1"
    """gate, up -> rows stacked."""
    vocab = "vocab"
    """rows padded to the Megatron vocabulary size."""


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and the HF tensors it is made of."""

    megatron: str
    hf: tuple[str, ...]
    kind: Kind
    layer: int | None = None
    """Global layer index, None for embeddings / final norm / output layer."""


_LAYER_RULES: tuple[tuple[str, tuple[str, ...], Kind], ...] = (
    ("input_layernorm.weight", ("input_layernorm.weight",), Kind.copy),
    ("self_attention.linear_qkv.weight",
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), Kind.qkv),
    ("self_attention.linear_qkv.bias",
     ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), Kind.qkv),
    ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), Kind.copy),
    ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), Kind.copy),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), Kind.copy),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), Kind.copy),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), Kind.fc1),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), Kind.copy),
)


# TE layer-spec parameter name -> local-spec name (suffix after `decoder.layers.{i}.`). TE's LayerNormLinear
# registers its norm as `layer_norm_weight` (and `layer_norm_bias` for LayerNorm, which no family here uses).
TE_SPEC_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def local_spec_name(name: str) -> str:
    """`name` with a TE layer-spec fused-norm suffix replaced by the local spec's; other names unchanged."""
    for te_suffix, local_suffix in TE_SPEC_NAMES.items():
        if name.endswith("." + te_suffix) and name.startswith("decoder.layers."):
            return name[: -len(te_suffix)] + local_suffix
    return name


def layer_rules(cfg: ModelConfig, layer: int) -> list[Rule]:
    """The rules of one transformer layer (its tensor group), in HF file order."""
    rules = []
    for meg, hf, kind in _LAYER_RULES:
        if meg.endswith("linear_qkv.bias") and not cfg.add_qkv_bias:
            continue
        if "_layernorm.weight" in meg and meg.startswith("self_attention") and not cfg.qk_layernorm:
            continue
        rules.append(Rule(f"decoder.layers.{layer}.{meg}", tuple(f"model.layers.{layer}.{h}" for h in hf), kind, layer))
    return rules


def global_rules(cfg: ModelConfig) -> list[Rule]:
    """Embedding, final norm and (untied) output layer."""
    rules = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Kind.vocab),
             Rule("decoder.final_layernorm.weight", ("model.norm.weight",), Kind.copy)]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",), Kind.vocab))
    return rules


def all_rules(cfg: ModelConfig) -> list[Rule]:
    """Every rule of the model: embeddings first, then layer by layer, then norm and output."""
    glob = global_rules(cfg)
    layers = [rule for i in range(cfg.num_layers) for rule in layer_rules(cfg, i)]
    return glob[:1] + layers + glob[1:]


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor the config implies (name -> shape)."""
    heads, groups, hd = _heads(cfg)
    h, ffn = cfg.hidden_size, cfg.ffn_hidden_size
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (heads * hd, h), "self_attn.k_proj.weight": (groups * hd, h),
        "self_attn.v_proj.weight": (groups * hd, h), "self_attn.o_proj.weight": (h, heads * hd),
        "self_attn.q_proj.bias": (heads * hd,), "self_attn.k_proj.bias": (groups * hd,),
        "self_attn.v_proj.bias": (groups * hd,), "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (ffn, h), "mlp.up_proj.weight": (ffn, h), "mlp.down_proj.weight": (h, ffn),
    }
    out = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,), "lm_head.weight": (cfg.vocab_size, h)}
    out.update({f"model.layers.{i}.{k}": v for i in range(cfg.num_layers) for k, v in per_layer.items()})
    return {name: out[name] for rule in all_rules(cfg) for name in rule.hf}


def to_megatron(rule: Rule, tensors: list[torch.Tensor], cfg: ModelConfig, padded_vocab: int) -> torch.Tensor:
    """The full (unsharded) Megatron tensor of `rule` from its HF tensors, in `rule.hf` order."""
    if rule.kind == Kind.qkv:
        return interleave_qkv(*tensors, cfg)
    if rule.kind == Kind.fc1:
        return torch.cat(tensors, dim=0)
    if rule.kind == Kind.vocab:
        return pad_vocab(tensors[0], padded_vocab)
    return tensors[0]


def to_hf(rule: Rule, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors of `rule` from its full (unsharded) Megatron tensor; vocab padding removed."""
    if rule.kind == Kind.qkv:
        parts = split_qkv(tensor, cfg)
    elif rule.kind == Kind.fc1:
        parts = tuple(tensor.chunk(2, dim=0))
    elif rule.kind == Kind.vocab:
        parts = (tensor[: cfg.vocab_size],)
    else:
        parts = (tensor,)
    return [(name, part.contiguous()) for name, part in zip(rule.hf, parts, strict=True)]


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF q [heads*hd, ...], k and v [groups*hd, ...] -> Megatron linear_qkv [groups*(heads/groups+2)*hd, ...]."""
    heads, groups, hd = _heads(cfg)
    rest = q.shape[1:]
    q = q.reshape(groups, heads // groups * hd, *rest)
    k = k.reshape(groups, hd, *rest)
    v = v.reshape(groups, hd, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `interleave_qkv`: Megatron linear_qkv rows -> (q, k, v) in HF row order."""
    heads, groups, hd = _heads(cfg)
    rest = qkv.shape[1:]
    per_group = qkv.reshape(groups, (heads // groups + 2) * hd, *rest)
    q, k, v = per_group.split([heads // groups * hd, hd, hd], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def pad_vocab(weight: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """[V, h] -> [padded_vocab, h] with zero rows (their logits are masked by the student)."""
    extra = padded_vocab - weight.shape[0]
    if extra < 0:
        raise CheckpointError(f"vocabulary of {weight.shape[0]} rows does not fit the padded size {padded_vocab}")
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])]) if extra else weight


MegatronSource = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Sequence[torch.nn.Module]


def megatron_to_hf(source: MegatronSource, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream `(hf_name, tensor)`: HF-named, unsharded tensors, vocabulary padding removed.

    The one entry point shared by export (convert.export_hf), weight sync to rollout engines and EMA
    teachers. `source` is either
    - `(megatron_name, full tensor)` pairs / a mapping, names with global layer indices, or
    - the model chunks of this rank (`build_model`'s list, DDP/Float16Module-wrapped or not): every
      TP rank must call it together (one all_gather per parameter over the TP group) and each
      pipeline stage yields its own layers (the tied output layer is skipped; the first stage sends
      the embedding).
    Tensors come out as soon as their Megatron tensor is complete, so memory stays at one tensor
    group (a fused QKV or gate/up projection), never the model. Names may follow the local or the
    Transformer Engine layer spec (`TE_SPEC_NAMES`).
    """
    if isinstance(source, Sequence) and source and all(isinstance(m, torch.nn.Module) for m in source):
        from mopd.hf.gather import iter_full_megatron_tensors

        source = iter_full_megatron_tensors(list(source))
    rules = {rule.megatron: rule for rule in all_rules(cfg)}
    items = source.items() if isinstance(source, Mapping) else source
    for name, tensor in items:
        rule = rules.get(local_spec_name(name))
        if rule is None:
            if name.endswith("_extra_state") or name == "output_layer.weight":
                continue  # TE metadata; the output layer of a tied model duplicates the embedding
            raise CheckpointError(f"Megatron tensor {name!r} has no HF counterpart for family {cfg.family.value}")
        yield from to_hf(rule, tensor, cfg)


def _heads(cfg: ModelConfig) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    return heads, groups, cfg.head_dim or cfg.hidden_size // heads


__all__ = ["TE_SPEC_NAMES", "Kind", "Rule", "all_rules", "expected_hf_shapes", "global_rules", "interleave_qkv",
           "layer_rules", "local_spec_name", "megatron_to_hf", "pad_vocab", "padded_vocab_size", "split_qkv", "to_hf",
           "to_megatron"]
