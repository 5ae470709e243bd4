"""The opd loop's weight sync: an SGLang rollout engine fed by one sender per pipeline stage.

An SGLang engine syncing over NCCL (``rollout.sglang.weight_sync: distributed``) is a staged
consumer (``WeightSync(staged=...)``): rank 0's engine opens and closes each update session and sends
stage 0 over its own group; the first rank of every later stage gets its own client to the same
servers, with the same keys and its own group (``stage_group_name``), and sends its stage's layers,
one stage after the other. So a 70B student's 140 GB leave from pp senders, not through rank 0.

Everything else is an in-process consumer on rank 0, and receives every tensor there, as a
consumer living in rank 0's process must: the embedded engine, an SGLang engine syncing from disk
(rank 0 writes the folder), and EMA self-teachers (which also make rank 0 gather the whole model).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from mopd.config import ModelConfig, SGLangConfig
from mopd.rollout.sglang_client import ApiKeys, SGLangEngine, WeightSyncOptions
from mopd.sync.student import WeightSync


def stage_group_name(base: str, stage: int) -> str:
    """The weight-update group of pipeline stage ``stage``: the engine's own name for stage 0
    (the group its first sync created), ``<base>-stage<p>`` for the others."""
    return base if stage == 0 else f"{base}-stage{stage}"


@dataclass(frozen=True)
class StageSenderSpec:
    """What a stage source needs to reach rank 0's servers: picklable, sent once at start-up."""

    config: SGLangConfig
    name: str
    worker_urls: tuple[str, ...]
    sync: WeightSyncOptions
    keys: ApiKeys
    """The engine's SGLang keys (sent over the job's own process group, never printed)."""

    @classmethod
    def of(cls, engine: SGLangEngine) -> StageSenderSpec:
        return cls(engine.config, engine.name, tuple(engine.worker_urls), engine.sync, engine.keys)

    def sender(self, stage: int) -> SGLangEngine:
        """Stage ``stage``'s client. Its group's TCP store listens on this rank's host: the servers
        reach it at this host's name (rank 0's address, from ``master_address`` or
        ``rollout.sglang.weight_sync_address``, only if it is loopback: a one-machine job), on a free
        port, or on ``master_port + stage`` when rank 0's port is fixed."""
        port = self.sync.master_port + stage if self.sync.master_port else 0
        sync = replace(self.sync, group_name=stage_group_name(self.sync.group_name, stage),
                       master_address=_if_loopback(self.sync.master_address), master_port=port)
        config = replace(self.config, weight_sync_address=_if_loopback(self.config.weight_sync_address))
        return SGLangEngine(config, name=f"{self.name}-stage{stage}", endpoints=list(self.worker_urls),
                            worker_urls=list(self.worker_urls), keys=self.keys, sync=sync)


def rollout_weight_sync(chunks: list[torch.nn.Module], model_cfg: ModelConfig, layout, consumers: Sequence,
                        engine, **options) -> WeightSync:
    """The WeightSync of an opd stage. Collective. ``consumers`` (rank 0): everything that follows
    the student, ``engine`` among them; ``engine`` is fed stage by stage when it is an SGLang
    engine syncing over NCCL, the rest in process on rank 0. ``options`` go to WeightSync."""
    staged_engine = isinstance(engine, SGLangEngine) and engine.config.weight_sync == "distributed"
    spec = _from_rank0(StageSenderSpec.of(engine) if layout.rank == 0 and staged_engine else None)
    if spec is None:
        return WeightSync(chunks, model_cfg, layout, consumers, **options)
    staged, owned = [], []
    if layout.rank == 0:
        staged = [engine]
    elif layout.tp_rank == 0 and layout.dp_rank == 0:
        staged = owned = [spec.sender(layout.pp_rank)]
    in_process = [c for c in consumers if c is not engine]
    return WeightSync(chunks, model_cfg, layout, in_process, staged=staged, owned=owned, **options)


def _from_rank0(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _if_loopback(address: str) -> str:
    """``address`` if it names this machine's loopback (valid on every rank of a one-machine job),
    else "": rank 0's address is not another node's."""
    if address == "localhost":
        return address
    try:
        return address if ipaddress.ip_address(address).is_loopback else ""
    except ValueError:
        return ""


__all__ = ["StageSenderSpec", "rollout_weight_sync", "stage_group_name"]
