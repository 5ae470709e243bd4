"""Config sections for the student: architecture, parallel layout, precision, optimizer, training."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from mopd.config.checks import Problem, at_least, choice_of, positive


class Family(str, Enum):
    """HF model families the in-house mapping covers (mopd/hf)."""

    llama = "llama"
    qwen2 = "qwen2"
    qwen3 = "qwen3"
    mistral = "mistral"


class Dtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Fp8Recipe(str, Enum):
    """Transformer Engine FP8 recipes (TE's DelayedScaling, Float8CurrentScaling, MXFP8BlockScaling,
    Float8BlockScaling)."""

    none = "none"
    delayed = "delayed"
    tensorwise = "tensorwise"
    mxfp8 = "mxfp8"
    blockwise = "blockwise"


class Fp8Format(str, Enum):
    e4m3 = "e4m3"
    hybrid = "hybrid"


class LrSchedule(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class Overlong(str, Enum):
    """What happens to a rollout longer than ``student.train.max_seq_len``."""

    truncate = "truncate"
    """Cut its response to fit (counted: ``train/truncated_rollouts``, ``train/truncated_tokens``)."""
    refuse = "refuse"
    """Stop the run, naming the rollout."""


class RopeScaling(str, Enum):
    """RoPE frequency scaling the Megatron student reproduces exactly."""

    none = "none"
    llama3 = "llama3"
    """Llama 3.1 / 3.2 / 3.3: long wavelengths divided by a factor, a smooth ramp to the short ones."""


# Megatron-Core 0.19's RotaryEmbedding._apply_scaling hard-codes these (GPTModel passes only the factor),
# so a llama3 config with other values would train a model whose frequencies differ from the checkpoint's.
MEGATRON_LLAMA3_ROPE = {"rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0,
                        "rope_original_max_position_embeddings": 8192}


class Backend(str, Enum):
    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"


class Recompute(str, Enum):
    """Activation recomputation (Megatron's ``recompute_granularity``); memory figures in mopd.plan."""

    none = "none"
    """Keep every activation the backward pass needs."""
    selective = "selective"
    """Checkpoint the submodules in ``train.recompute_modules`` of every layer (Megatron "selective")."""
    full = "full"
    """Checkpoint whole layers (Megatron "full", method "uniform", one layer per unit): only each
    layer's input is kept and the layer's forward runs again in backward (~1/3 more compute)."""


RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
"""Megatron-Core 0.19's selective-recompute submodules that apply to a dense Llama/Qwen decoder."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A Llama/Qwen-style decoder (RMSNorm, SwiGLU, RoPE, GQA) as Megatron-Core builds it."""

    family: Family = Family.llama
    """HF family the weights come from and export to (decides QKV bias, QK-norm defaults)."""
    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads (GQA); null means one per query head."""
    head_dim: int | None = None
    """Per-head width (kv_channels); null means hidden_size / num_attention_heads."""
    ffn_hidden_size: int = 256
    """SwiGLU intermediate size."""
    vocab_size: int = 128
    """Tokenizer vocabulary size (before padding for tensor parallelism)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding rows to a multiple of this times the TP size; padded columns are never selectable."""
    max_position_embeddings: int = 2048
    """Longest sequence RoPE is built for."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: RopeScaling = RopeScaling.none
    """RoPE frequency scaling: none, or llama3 (HF rope_type "llama3", Llama 3.1+)."""
    rope_scaling_factor: float = 8.0
    """llama3: long-wavelength frequencies are divided by this (8 for Llama 3.1/3.3, 32 for 3.2 1B/3B)."""
    rope_low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max_position_embeddings / this are fully scaled (Megatron: 1 only)."""
    rope_high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max_position_embeddings / this are kept (Megatron: 4 only)."""
    rope_original_max_position_embeddings: int = 8192
    """llama3: the pre-training context the ramp is defined against (Megatron: 8192 only)."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer."""
    qk_layernorm: bool = False
    """RMSNorm on queries and keys per head (Qwen3)."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection (Qwen2)."""
    init_method_std: float = 0.02
    """Std of the normal initialisation for fresh weights."""

    def problems(self) -> list[Problem]:
        out = [
            *positive(self, "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size"),
            *positive(self, "make_vocab_size_divisible_by", "max_position_embeddings", "rope_theta", "rms_norm_eps"),
        ]
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            out.append(Problem("hidden_size", self.hidden_size,
                               f"must be divisible by num_attention_heads={self.num_attention_heads} (or set head_dim)"))
        out += self._rope_problems()
        groups = self.num_query_groups
        if groups is not None and (groups <= 0 or self.num_attention_heads % groups):
            out.append(Problem("num_query_groups", groups,
                               f"must be a positive divisor of num_attention_heads={self.num_attention_heads}"))
        return out

    def _rope_problems(self) -> list[Problem]:
        if self.rope_scaling == RopeScaling.none:
            return []
        out = []
        if not self.rope_scaling_factor >= 1.0:
            out.append(Problem("rope_scaling_factor", self.rope_scaling_factor, "must be >= 1"))
        for key, fixed in MEGATRON_LLAMA3_ROPE.items():
            if getattr(self, key) != fixed:
                out.append(Problem(key, getattr(self, key), f"Megatron-Core's llama3 RoPE scaling hard-codes {fixed}; "
                                                             "other values are not supported"))
        return out


def padded_vocab_size(model: ModelConfig, tp: int) -> int:
    """Embedding rows: the vocabulary rounded up to a multiple of lcm(make_vocab_size_divisible_by, tp).

    Megatron-LM pads to a multiple of ``divisible_by * tp``, so the padded size (and with it every
    checkpoint's embedding shape) changes with TP and a checkpoint cannot be loaded at another TP.
    With the lcm, any TP that divides ``make_vocab_size_divisible_by`` (1, 2, 4, 8 ... for 128) gives
    the same padding, so checkpoints reshard freely; the shards stay equal-sized, as
    VocabParallelEmbedding requires. Padded columns are never selectable (mopd.objectives).
    """
    multiple = math.lcm(model.make_vocab_size_divisible_by, tp)
    return -(-model.vocab_size // multiple) * multiple


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Megatron parallel layout. Data parallelism is what is left: world_size / (tp * pp)."""

    tensor_parallel: int = 1
    """Tensor-parallel size (splits heads, FFN and the vocabulary)."""
    pipeline_parallel: int = 1
    """Pipeline stages (splits layers)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (only with tensor_parallel > 1)."""
    backend: Backend = Backend.auto
    """torch.distributed backend: auto picks nccl with CUDA, gloo without."""
    distributed_timeout_minutes: float = 120.0
    """Timeout of every process group mopd creates (Megatron-LM's ``--distributed-timeout-minutes``).
    Ranks wait in a collective while rank 0 generates, scores or evaluates; one 70B opd step with
    12k-token rollouts takes minutes, so torch's 10-minute default would abort healthy jobs."""

    def problems(self) -> list[Problem]:
        out = positive(self, "tensor_parallel", "pipeline_parallel", "distributed_timeout_minutes")
        if self.sequence_parallel and self.tensor_parallel == 1:
            out.append(Problem("sequence_parallel", True, "needs tensor_parallel > 1"))
        return out


@dataclass(frozen=True, kw_only=True)
class PrecisionConfig:
    """Parameter/compute dtype and Transformer Engine FP8."""

    dtype: Dtype = Dtype.fp32
    """Compute dtype of the student (bf16 on GPUs; fp32 on CPU tests)."""
    fp8: Fp8Recipe = Fp8Recipe.none
    """FP8 recipe through Transformer Engine; anything but none needs TE and a Hopper+ GPU."""
    fp8_format: Fp8Format = Fp8Format.hybrid
    """e4m3 everywhere, or hybrid (e4m3 forward, e5m2 gradients)."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: amax history length."""
    fp8_param_gather: bool = False
    """Keep FP8 copies of parameters and all-gather them in FP8 (Megatron's fp8_param). Refused:
    the parameters would be TE Float8Tensors, which the HF export, weight sync and teacher copies
    read as plain tensors."""

    def problems(self) -> list[Problem]:
        out = positive(self, "fp8_amax_history_len")
        if self.fp8_param_gather:
            out.append(Problem("fp8_param_gather", True,
                               "not supported: FP8 parameters (TE Float8Tensor) would reach the HF export and weight "
                               "sync undequantised; keep bf16 parameters (FP8 compute still applies)"))
        if self.fp8 != Fp8Recipe.none and self.dtype == Dtype.fp32:
            out.append(Problem("fp8", self.fp8.value, "FP8 runs under bf16 or fp16; set precision.dtype=bf16"))
        return out


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Adam(W) through Megatron's get_megatron_optimizer, with an LR schedule."""

    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the decay schedules."""
    lr_schedule: LrSchedule = LrSchedule.constant
    """Decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many optimizer steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""

    def problems(self) -> list[Problem]:
        out = at_least(self, 0.0, "lr", "min_lr", "weight_decay", "clip_grad", "warmup_steps")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                out.append(Problem(key, getattr(self, key), "must be in [0, 1)"))
        if self.min_lr > self.lr:
            out.append(Problem("min_lr", self.min_lr, f"must not exceed lr={self.lr}"))
        return out


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Batching and length of the student's optimisation."""

    steps: int = 10
    """Optimizer steps."""
    global_batch_size: int = 8
    """Sequences per optimizer step, summed over data-parallel ranks."""
    micro_batch_size: int = 2
    """Sequences per forward/backward pass on one rank."""
    max_seq_len: int = 256
    """Longest prompt + response the student trains on (at most model.max_position_embeddings)."""
    overlong: Overlong = Overlong.truncate
    """A longer rollout: truncate its response (counted in the step's metrics) or refuse (stop the run).
    A prompt that alone reaches max_seq_len is always refused."""
    loss_chunk_tokens: int = 1024
    """Objectives process this many tokens at a time (bounds the extra memory beyond the logits)."""
    recompute: Recompute = Recompute.none
    """Activation recomputation: none, selective (the modules below) or full (whole layers)."""
    recompute_modules: list[str] = field(default_factory=lambda: ["mlp"])
    """Submodules checkpointed under recompute=selective (Megatron's ``recompute_modules``).
    "mlp" by default: with flash attention the attention scores that Korthikanti et al.'s
    "core_attn" recompute drops are never stored, while the SwiGLU MLP holds most of a layer's
    activations."""

    def problems(self) -> list[Problem]:
        out = positive(self, "steps", "global_batch_size", "micro_batch_size", "max_seq_len", "loss_chunk_tokens")
        unknown = sorted(set(self.recompute_modules) - set(RECOMPUTE_MODULES))
        if unknown:
            out.append(Problem("recompute_modules", self.recompute_modules,
                               f"unknown {unknown}; choose from {list(RECOMPUTE_MODULES)}"))
        if self.recompute == Recompute.selective and not self.recompute_modules:
            out.append(Problem("recompute_modules", [], "recompute=selective needs at least one module"))
        return out


@dataclass(frozen=True, kw_only=True)
class FastPathConfig:
    """Megatron-Core's fused kernels and communication overlap. null means "auto": on where this
    machine has what the path needs (CUDA, Transformer Engine, Apex kernels, the layout), as in
    Megatron-LM's recommended H100 settings, and off elsewhere (the CPU). true asks for the path and
    stops the run, naming the key, where it cannot run; false turns it off. Resolved when the model
    is built (mopd.student.hardware.resolve_fast_paths)."""

    gradient_accumulation_fusion: bool | None = None
    """Accumulate weight gradients straight into the fp32 main_grad buffer inside the wgrad GEMM
    (Megatron-LM's default). Needs CUDA and Apex's fused_weight_gradient_mlp_cuda kernel, which
    Megatron's own output layer calls even when Transformer Engine runs the other linears."""
    overlap_grad_reduce: bool | None = None
    """Reduce (or reduce-scatter) gradient buckets during backward instead of after it
    (Megatron-LM's --overlap-grad-reduce). Auto: on with CUDA and more than one data-parallel rank;
    true also runs over gloo (tests)."""
    overlap_param_gather: bool = False
    """Defer the distributed optimizer's parameter all-gather into the next forward
    (--overlap-param-gather). Off, unlike Megatron-LM's H100 setting: an opd step streams the
    weights to the rollout engine right after the optimizer step, before any next forward, and would
    read other ranks' stale shards. mopd refuses true."""
    rope_fusion: bool | None = None
    """Transformer Engine's fused RoPE kernel (Megatron-LM's default; --no-rope-fusion turns it off).
    Needs CUDA and Transformer Engine."""
    tp_comm_overlap: bool = False
    """Overlap tensor-parallel all-gather/reduce-scatter with the GEMMs through TE userbuffers
    (--tp-comm-overlap, off by default in Megatron-LM too). TE allocates those buffers for one fixed
    [seq * micro_batch, hidden] shape, while mopd pads each step only to its longest sequence;
    mopd refuses true."""

    def problems(self) -> list[Problem]:
        out = []
        if self.overlap_param_gather:
            out.append(Problem("overlap_param_gather", True,
                               "not supported: weight sync and checkpoints read the parameters between the optimizer "
                               "step and the next forward, where the deferred all-gather leaves them stale"))
        if self.tp_comm_overlap:
            out.append(Problem("tp_comm_overlap", True,
                               "not supported: TE userbuffers need one fixed micro-batch shape; mopd's steps are "
                               "padded to their longest sequence"))
        return out


@dataclass(frozen=True, kw_only=True)
class StudentConfig:
    """Everything that builds and trains the Megatron student."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fast_paths: FastPathConfig = field(default_factory=FastPathConfig)

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        tp, m = self.parallel.tensor_parallel, self.model
        if m.num_attention_heads % tp:
            out.append(Problem("parallel.tensor_parallel", tp,
                               f"must divide model.num_attention_heads={m.num_attention_heads}"))
        groups = m.num_query_groups or m.num_attention_heads
        if groups % tp:
            out.append(Problem("parallel.tensor_parallel", tp, f"must divide the query groups ({groups})"))
        if m.ffn_hidden_size % tp:
            out.append(Problem("parallel.tensor_parallel", tp, f"must divide model.ffn_hidden_size={m.ffn_hidden_size}"))
        if self.optimizer.warmup_steps >= self.train.steps:
            out.append(Problem("optimizer.warmup_steps", self.optimizer.warmup_steps,
                               f"must be smaller than train.steps={self.train.steps}"))
        if self.train.max_seq_len > m.max_position_embeddings:
            out.append(Problem("train.max_seq_len", self.train.max_seq_len,
                               f"must not exceed model.max_position_embeddings={m.max_position_embeddings}"))
        if m.num_layers % self.parallel.pipeline_parallel:
            out.append(Problem("parallel.pipeline_parallel", self.parallel.pipeline_parallel,
                               f"must divide model.num_layers={m.num_layers}"))
        return out


__all__ = [name for name in dir() if name[0].isupper()] + ["choice_of"]
