"""The trainer's end of SGLang's weight-update process group (``/init_weights_update_group``).

SGLang 0.5.23 builds its end with ``sglang.srt.utils.common.init_custom_process_group``: a TCP
rendezvous at ``master_address:master_port``, a ``PrefixStore(group_name, store)`` and
``_new_process_group_helper``. The trainer must join the same way as rank 0, so this module
reproduces that function (importing it would pull SGLang's CUDA-only modules). The group is
separate from the trainer's default process group and from Megatron's groups.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous


def init_custom_process_group(
    *,
    backend: str,
    init_method: str,
    world_size: int,
    rank: int,
    group_name: str,
    registered_name: str | None = None,
    timeout: timedelta = timedelta(minutes=10),
) -> dist.ProcessGroup:
    """Join a standalone process group exactly as SGLang's server ranks do.

    ``group_name`` prefixes the store keys (it must equal the name sent to the servers);
    ``registered_name`` is the name torch registers the group under in this process (defaults to
    ``group_name``; a test that hosts both ends in one process passes distinct names).
    """
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        PrefixStore(group_name, store),
        group_name=registered_name or group_name,
        backend_options=None,
        timeout=timeout,
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def broadcast_tensors(tensors: list[torch.Tensor], group: dist.ProcessGroup, device: torch.device) -> None:
    """Broadcast each tensor from group rank 0, in order (the servers post matching receives)."""
    for t in tensors:
        dist.broadcast(t.to(device).contiguous(), group=group, group_src=0)
