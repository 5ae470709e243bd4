"""The student: a Llama/Qwen-style Megatron-Core GPTModel built from the typed config.

Megatron's GPTModel returns logits ``[B, S, V_local]`` (it transposes its internal ``[S, B, V]``
when no labels are given): this TP rank's contiguous slice of the padded vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mopd.config import Dtype, Fp8Recipe, StudentConfig
from mopd.config.model import ModelConfig, Recompute, RopeScaling, padded_vocab_size
from mopd.errors import ConfigError
from mopd.parallel import ParallelLayout
from mopd.student.hardware import (
    Capabilities,
    fp8_problems,
    fp8_shape_problems,
    have_transformer_engine,
    kernel_fusions,
    probe_capabilities,
    resolve_fast_paths,
)

_TORCH_DTYPE = {Dtype.fp32: torch.float32, Dtype.bf16: torch.bfloat16, Dtype.fp16: torch.float16}


def _fp8_fields(cfg: StudentConfig, caps: Capabilities) -> dict:
    p = cfg.precision
    if p.fp8 == Fp8Recipe.none:
        return {}
    problems = fp8_problems(p, caps) + fp8_shape_problems(cfg.model, cfg.parallel.tensor_parallel, p.fp8)
    if problems:
        raise ConfigError("; ".join(problems))
    fields = dict(fp8=p.fp8_format.value, fp8_recipe=p.fp8.value)
    if p.fp8 == Fp8Recipe.delayed:
        # TE's DelayedScaling default pairs a long amax history with its max.
        fields.update(fp8_amax_history_len=p.fp8_amax_history_len, fp8_amax_compute_algo="max")
    return fields


def architecture_fields(m: ModelConfig) -> dict:
    """The ``TransformerConfig`` fields that describe a Llama/Qwen decoder (RMSNorm, SwiGLU, GQA,
    optional QKV bias and QK-norm); the one mapping the student and the HF converter share."""
    return dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
    )


def _recompute_fields(cfg: StudentConfig) -> dict:
    t = cfg.train
    if t.recompute == Recompute.selective:
        return dict(recompute_granularity="selective", recompute_modules=list(t.recompute_modules))
    if t.recompute == Recompute.full:
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return {}


def transformer_config(cfg: StudentConfig, layout: ParallelLayout, caps: Capabilities | None = None):
    """Megatron ``TransformerConfig`` for the student at this layout (Llama/Qwen fields).

    ``caps`` defaults to what this process has for ``layout.device``; the kernel fusions and fast
    paths follow from it (mopd.student.hardware), and FP8 is checked against it.
    """
    from megatron.core.transformer import TransformerConfig

    caps = probe_capabilities(layout.device) if caps is None else caps
    m, dtype = cfg.model, _TORCH_DTYPE[cfg.precision.dtype]
    on_cpu = layout.device.type == "cpu"
    if cfg.parallel.sequence_parallel and not (caps.cuda and caps.transformer_engine):
        raise ConfigError(
            "student.parallel.sequence_parallel=true needs the Transformer Engine layer spec (CUDA + TE); "
            "the local spec's torch RMSNorm does not support it. Set student.parallel.sequence_parallel=false"
        )
    fast = resolve_fast_paths(cfg.fast_paths, caps, data_parallel=layout.dp)
    return TransformerConfig(
        **architecture_fields(m),
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        sequence_parallel=cfg.parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Full weights drawn on the CPU then sliced: the same seed gives the same model at any TP.
        use_cpu_initialization=on_cpu,
        **kernel_fusions(caps),
        apply_rope_fusion=fast.rope_fusion,
        gradient_accumulation_fusion=fast.gradient_accumulation_fusion,
        deallocate_pipeline_outputs=True,
        **_recompute_fields(cfg),
        **_fp8_fields(cfg, caps),
    )


def _uses_te_spec(layout: ParallelLayout) -> bool:
    return layout.device.type == "cuda" and have_transformer_engine()


def _layer_spec(cfg: StudentConfig, layout: ParallelLayout):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if _uses_te_spec(layout):
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.model.qk_layernorm)
    return get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=cfg.model.qk_layernorm)


def build_model(cfg: StudentConfig, layout: ParallelLayout, *, wrap_ddp: bool = True) -> list[torch.nn.Module]:
    """The student's model chunks for this rank (one chunk: no virtual pipeline stages).

    The chunk is a GPTModel holding this stage's layers (embedding on the first stage, output layer
    on the last), cast by ``Float16Module`` under bf16/fp16, and wrapped in Megatron's
    DistributedDataParallel when ``wrap_ddp`` (set False for frozen copies such as a self-teacher).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.module import Float16Module

    tc = transformer_config(cfg, layout)
    model = GPTModel(
        config=tc,
        transformer_layer_spec=_layer_spec(cfg, layout),
        vocab_size=padded_vocab_size(cfg.model, layout.tp),
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=layout.is_first_stage,
        post_process=layout.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.model.tie_word_embeddings,
        **gpt_rope_kwargs(cfg.model),
    )
    model.to(layout.device)
    if tc.bf16 or tc.fp16:
        model = Float16Module(tc, model)
    if wrap_ddp:
        model = _wrap_ddp(cfg, layout, tc, model)
    return [model]


def gpt_rope_kwargs(model: ModelConfig) -> dict:
    """GPTModel's RoPE arguments: base frequency and, for llama3, the scaling factor.

    Megatron takes only the factor; ModelConfig.problems() refuses the other llama3 parameters unless
    they equal the values Megatron hard-codes, so the frequencies match the HF model's.
    """
    # a ModelConfig built in code skips the loader's checks; Megatron would silently use its own values
    bad = [p for p in model.problems() if p.key.startswith("rope_")]
    if bad:
        raise ConfigError("; ".join(f"student.model.{p.key}={p.value!r}: {p.reason}" for p in bad))
    return dict(position_embedding_type="rope", rotary_base=int(model.rope_theta),
                rope_scaling=model.rope_scaling == RopeScaling.llama3, rope_scaling_factor=model.rope_scaling_factor)


def _wrap_ddp(cfg: StudentConfig, layout: ParallelLayout, tc, model: torch.nn.Module) -> torch.nn.Module:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    fast = resolve_fast_paths(cfg.fast_paths, probe_capabilities(layout.device), data_parallel=layout.dp)
    ddp_config = DistributedDataParallelConfig(
        # Reduce low-precision gradients in fp32 (Megatron-LM's accumulate_allreduce_grads_in_fp32).
        grad_reduce_in_fp32=cfg.precision.dtype != Dtype.fp32,
        overlap_grad_reduce=fast.overlap_grad_reduce,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=tc, ddp_config=ddp_config, module=model)
    # The schedules read these hooks from the model config, as Megatron-LM's setup sets them.
    tc.no_sync_func = ddp.no_sync
    tc.finalize_model_grads_func = finalize_model_grads
    return ddp
