"""The parallel layout: a pure plan from config and world size, and Megatron's initialisation.

Megatron orders ranks "tp-cp-ep-dp-pp": the tensor-parallel rank varies fastest, the pipeline
stage slowest. With tp=2, pp=2, dp=2 (world 8) stage 0 holds ranks 0-3 and stage 1 ranks 4-7;
rank ``r`` has ``tp_rank = r % tp``, ``dp_rank = (r // tp) % dp``, ``pp_rank = r // (tp * dp)``.
"""

from __future__ import annotations

import datetime
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from mopd.config import Backend, ParallelConfig
from mopd.errors import ConfigError
from mopd.parallel import cpu_compat


@dataclass(frozen=True, slots=True)
class LayoutPlan:
    """Sizes and rank placement of a layout, computed without torch.distributed."""

    tp: int
    pp: int
    dp: int
    world_size: int
    ranks_per_stage: tuple[tuple[int, ...], ...]
    """``ranks_per_stage[s]`` are the global ranks of pipeline stage ``s``, in increasing order."""

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, pp_rank, dp_rank) of a global rank in Megatron's order."""
        return rank % self.tp, rank // (self.tp * self.dp), (rank // self.tp) % self.dp


def plan_layout(cfg: ParallelConfig, world_size: int) -> LayoutPlan:
    """tp/pp/dp and the ranks of each pipeline stage; raises ConfigError when tp*pp does not divide."""
    tp, pp = cfg.tensor_parallel, cfg.pipeline_parallel
    for key, value in (("tensor_parallel", tp), ("pipeline_parallel", pp)):
        if value < 1:
            raise ConfigError(f"student.parallel.{key}: must be >= 1, got {value}")
    if world_size < 1 or world_size % (tp * pp):
        raise ConfigError(
            f"student.parallel.tensor_parallel={tp} x student.parallel.pipeline_parallel={pp} = {tp * pp} "
            f"does not divide the world size {world_size}; choose sizes whose product divides it"
        )
    dp = world_size // (tp * pp)
    per_stage = tp * dp
    stages = tuple(tuple(range(s * per_stage, (s + 1) * per_stage)) for s in range(pp))
    return LayoutPlan(tp=tp, pp=pp, dp=dp, world_size=world_size, ranks_per_stage=stages)


@dataclass(frozen=True, eq=False)
class ParallelLayout:
    """This rank's place in the initialised layout, with the process groups the student uses."""

    tp: int
    pp: int
    dp: int
    world_size: int
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    is_first_stage: bool
    is_last_stage: bool
    ranks_per_stage: tuple[tuple[int, ...], ...]
    device: torch.device
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    mp_group: dist.ProcessGroup
    """Tensor x pipeline group of this data-parallel replica."""
    pgs: object
    """Megatron's ``ProcessGroupCollection`` of the same groups (for APIs that take one)."""
    control_group: dist.ProcessGroup | None = None
    """A gloo group of every rank, for control data and for waiting on rank 0 (generation,
    scoring, evaluation): a wait there holds no NCCL communicator and is bounded only by
    ``student.parallel.distributed_timeout_minutes``. None for layouts built by hand."""

    @property
    def plan(self) -> LayoutPlan:
        return LayoutPlan(self.tp, self.pp, self.dp, self.world_size, self.ranks_per_stage)


def _backend(cfg: ParallelConfig, use_cuda: bool) -> str:
    if cfg.backend == Backend.auto:
        return "nccl" if use_cuda else "gloo"
    if cfg.backend == Backend.nccl and not use_cuda:
        raise ConfigError("student.parallel.backend: nccl needs a CUDA device and none is available; use gloo or auto")
    return cfg.backend.value


FORCE_CPU_ENV = "MOPD_FORCE_CPU"
"""Set to 1 to run the student on the CPU over gloo even where CUDA devices are visible (the CPU
test tiers on a GPU node). Hides the devices (CUDA_VISIBLE_DEVICES="") before CUDA starts."""


def local_device_index(env: Mapping[str, str]) -> int:
    """This process's GPU on its node: torchrun's LOCAL_RANK, else Slurm's SLURM_LOCALID (plain
    ``srun`` launching one task per GPU), else 0."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = env.get(key, "")
        if value.strip():
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"environment {key}={value!r}: must be an integer GPU index") from None
    return 0


def hide_cuda_if_forced(env: dict[str, str] | os._Environ) -> bool:
    """With MOPD_FORCE_CPU=1, set CUDA_VISIBLE_DEVICES="" (CUDA reads it when it initialises, so call
    this before anything touches torch.cuda: the CLI does it first). Returns whether CPU is forced."""
    if env.get(FORCE_CPU_ENV, "0").strip() in ("", "0"):
        return False
    env["CUDA_VISIBLE_DEVICES"] = ""
    return True


def use_cuda(env: dict[str, str] | os._Environ, cuda_available: Callable[[], bool]) -> bool:
    """Whether the student runs on CUDA. With MOPD_FORCE_CPU=1 the devices are hidden first (which
    works while CUDA is not yet initialised in this process) and a process that still sees one is
    refused, never half-forced: Megatron would mix CUDA and CPU tensors."""
    if hide_cuda_if_forced(env):
        if cuda_available():
            raise ConfigError(
                f"{FORCE_CPU_ENV}=1 but CUDA was initialised in this process before mopd could hide the devices; "
                "set CUDA_VISIBLE_DEVICES= in the environment before Python starts"
            )
        return False
    return cuda_available()


def _init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"torch.distributed is not initialised and the environment lacks {missing}; "
            "launch with torchrun (or set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
        )
    dist.init_process_group(backend=backend, timeout=timeout)


def seed_rngs(seed: int, pp_rank: int) -> None:
    """Python, NumPy, torch and Megatron's tracker RNGs from ``seed + 100 * pp_rank`` (Megatron-LM's rule).
    The pipeline seeds them again before each stage, so a stage draws the same random weights whatever
    ran before it in the process (a resumed run, or a run with other stages first)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    stage_seed = seed + 100 * pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed, force_reset_rng=True)


def init_parallel(cfg: ParallelConfig, *, seed: int) -> ParallelLayout:
    """Initialise torch.distributed (if needed), Megatron's model parallel state and the RNGs.

    Activates ``cpu_compat`` when no CUDA device is used (none visible, or MOPD_FORCE_CPU=1). Every
    process group gets ``cfg.distributed_timeout_minutes``. Seeds follow Megatron-LM: the default
    generators get ``seed + 100 * pp_rank``; the TP-rank-specific tracker states derive from it.
    """
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    cuda = use_cuda(os.environ, torch.cuda.is_available)
    backend = _backend(cfg, cuda)
    if cuda:
        torch.cuda.set_device(local_device_index(os.environ))
    else:
        cpu_compat.activate()
    timeout = datetime.timedelta(minutes=cfg.distributed_timeout_minutes)
    if not dist.is_initialized():
        _init_process_group(backend, timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    plan = plan_layout(cfg, world)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_parallel, pipeline_model_parallel_size=cfg.pipeline_parallel,
        distributed_timeout_minutes=max(1, round(cfg.distributed_timeout_minutes)),
    )
    control = dist.new_group(backend="gloo", timeout=timeout) if world > 1 else None
    tp_rank, pp_rank, dp_rank = plan.coordinates(rank)
    seed_rngs(seed, pp_rank)
    return ParallelLayout(
        tp=plan.tp, pp=plan.pp, dp=plan.dp, world_size=world, rank=rank,
        tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank,
        is_first_stage=pp_rank == 0, is_last_stage=pp_rank == plan.pp - 1,
        ranks_per_stage=plan.ranks_per_stage,
        device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        mp_group=parallel_state.get_model_parallel_group(),
        pgs=ProcessGroupCollection.use_mpu_process_groups(),
        control_group=control,
    )


def destroy_parallel(*, process_group: bool = False) -> None:
    """Tear down Megatron's model parallel state (and the default process group if asked)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if process_group and dist.is_initialized():
        dist.destroy_process_group()
