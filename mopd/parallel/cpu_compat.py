"""Run Megatron-Core 0.19.2 on CPU over gloo: GPTModel forward/backward, the pipeline schedules,
DDP, the distributed optimizer, gradient clipping and dist_checkpointing.

Megatron-Core assumes CUDA in about twenty places on these paths (found by running them on a
machine without a GPU). Without CUDA every one of them raises "Found no NVIDIA driver", so each
patch below only replaces behaviour that would otherwise be an error; nothing that already works
on CPU changes. ``activate()`` applies all of them, once per process, and only when
``torch.cuda.is_available()`` is False:

1. Device requests. ``device="cuda"`` in factory calls (the schedules' token counters, the causal
   mask, optimizer scalars), ``tensor.cuda()`` and ``tensor.to("cuda")`` are redirected to the CPU by
   a ``TorchFunctionMode`` entered for the rest of the process (it is thread-local, like
   ``torch.set_default_device``: call Megatron from the thread that activated it).
2. ``torch.cuda.current_device / current_stream / stream / synchronize`` become their ``torch.cpu``
   twins, which PyTorch provides for device-agnostic code (rotary embeddings, the global memory
   buffer, DDP's bucket sync, p2p communication, the checkpoint writer).
3. Type checks. The distributed optimizer, ``Float16OptimizerWithFloat16Params`` and grad clipping
   accept parameters only when ``param.type()`` is ``"torch.cuda.{Float,Half,BFloat16}Tensor"``;
   under the mode ``tensor.type()`` (no arguments) reports a CPU tensor with the ``torch.cuda.``
   prefix so those branches take the same path they take on a GPU.
4. RNG tracker. ``CudaRNGStatesTracker`` keeps named CUDA generator states (dropout inside tensor
   parallel regions, activation recomputation). On CPU the tracked states become CPU generator
   states: ``add`` seeds a fresh ``torch.Generator`` and the module's get/set-state helpers read and
   write the CPU default generator, so ``fork()`` gives reproducible, per-TP-rank dropout. The
   tracker's "CPU RNG state changed within GPU RNG context" warning, true by construction here, is
   filtered out.
5. Adam on CPU. Without Apex or Transformer Engine, Megatron builds ``torch.optim.AdamW`` with
   PyTorch's defaults, which on CPU are the single-tensor loop: about a dozen full passes over the
   parameters, moments and gradients per step. PyTorch ships a fused CPU Adam(W) kernel (one pass,
   same update rule), so every CPU fp32/bf16 Adam Megatron builds is switched to ``fused=True``.
   This is a speed change, not a fallback for an error, and it only runs where 1-4 do (no CUDA).
6. One-rank buffer collectives. With one data-parallel rank the distributed optimizer still
   reduce-scatters the whole gradient buffer and all-gathers the whole parameter buffer onto
   themselves; over gloo each is a full copy of the model (two of the three 134M-element copies
   in a SmolLM2 step). When the group has one rank and the output is the input's own memory the
   collective is the identity, so the synchronous call is skipped (async calls run as before).
"""

from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

_CUDA_TO_CPU = ("current_device", "current_stream", "stream", "synchronize")
_FUSED_ADAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_state: dict[str, object] = {}
"""What ``activate`` replaced (to restore it in ``deactivate``); empty while inactive."""


def _wants_cuda(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer device means a CUDA ordinal.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Redirects CUDA device requests to the CPU and reports CPU ``type()`` strings as CUDA ones."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs and _wants_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _wants_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else "torch.cuda." + name.removeprefix("torch.")
        return func(*args, **(kwargs or {}))


class _DropForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _get_rng_state(device="cuda", clone=False, graph_safe=False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, device=-1, graph_safe=False) -> None:
    torch.set_rng_state(new_state)


def _tracker_add(self, name: str, seed: int) -> None:
    """``CudaRNGStatesTracker.add`` with a CPU generator state (same checks as the original)."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    self.states_[name] = torch.Generator().manual_seed(seed).get_state()


def _fuse_cpu_adam(optimizer) -> None:
    """Turn a torch Adam(W) inside a Megatron optimizer into PyTorch's fused CPU kernel."""
    inner = getattr(optimizer, "optimizer", None)
    if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
        return
    for group in inner.param_groups:
        cpu_float = all(p.device.type == "cpu" and p.dtype in _FUSED_ADAM_DTYPES for p in group["params"])
        if cpu_float and not group.get("differentiable") and not group.get("capturable"):
            group["fused"], group["foreach"] = True, False


def _fused_adam_builder(original):
    def build(*args, **kwargs):
        optimizer = original(*args, **kwargs)
        _fuse_cpu_adam(optimizer)
        return optimizer

    build.__wrapped__ = original
    return build


def _skip_one_rank_self_collective(original):
    """A buffer collective that does nothing when it would copy a one-rank group's tensor onto itself."""

    def call(output, input, *args, **kwargs):
        group, async_op = kwargs.get("group"), kwargs.get("async_op", False)
        if (not async_op and torch.distributed.get_world_size(group) == 1 and output.data_ptr() == input.data_ptr()
                and output.numel() == input.numel() and output.dtype == input.dtype):
            return None
        return original(output, input, *args, **kwargs)

    call.__wrapped__ = original
    return call


_BUFFER_COLLECTIVES = ("dist_reduce_scatter_func", "dist_all_gather_func")


def is_active() -> bool:
    return bool(_state)


def activate() -> bool:
    """Apply the patches if no CUDA device is available; idempotent. Returns whether it is active."""
    if _state or torch.cuda.is_available():
        return bool(_state)
    import megatron.core.optimizer as moptimizer
    from megatron.core.tensor_parallel import random as mrandom

    for name in _CUDA_TO_CPU:
        _state[f"cuda.{name}"] = getattr(torch.cuda, name)
        setattr(torch.cuda, name, getattr(torch.cpu, name))
    for name, new in (("_get_cuda_rng_state", _get_rng_state), ("_set_cuda_rng_state", _set_rng_state)):
        _state[f"random.{name}"] = getattr(mrandom, name)
        setattr(mrandom, name, new)
    _state["tracker.add"] = mrandom.CudaRNGStatesTracker.add
    mrandom.CudaRNGStatesTracker.add = _tracker_add
    _state["optimizer_builder"] = moptimizer._get_megatron_optimizer_based_on_param_groups
    moptimizer._get_megatron_optimizer_based_on_param_groups = _fused_adam_builder(_state["optimizer_builder"])
    from megatron.core.distributed import param_and_grad_buffer as buffers

    for name in _BUFFER_COLLECTIVES:
        _state[f"buffers.{name}"] = getattr(buffers, name)
        setattr(buffers, name, _skip_one_rank_self_collective(_state[f"buffers.{name}"]))
    fork_filter = _DropForkWarning()
    logging.getLogger(mrandom.__name__).addFilter(fork_filter)
    _state["fork_filter"] = fork_filter
    mode = _CudaToCpu()
    mode.__enter__()
    _state["mode"] = mode
    return True


def deactivate() -> None:
    """Undo ``activate`` (tests use it to check both sides; training never needs it)."""
    if not _state:
        return
    from megatron.core.tensor_parallel import random as mrandom

    _state.pop("mode").__exit__(None, None, None)
    logging.getLogger(mrandom.__name__).removeFilter(_state.pop("fork_filter"))
    mrandom.CudaRNGStatesTracker.add = _state.pop("tracker.add")
    import megatron.core.optimizer as moptimizer

    moptimizer._get_megatron_optimizer_based_on_param_groups = _state.pop("optimizer_builder")
    from megatron.core.distributed import param_and_grad_buffer as buffers

    for name in _BUFFER_COLLECTIVES:
        setattr(buffers, name, _state.pop(f"buffers.{name}"))
    for key, original in list(_state.items()):
        owner, name = key.split(".", 1)
        setattr(torch.cuda if owner == "cuda" else mrandom, name, original)
    _state.clear()
