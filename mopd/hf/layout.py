"""The Megatron checkpoint layout of a ModelConfig, taken from a GPTModel built on the meta device.

The converter never guesses Megatron's checkpoint keys: it builds the real GPTModel (local layer spec,
TP=1, PP=1) on the meta device, which costs no memory, and asks it for `sharded_state_dict()`. Keys,
global shapes, the stacked layer axis and the SwiGLU split of linear_fc1 are then exactly what a
training run's `dist_checkpointing.load` expects; resharding to another TP/PP happens at load time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from mopd.config import ModelConfig
from mopd.errors import CheckpointError


def transformer_config(cfg: ModelConfig, dtype: torch.dtype):
    """Megatron TransformerConfig of a Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA) at TP=PP=1."""
    from megatron.core.transformer import TransformerConfig

    from mopd.student.model import architecture_fields

    return TransformerConfig(
        **architecture_fields(cfg), params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=True, bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False,
    )


def build_gpt(cfg: ModelConfig, padded_vocab: int, dtype: torch.dtype):
    """The whole Megatron GPTModel (local spec, TP=1, PP=1) for `cfg`, on the current device.

    Only its structure matters to the converter (it is built on the meta device); the training
    student comes from mopd.student.build_model, whose checkpoints have the same keys (the parity
    tests load one into the other's).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from mopd.student.model import gpt_rope_kwargs

    spec = get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm")
    return GPTModel(
        config=transformer_config(cfg, dtype), transformer_layer_spec=spec, vocab_size=padded_vocab,
        max_sequence_length=cfg.max_position_embeddings,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings, **gpt_rope_kwargs(cfg),
    )


def meta_sharded_state_dict(cfg: ModelConfig, padded_vocab: int, dtype: torch.dtype) -> dict:
    """`GPTModel.sharded_state_dict()` of the whole model (TP=1, PP=1) with meta-device data."""
    with torch.device("meta"):
        model = build_gpt(cfg, padded_vocab, dtype)
    return model.sharded_state_dict()


@contextlib.contextmanager
def single_process_megatron() -> Iterator[None]:
    """A world-size-1 gloo group and Megatron parallel state (TP=PP=1) for the converter; whatever this
    sets up is torn down after, whatever the caller had set up is left alone.

    The store lives in memory (no port), so conversions can run side by side on one machine.
    """
    from megatron.core import parallel_state

    own_group = not torch.distributed.is_initialized()
    if own_group:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    elif torch.distributed.get_world_size() != 1:
        raise CheckpointError("HF import/export runs in a single process; call it outside a distributed job "
                              "(inside one, stream with mopd.hf.megatron_to_hf instead)")
    own_state = not parallel_state.model_parallel_is_initialized()
    try:
        if own_state:
            parallel_state.initialize_model_parallel(1, 1)
        yield
    finally:
        if own_state:
            parallel_state.destroy_model_parallel()
        if own_group:
            torch.distributed.destroy_process_group()


__all__ = ["build_gpt", "meta_sharded_state_dict", "single_process_megatron", "transformer_config"]
