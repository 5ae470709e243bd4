"""Derived values of a run: everything computed from the config, never written back into it.

`mopd plan CONFIG --world-size N` prints this for a target cluster on any machine, before a job is
queued: the Megatron layout, micro-batching, padded vocabulary, and per pipeline stage the memory of
one GPU (model state + activations) with a verdict against an 80 GB H100.

Activation memory follows Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (arXiv:2205.05198), section 4, adapted to the layers mopd builds on a GPU: the
Transformer Engine spec (RMSNorm fused into the following linear, SwiGLU, GQA), flash attention, no
dropout. Per layer and token, in bytes, with ``B`` bytes per element of the compute dtype, ``t`` the
TP size, heads ``a``, query groups ``g``, head dim ``d``, hidden ``h``, FFN ``f``::

    attention: B*h (norm input) + B*h (normed, kept by the fused linear) + B*(a + 2g)*d (q, k, v)
               + B*a*d (attention output) + 4*a (fp32 softmax statistics)
    MLP:       B*h (norm input) + B*h (normed) + 2*B*f (gate and up) + B*f (SwiGLU output)

everything divided by ``t`` under sequence parallelism (without it the four ``B*h`` terms are
replicated). Flash attention stores no ``[s, s]`` scores, so the paper's ``5as/h`` term is absent
and its "core_attn" selective recompute saves only the softmax statistics. Recompute settings:

* ``selective``, modules ``mlp``: the MLP keeps only its input (``B*h/t``) instead of ``2Bh + 3Bf``;
  ``core_attn`` drops the statistics; ``layernorm`` saves nothing (the TE spec has no separate norm).
* ``full`` (uniform, one layer per unit): each layer keeps its input ``B*h/t`` and, while one
  micro-batch runs backward, one layer's activations are rebuilt in full.

Under 1F1B (no interleaving) stage ``i`` of ``p`` holds ``min(p - i, M)`` micro-batches of ``M`` in
flight, each ``max_seq_len x micro_batch_size`` tokens (the step pads to its longest sequence). The
last stage adds the final norm (``2Bh/t``), its bf16 logits and their gradient (``2 * B * V/t`` per
token) and the loss's fp32 chunk (``3 * 4 * V/t * loss_chunk_tokens``). Model state per parameter:
``B`` (weights) + 4 (fp32 gradient buffer) + optimizer (fp32 master copy and two Adam moments: 12
bytes, 8 under fp32, divided by DP with the distributed optimizer). FP8 adds TE's cached FP8 weights
and transposes (2 bytes per linear-layer parameter). A fixed reserve covers the CUDA context, cuBLAS
/ TE workspaces, NCCL buffers and allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

from mopd.config import Dtype, Fp8Recipe, RunConfig, StudentConfig, padded_vocab_size
from mopd.config.model import Recompute
from mopd.errors import ConfigError
from mopd.parallel.layout import LayoutPlan, plan_layout
from mopd.student.hardware import Capabilities, fp8_problems, fp8_shape_problems

_BYTES = {Dtype.fp32: 4, Dtype.bf16: 2, Dtype.fp16: 2}
GIB = 2**30
H100_80GB_GIB = 81559 * 2**20 / GIB
"""What an H100 80 GB (SXM, HBM3) reports: 81559 MiB, about 79.6 GiB."""
H100_WITH_TE = Capabilities(cuda=True, transformer_engine=True, apex_softmax=False, apex_grad_accum=False,
                            compute_capability=(9, 0))
RESERVED_GIB = 6.0
"""CUDA context, cuBLAS/TE workspaces, NCCL buffers and allocator fragmentation, per GPU."""
TIGHT_FRACTION = 0.1
"""A plan whose margin is under this fraction of the GPU is "tight": measure before queueing."""


@dataclass(frozen=True)
class StageMemory:
    """One pipeline stage's memory on each of its GPUs, in GiB."""

    stage: int
    layers: int
    in_flight: int
    """Micro-batches whose activations are held at once under 1F1B."""
    model_state_gib: float
    activation_gib: float
    fp8_weight_gib: float

    @property
    def total_gib(self) -> float:
        return self.model_state_gib + self.activation_gib + self.fp8_weight_gib + RESERVED_GIB


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
    """Weights + gradients + optimizer state per GPU of the largest stage (no activations)."""
    recompute: str
    """The configured recompute setting, as printed."""
    stages: tuple[StageMemory, ...]
    """Memory per pipeline stage at the configured recompute setting."""
    peak_by_recompute: dict[str, float]
    """Peak GiB over the stages for each recompute setting (for comparison)."""
    h100_problems: tuple[str, ...] = ()
    """What the config asks that an H100 (sm_90, Transformer Engine installed) cannot run."""
    gpu_gib: float = H100_80GB_GIB

    @property
    def peak_gib(self) -> float:
        return max(s.total_gib for s in self.stages)

    @property
    def margin_gib(self) -> float:
        return self.gpu_gib - self.peak_gib

    def verdict(self, peak: float | None = None) -> str:
        margin = self.gpu_gib - (self.peak_gib if peak is None else peak)
        if margin < 0:
            return f"does NOT fit (short by {-margin:.1f} GiB)"
        word = "tight" if margin < TIGHT_FRACTION * self.gpu_gib else "fits"
        return f"{word} (margin {margin:.1f} GiB)"

    def describe(self) -> str:
        lay = self.layout
        lines = [
            f"world size {lay.world_size}: TP={lay.tp} x PP={lay.pp} x DP={lay.dp}",
            *(f"  pipeline stage {i}: ranks {ranks}" for i, ranks in enumerate(lay.ranks_per_stage)),
            f"padded vocabulary: {self.padded_vocab_size}",
            f"micro-batches per step per DP rank: {self.num_microbatches}",
            f"parameters: {self.num_parameters / 1e6:.2f}M",
            f"model+grad+optimizer state per GPU: {self.gib_per_gpu:.2f} GiB (largest stage)",
            f"memory per GPU by pipeline stage (recompute={self.recompute}; "
            f"{RESERVED_GIB:.1f} GiB reserved for CUDA context, workspaces, NCCL):",
        ]
        for s in self.stages:
            lines.append(f"  stage {s.stage}: activations {s.activation_gib:.2f} GiB ({s.layers} layers x "
                         f"{s.in_flight} in flight) + model state {s.model_state_gib:.2f} GiB"
                         + (f" + fp8 weights {s.fp8_weight_gib:.2f} GiB" if s.fp8_weight_gib else "")
                         + f" = {s.total_gib:.2f} GiB")
        lines.append(f"peak {self.peak_gib:.2f} of {self.gpu_gib:.1f} GiB (H100 80 GB): {self.verdict()}")
        lines += [f"on an H100: {why}" for why in self.h100_problems]
        others = [f"{name} {peak:.2f} GiB, {self.verdict(peak)}" for name, peak in self.peak_by_recompute.items()]
        lines.append("  by recompute setting: " + "; ".join(others))
        return "\n".join(lines)


def _dims(student: StudentConfig) -> tuple[int, int, int, int, int]:
    m = student.model
    head_dim = m.head_dim or m.hidden_size // m.num_attention_heads
    return m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups or m.num_attention_heads, head_dim


def layer_parameters(student: StudentConfig) -> tuple[int, int]:
    """(linear-layer weights, norm weights) of one transformer layer."""
    h, f, a, g, d = _dims(student)
    linear = h * d * (a + 2 * g) + a * d * h + 3 * h * f
    norms = 2 * h + (2 * d if student.model.qk_layernorm else 0)
    bias = (a + 2 * g) * d if student.model.add_qkv_bias else 0
    return linear, norms + bias


def count_parameters(student: StudentConfig) -> int:
    m = student.model
    vocab = padded_vocab_size(m, student.parallel.tensor_parallel)
    linear, other = layer_parameters(student)
    embeddings = vocab * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    return m.num_layers * (linear + other) + embeddings + m.hidden_size


def layer_activation_bytes_per_token(student: StudentConfig, recompute: Recompute,
                                     modules: tuple[str, ...] = ("mlp",)) -> float:
    """Bytes one transformer layer keeps for backward per token of a micro-batch (formulas above)."""
    h, f, a, g, d = _dims(student)
    t, b = student.parallel.tensor_parallel, _BYTES[student.precision.dtype]
    replicated = 1 if student.parallel.sequence_parallel else t  # the [s, b, h] tensors
    if recompute == Recompute.full:
        return b * h / t * replicated
    norm_pair = 2 * b * h * replicated / t
    attention = norm_pair + (b * (a + 2 * g) * d + b * a * d + 4 * a) / t
    mlp = norm_pair + 3 * b * f / t
    if recompute == Recompute.selective:
        if "core_attn" in modules:
            attention -= 4 * a / t
        if "mlp" in modules:
            mlp = b * h * replicated / t
    return attention + mlp


def _stage_activations(student: StudentConfig, stage: int, layout: LayoutPlan, microbatches: int,
                       recompute: Recompute) -> tuple[int, float]:
    """(micro-batches in flight, activation bytes) of one GPU of ``stage``."""
    tr = student.train
    tokens = tr.max_seq_len * tr.micro_batch_size
    layers = student.model.num_layers // layout.pp
    in_flight = min(layout.pp - stage, microbatches)
    per_layer = layer_activation_bytes_per_token(student, recompute, tuple(tr.recompute_modules)) * tokens
    total = in_flight * layers * per_layer
    if recompute == Recompute.full:  # one layer rebuilt in full during its backward
        total += layer_activation_bytes_per_token(student, Recompute.none) * tokens
    if stage == layout.pp - 1:
        b, t = _BYTES[student.precision.dtype], layout.tp
        vocab_local = padded_vocab_size(student.model, t) / t
        replicated = 1 if student.parallel.sequence_parallel else t
        total += tokens * (2 * b * student.model.hidden_size * replicated / t + 2 * b * vocab_local)
        total += 3 * 4 * vocab_local * min(tr.loss_chunk_tokens, tokens)
    return in_flight, total


def _stage_parameters(student: StudentConfig, stage: int, layout: LayoutPlan) -> tuple[float, float]:
    """(all parameters, linear-layer parameters) one GPU of ``stage`` holds."""
    m = student.model
    layers = m.num_layers // layout.pp
    linear, other = layer_parameters(student)
    params = layers * (linear + other)
    embedding = padded_vocab_size(m, layout.tp) * m.hidden_size
    if stage == 0:
        params += embedding
    if stage == layout.pp - 1:
        # Tied embeddings across stages: the last stage keeps its own copy for the output layer.
        params += m.hidden_size + (embedding if not m.tie_word_embeddings or layout.pp > 1 else 0)
    return params / layout.tp, layers * linear / layout.tp


def _bytes_per_parameter(student: StudentConfig, dp: int) -> float:
    dtype = student.precision.dtype
    optimizer = (8 if dtype == Dtype.fp32 else 12) / (dp if student.optimizer.use_distributed_optimizer else 1)
    return _BYTES[dtype] + 4 + optimizer


def stage_memory(student: StudentConfig, layout: LayoutPlan, microbatches: int,
                 recompute: Recompute) -> tuple[StageMemory, ...]:
    out = []
    fp8 = student.precision.fp8 != Fp8Recipe.none
    for stage in range(layout.pp):
        params, linear = _stage_parameters(student, stage, layout)
        in_flight, activations = _stage_activations(student, stage, layout, microbatches, recompute)
        out.append(StageMemory(
            stage=stage, layers=student.model.num_layers // layout.pp, in_flight=in_flight,
            model_state_gib=params * _bytes_per_parameter(student, layout.dp) / GIB,
            activation_gib=activations / GIB, fp8_weight_gib=2 * linear / GIB if fp8 else 0.0,
        ))
    return tuple(out)


def _recompute_label(student: StudentConfig, recompute: Recompute) -> str:
    if recompute == Recompute.selective:
        return f"selective[{','.join(student.train.recompute_modules)}]"
    return recompute.value


def make_plan(config: RunConfig, world_size: int) -> Plan:
    student = config.student
    layout = plan_layout(student.parallel, world_size)
    per_step = student.train.micro_batch_size * layout.dp
    if student.train.global_batch_size % per_step:
        raise ConfigError(
            f"student.train.global_batch_size={student.train.global_batch_size}: must be a multiple of "
            f"student.train.micro_batch_size ({student.train.micro_batch_size}) x data-parallel size ({layout.dp})"
        )
    microbatches = student.train.global_batch_size // per_step
    stages = stage_memory(student, layout, microbatches, student.train.recompute)
    peaks = {_recompute_label(student, r): max(s.total_gib for s in stage_memory(student, layout, microbatches, r))
             for r in Recompute}
    return Plan(
        layout=layout,
        padded_vocab_size=padded_vocab_size(student.model, layout.tp),
        num_microbatches=microbatches,
        num_parameters=count_parameters(student),
        gib_per_gpu=max(s.model_state_gib for s in stages),
        recompute=_recompute_label(student, student.train.recompute),
        stages=stages,
        peak_by_recompute=peaks,
        h100_problems=tuple(fp8_problems(student.precision, H100_WITH_TE)
                            + fp8_shape_problems(student.model, layout.tp, student.precision.fp8)),
    )
