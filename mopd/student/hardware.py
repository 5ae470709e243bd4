"""What this machine's kernels allow, and the pure decisions mopd makes from it.

``probe_capabilities(device)`` looks once at the device and the importable kernel libraries
(Transformer Engine, Apex's CUDA extensions); everything else here is a pure function of that
``Capabilities`` and the config, so each decision is tested on a CPU machine with made-up
capabilities:

* ``kernel_fusions``: Megatron's fused softmax / bias-activation / bias-dropout flags;
* ``resolve_fast_paths``: the config's fast paths (auto, required or off) for this machine;
* ``fp8_problems``: FP8 recipes the GPU cannot run (MXFP8 before Blackwell, FP8 before Ada);
* ``fp8_token_multiple`` / ``fp8_shape_problems``: TE's FP8 GEMM shape rules.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from mopd.config.model import FastPathConfig, Fp8Recipe, ModelConfig, PrecisionConfig
from mopd.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The device and kernel libraries a model build can use."""

    cuda: bool
    """The model runs on a CUDA device."""
    transformer_engine: bool
    """``transformer_engine.pytorch`` imports (mopd then builds the TE layer spec)."""
    apex_softmax: bool
    """Apex's ``scaled_masked_softmax_cuda`` (Megatron's fused softmax on the local spec)."""
    apex_grad_accum: bool
    """Apex's ``fused_weight_gradient_mlp_cuda`` (gradient-accumulation fusion in Megatron's linears)."""
    compute_capability: tuple[int, int] | None = None
    """(major, minor) of the CUDA device; None on the CPU."""


CPU = Capabilities(cuda=False, transformer_engine=False, apex_softmax=False, apex_grad_accum=False)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def have_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def probe_capabilities(device: torch.device) -> Capabilities:
    """Capabilities of ``device`` in this process (CPU: nothing fused)."""
    if device.type != "cuda":
        return CPU
    return Capabilities(
        cuda=True, transformer_engine=have_transformer_engine(),
        apex_softmax=_importable("scaled_masked_softmax_cuda"),
        apex_grad_accum=_importable("fused_weight_gradient_mlp_cuda"),
        compute_capability=torch.cuda.get_device_capability(device),
    )


def kernel_fusions(caps: Capabilities) -> dict[str, bool]:
    """Megatron's kernel-fusion flags for ``TransformerConfig``.

    The bias-activation (SwiGLU) and bias-dropout-add fusions are torch-jitted code: any CUDA device.
    The fused masked softmax is a compiled extension (Apex ``--cuda_ext``) that the pip megatron-core
    wheel lacks; with the local spec, Megatron picks it for many shapes (bf16, 16 < sk <= 4096,
    sq % 4 == 0 ...) and fails at import, so it is on only with TE (whose attention replaces it) or
    the Apex kernel.
    """
    return dict(
        bias_activation_fusion=caps.cuda,
        bias_dropout_fusion=caps.cuda,
        masked_softmax_fusion=caps.cuda and (caps.transformer_engine or caps.apex_softmax),
    )


@dataclass(frozen=True, slots=True)
class FastPaths:
    """The fast paths one model build uses (``FastPathConfig`` resolved against a machine)."""

    gradient_accumulation_fusion: bool
    overlap_grad_reduce: bool
    rope_fusion: bool


def _resolve(key: str, asked: bool | None, missing: str | None) -> bool:
    """auto (None): on unless something is missing; true: on, or a ConfigError naming what is missing."""
    if asked is None:
        return missing is None
    if asked and missing is not None:
        raise ConfigError(f"student.fast_paths.{key}=true needs {missing}; set it to null (auto) or false")
    return asked


def resolve_fast_paths(cfg: FastPathConfig, caps: Capabilities, *, data_parallel: int) -> FastPaths:
    """Each fast path on, off, or refused (ConfigError naming the key) for this machine and layout."""
    no_cuda = None if caps.cuda else "a CUDA device"
    grad_accum = no_cuda or (None if caps.apex_grad_accum else
                             "Apex's fused_weight_gradient_mlp_cuda kernel (NGC containers ship it; pip does not)")
    rope = no_cuda or (None if caps.transformer_engine else "Transformer Engine's fused RoPE kernel")
    # Overlap needs only more than one DP rank (gloo overlaps too); auto turns it on with CUDA only.
    overlap = None if data_parallel > 1 else "more than one data-parallel rank"
    overlap_auto = cfg.overlap_grad_reduce if cfg.overlap_grad_reduce is not None else (caps.cuda and not overlap)
    return FastPaths(
        gradient_accumulation_fusion=_resolve("gradient_accumulation_fusion", cfg.gradient_accumulation_fusion,
                                              grad_accum),
        overlap_grad_reduce=_resolve("overlap_grad_reduce", overlap_auto, overlap),
        rope_fusion=_resolve("rope_fusion", cfg.rope_fusion, rope),
    )


_FP8_MIN_CAPABILITY = {
    # TE: FP8 GEMMs from Ada/Hopper (sm_89/sm_90); MXFP8 block scaling only on Blackwell (sm_100+).
    Fp8Recipe.delayed: (8, 9), Fp8Recipe.tensorwise: (8, 9), Fp8Recipe.blockwise: (9, 0), Fp8Recipe.mxfp8: (10, 0),
}
_GPU_NAMES = {(8, 9): "Ada (sm_89)", (9, 0): "Hopper (sm_90)", (10, 0): "Blackwell (sm_100)"}


def fp8_problems(precision: PrecisionConfig, caps: Capabilities) -> list[str]:
    """Why this machine cannot run ``precision.fp8`` (empty when it can)."""
    if precision.fp8 == Fp8Recipe.none:
        return []
    key = f"student.precision.fp8={precision.fp8.value}"
    if not caps.cuda or not caps.transformer_engine:
        return [f"{key} needs Transformer Engine on a CUDA GPU, which this process does not have; install "
                "transformer-engine[pytorch] on a Hopper+ GPU node or set student.precision.fp8=none"]
    need = _FP8_MIN_CAPABILITY[precision.fp8]
    have = caps.compute_capability or (0, 0)
    if have < need:
        return [f"{key} needs a {_GPU_NAMES[need]} or newer GPU; this one is sm_{have[0]}{have[1]}"
                + ("; use fp8=tensorwise or delayed on Hopper" if precision.fp8 == Fp8Recipe.mxfp8 else "")]
    return []


_FP8_TOKEN_MULTIPLE = {Fp8Recipe.delayed: 16, Fp8Recipe.tensorwise: 16, Fp8Recipe.mxfp8: 32, Fp8Recipe.blockwise: 128}
"""Tokens per linear input under each recipe. TE's ``assert_dim_for_fp8_exec`` asks the leading
dims' product to divide by 8 and the last dim by 16; the weight-gradient GEMM reads the input
transposed, making the token count a last dim, hence 16. MXFP8 scales blocks of 32 elements along
either dim; Float8BlockScaling tiles by 128."""


def fp8_token_multiple(recipe: Fp8Recipe | str) -> int:
    return _FP8_TOKEN_MULTIPLE[Fp8Recipe(recipe)]


def fp8_shape_problems(model: ModelConfig, tp: int, recipe: Fp8Recipe) -> list[str]:
    """Per-rank feature widths of the linear layers that TE's FP8 GEMMs cannot take."""
    if recipe == Fp8Recipe.none:
        return []
    multiple = fp8_token_multiple(recipe)
    head_dim = model.head_dim or model.hidden_size // model.num_attention_heads
    groups = model.num_query_groups or model.num_attention_heads
    widths = {
        "hidden_size": model.hidden_size,
        "num_attention_heads * head_dim / tensor_parallel": model.num_attention_heads * head_dim // tp,
        "(num_attention_heads + 2 * num_query_groups) * head_dim / tensor_parallel":
            (model.num_attention_heads + 2 * groups) * head_dim // tp,
        "ffn_hidden_size / tensor_parallel": model.ffn_hidden_size // tp,
    }
    return [f"student.model: {name} = {width} is not a multiple of {multiple}, which FP8 ({recipe.value}) GEMMs "
            "need; use fp8=none or another size" for name, width in widths.items() if width % multiple]
