"""Derived values of a run: everything computed from the config, never written back into it.

`mopd plan CONFIG --world-size N` prints this for a target cluster on any machine, before a job is
queued: the Megatron layout, micro-batching, padded vocabulary and a per-GPU memory estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from mopd.config import Dtype, RunConfig, StudentConfig, padded_vocab_size
from mopd.errors import ConfigError
from mopd.parallel.layout import LayoutPlan, plan_layout

_BYTES = {Dtype.fp32: 4, Dtype.bf16: 2, Dtype.fp16: 2}


@dataclass(frozen=True)
class Plan:
    layout: LayoutPlan
    padded_vocab_size: int
    """Embedding rows after padding (mopd.config.padded_vocab_size)."""
    num_microbatches: int
    """Micro-batches per optimizer step on each data-parallel rank."""
    num_parameters: int
    """Total parameters of the student (padded vocabulary included)."""
    gib_per_gpu: float
    """Weights + gradients + optimizer state per GPU (activations and buffers not included)."""

    def describe(self) -> str:
        lay = self.layout
        lines = [
            f"world size {lay.world_size}: TP={lay.tp} x PP={lay.pp} x DP={lay.dp}",
            *(f"  pipeline stage {i}: ranks {ranks}" for i, ranks in enumerate(lay.ranks_per_stage)),
            f"padded vocabulary: {self.padded_vocab_size}",
            f"micro-batches per step per DP rank: {self.num_microbatches}",
            f"parameters: {self.num_parameters / 1e6:.2f}M",
            f"model+grad+optimizer state per GPU: {self.gib_per_gpu:.2f} GiB (activations not included)",
        ]
        return "\n".join(lines)


def count_parameters(student: StudentConfig) -> int:
    m = student.model
    head_dim = m.head_dim or m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    vocab = padded_vocab_size(m, student.parallel.tensor_parallel)
    qkv = m.hidden_size * head_dim * (m.num_attention_heads + 2 * groups)
    attn = qkv + m.num_attention_heads * head_dim * m.hidden_size
    mlp = 3 * m.hidden_size * m.ffn_hidden_size
    norms = 2 * m.hidden_size + (2 * head_dim if m.qk_layernorm else 0)
    embeddings = vocab * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    return m.num_layers * (attn + mlp + norms) + embeddings + m.hidden_size


def make_plan(config: RunConfig, world_size: int) -> Plan:
    student = config.student
    layout = plan_layout(student.parallel, world_size)
    per_step = student.train.micro_batch_size * layout.dp
    if student.train.global_batch_size % per_step:
        raise ConfigError(
            f"student.train.global_batch_size={student.train.global_batch_size}: must be a multiple of "
            f"student.train.micro_batch_size ({student.train.micro_batch_size}) x data-parallel size ({layout.dp})"
        )
    params = count_parameters(student)
    shard = params / (layout.tp * layout.pp)
    # bf16/fp32 weights + fp32 main grads + fp32 master copy and two Adam moments (sharded over DP
    # by the distributed optimizer).
    optimizer_bytes = 12 / (layout.dp if student.optimizer.use_distributed_optimizer else 1)
    per_param = _BYTES[student.precision.dtype] + 4 + optimizer_bytes
    return Plan(
        layout=layout,
        padded_vocab_size=padded_vocab_size(student.model, layout.tp),
        num_microbatches=student.train.global_batch_size // per_step,
        num_parameters=params,
        gib_per_gpu=shard * per_param / 2**30,
    )
