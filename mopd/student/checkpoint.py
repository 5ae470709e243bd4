"""Training checkpoints with Megatron ``dist_checkpointing`` (torch_dist), loadable at another TP/PP.

A checkpoint folder holds the model's and the optimizer's sharded tensors (the distributed
optimizer's state in the ``fully_reshardable`` format, so it reshards with the model), plus common
state saved once: the scheduler, the step, the caller's ``extra`` (data position ...), the layout it
was saved at, and a ``mopd_checkpoint.json`` marker. Every rank's RNG states are a ShardedObject
keyed by (pp, tp) and are restored only at the layout they were saved at.

Atomicity: everything is written to a hidden sibling ``.<name>.tmp`` which rank 0 renames to
``<name>`` after all ranks finished; a crash mid-save leaves earlier checkpoints untouched and no
folder that ``latest_checkpoint`` would pick.

Entry scripts need an ``if __name__ == "__main__":`` guard: the torch_dist writer starts a spawn
multiprocessing manager that re-imports the main module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mopd.errors import CheckpointError

_log = logging.getLogger(__name__)
MARKER = "mopd_checkpoint.json"
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module: DDP's own sharded_state_dict prefixes "module."."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk


def _model_sharded(model_chunks: list[torch.nn.Module]) -> dict:
    return {_model_key(i, len(model_chunks)): _unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _rng_device_type() -> str:
    """Where the student's device RNGs live: "cpu" while cpu_compat stands in for CUDA."""
    from mopd.parallel import cpu_compat

    return "cpu" if cpu_compat.is_active() or not torch.cuda.is_available() else "cuda"


def _rng_state() -> dict:
    """This rank's RNG states: python, numpy, torch's CPU generator, and the device-side ones (the
    CUDA generator and Megatron's tracker) tagged with the device type they belong to."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    device_type = _rng_device_type()
    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states(), "device_type": device_type}
    if device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _rng_object():
    """This rank's ``_rng_state`` as a ShardedObject keyed by (pp, tp)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    pp, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size())
    return ShardedObject("rng_state", _rng_state(), shape, (pp, tp), replica_id=ps.get_data_parallel_rank())


def _restore_rng(state: dict, device_type: str | None = None) -> bool:
    """Restore ``state``; returns whether the device-side states were restored too.

    The host generators (python, numpy, torch CPU) mean the same on any machine. The tracker's
    states are CUDA Philox states (16 bytes) on a GPU and CPU mt19937 states (5056 bytes) under
    cpu_compat; one kind fed to the other's ``set_rng_state`` fails or is meaningless. So a
    checkpoint saved on the other device type keeps this run's freshly seeded device RNGs, and
    says so. (Checkpoints from before the tag: "cuda" in the state means saved on a GPU.)
    """
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    device_type = device_type or _rng_device_type()
    saved_on = state.get("device_type", "cuda" if "cuda" in state else "cpu")
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if saved_on != device_type:
        _log.warning("checkpoint RNG states were saved on %s and this run is on %s: the host RNGs are restored, "
                     "the device RNGs (dropout/init streams) keep this run's seeding", saved_on, device_type)
        return False
    if device_type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    return True


def _atomic_save(state: dict, path: Path, marker: dict) -> None:
    from megatron.core import dist_checkpointing

    tmp = path.parent / f".{path.name}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / MARKER).write_text(json.dumps(marker))
        if path.exists():
            # Re-saving the same step: drop the old copy only once the new one is complete.
            old = path.parent / f".{path.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    dist.barrier()


def save_checkpoint(path: str | Path, model_chunks: list[torch.nn.Module], optimizer, scheduler, *,
                    step: int, extra: dict) -> Path:
    """Save model, optimizer, scheduler, RNG, ``step`` and ``extra`` (plain picklable values) to ``path``."""
    path = Path(path)
    model_sd = _model_sharded(model_chunks)
    state = {**model_sd, "rng_state": _rng_object(), "step": step, "extra": extra, "layout": _layout()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=_OPTIM_METADATA)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    _atomic_save(state, path, {"step": step, "kind": "train", "layout": _layout()})
    return path


def save_model_weights(path: str | Path, model_chunks: list[torch.nn.Module]) -> Path:
    """Model weights only (for the HF converter and frozen teachers); loadable at any TP/PP."""
    path = Path(path)
    _atomic_save(_model_sharded(model_chunks), path, {"step": None, "kind": "weights", "layout": _layout()})
    return path


def _check_folder(path: Path) -> None:
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete mopd checkpoint (no {MARKER}); "
                              "it may be missing or an interrupted save")


def _load(path: Path, request: dict) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    try:
        return dist_checkpointing.load(request, str(path))
    except CheckpointingException as e:
        raise CheckpointError(f"{path}: the checkpoint does not match the model: {e}") from e


def _load_model(model_chunks: list[torch.nn.Module], state: dict) -> None:
    for i, chunk in enumerate(model_chunks):
        _unwrap(chunk).load_state_dict(state[_model_key(i, len(model_chunks))], strict=True)


def load_checkpoint(path: str | Path, model_chunks: list[torch.nn.Module], optimizer=None, scheduler=None) -> dict:
    """Restore what ``save_checkpoint`` wrote into existing objects; returns ``extra`` plus ``step``.

    The model (and optimizer) may be built at a different TP/PP than the checkpoint's; RNG states
    are then left as initialised. Pass the optimizer here or build it after loading: a
    mixed-precision optimizer built before keeps stale fp32 main weights otherwise.
    """
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    path = Path(path)
    _check_folder(path)
    common = load_common_state_dict(str(path))
    same_layout = common.get("layout") == _layout()
    model_sd = _model_sharded(model_chunks)
    request = dict(model_sd)
    if optimizer is not None:
        if not _has_optimizer(path):
            raise CheckpointError(f"{path} holds no optimizer state (saved with save_model_weights?)")
        _ensure_optimizer_state(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_OPTIM_METADATA)
    if same_layout:
        request["rng_state"] = _rng_object()
    state = _load(path, request)
    _load_model(model_chunks, state)
    if optimizer is not None:
        with _torch_adam_step_skipped():
            optimizer.load_state_dict(state["optimizer"])
        _unshare_adam_steps(optimizer)
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if same_layout:
        _restore_rng(state["rng_state"])
    return {**state.get("extra", {}), "step": state.get("step")}


def _ensure_optimizer_state(optimizer) -> None:
    """Give a never-stepped distributed optimizer its Adam state tensors, which loading fills in place.

    Without Apex/TE (torch's Adam) ``DistributedOptimizer.state_dict`` needs a step count per
    parameter. Megatron's own initialiser takes one Adam step on zero gradients; learning rate and
    weight decay are zeroed around it so the weights do not move.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or inner.state or not hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            continue
        saved = [(g["lr"], g["weight_decay"]) for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
        opt._init_optimizer_states_with_dummy_values()
        for g, (lr, wd) in zip(inner.param_groups, saved):
            g["lr"], g["weight_decay"] = lr, wd


@contextlib.contextmanager
def _torch_adam_step_skipped():
    """Megatron 0.19.2 restores per-parameter optimizer state by copying every tensor the live state
    holds; torch's Adam (used without Apex/TE, e.g. on CPU) also holds a ``step`` tensor, which the
    checkpoint restores from the param groups instead, so the copy fails with KeyError 'step'. For
    the duration of the load, a missing ``step`` reads as "nothing to copy" (the method skips None)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def tolerant(self, model_param, tensors):
        return original(self, model_param, {"step": None, **tensors})

    DistributedOptimizer._set_main_param_and_optimizer_states = tolerant
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original


def _unshare_adam_steps(optimizer) -> None:
    """Megatron 0.19.2 gives every parameter of torch's Adam the SAME ``step`` tensor on load; Adam
    increments each parameter's step in place, so a shared one advances once per parameter per step
    and the bias correction goes wrong from the first resumed step. Give each parameter its own."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for param_state in getattr(inner, "state", {}).values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()


def _has_optimizer(path: Path) -> bool:
    marker = json.loads((path / MARKER).read_text())
    return marker.get("kind") == "train"


def load_model_weights(path: str | Path, model_chunks: list[torch.nn.Module]) -> None:
    """Load only the model weights from a training checkpoint or ``save_model_weights`` output."""
    path = Path(path)
    _check_folder(path)
    _load_model(model_chunks, _load(path, _model_sharded(model_chunks)))


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``directory`` (None if there is none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for child in directory.iterdir():
        if child.name.startswith(".") or not (child / MARKER).is_file():
            continue
        step = json.loads((child / MARKER).read_text()).get("step")
        if step is not None and (best is None or step > best[0]):
            best = (step, child)
    return best[1] if best else None
