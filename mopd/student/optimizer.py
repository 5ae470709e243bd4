"""Adam(W) through Megatron's ``get_megatron_optimizer`` and its ``OptimizerParamScheduler``.

The scheduler counts optimizer steps: ``scheduler.step(1)`` once per ``train_step``.
"""

from __future__ import annotations

import torch

from mopd.config import Dtype, StudentConfig
from mopd.errors import ConfigError


def build_optimizer(cfg: StudentConfig, model_chunks: list[torch.nn.Module]):
    """``(optimizer, scheduler)`` for the model chunks built by ``build_model``.

    The optimizer is Megatron's (a ``DistributedOptimizer`` sharding fp32 state over data-parallel
    ranks when ``use_distributed_optimizer``); it clips the global gradient norm to ``clip_grad``.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, dtype = cfg.optimizer, cfg.precision.dtype
    if o.warmup_steps >= max(cfg.train.steps, 1) and o.warmup_steps > 0:
        raise ConfigError(
            f"student.optimizer.warmup_steps={o.warmup_steps} must be smaller than student.train.steps={cfg.train.steps}"
        )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            use_distributed_optimizer=o.use_distributed_optimizer,
            bf16=dtype == Dtype.bf16,
            fp16=dtype == Dtype.fp16,
            params_dtype=torch.float32 if dtype == Dtype.fp32 else (torch.bfloat16 if dtype == Dtype.bf16 else torch.float16),
        ),
        model_chunks,
    )
    # fp16 backward scales the loss by the optimizer's dynamic loss scale (Megatron-LM's setup).
    for chunk in model_chunks:
        chunk.config.grad_scale_func = optimizer.scale_loss
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(cfg.train.steps, o.warmup_steps + 1),
        lr_decay_style=o.lr_schedule.value,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(cfg.train.steps, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler
