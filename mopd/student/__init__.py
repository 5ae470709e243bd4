"""The Megatron-Core student: model, optimizer, train step and checkpoints."""

from mopd.student.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
    save_model_weights,
)
from mopd.student.model import build_model, padded_vocab_size, transformer_config
from mopd.student.optimizer import build_optimizer
from mopd.student.train_step import StepResult, broadcast_micro_batches, train_step

__all__ = [
    "StepResult", "broadcast_micro_batches", "build_model", "build_optimizer", "latest_checkpoint", "load_checkpoint", "load_model_weights",
    "padded_vocab_size", "save_checkpoint", "save_model_weights", "train_step", "transformer_config",
]
