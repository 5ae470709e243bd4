"""A torch_dist save strategy whose tensors are computed when PyTorch DCP writes them.

Megatron's own strategy stages every tensor before writing (fine for a model that is already in
memory, not for a 70B import on one host). This one keeps Megatron's key handling
(`_replace_state_dict_keys_with_sharded_keys`, `mcore_to_pyt_state_dict`), so the checkpoint is the
same format, and swaps the writer for DCP's `FileSystemWriter` with one file per chunk, which pulls
chunks one at a time through `planner.resolve_data`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from mopd.errors import CheckpointError


class TensorSource:
    """Maps each DCP chunk (sharded key, global offset) of a TP=1/PP=1 sharded state dict to the module
    tensor it is a slice of, and produces it on demand.

    `produce(module_name)` returns the full Megatron tensor of one module parameter; the last one is
    cached because linear_fc1's gate and up halves are two chunks of the same tensor.
    """

    def __init__(self, sharded_state_dict: dict, produce: Callable[[str], torch.Tensor]):
        self.produce = produce
        self._where: dict[tuple[str, tuple[int, ...]], tuple[str, ShardedTensor]] = {}
        self._cached: tuple[str, torch.Tensor] | None = None
        for name, item in list(sharded_state_dict.items()):
            if isinstance(item, ShardedTensorFactory):
                item = sharded_state_dict[name] = item.build()  # the SwiGLU split, as save would apply it
            for sh in item if isinstance(item, list) else [item]:
                if isinstance(sh, ShardedTensor):
                    self._where[(sh.key, tuple(sh.global_offset))] = (name, sh)

    def chunk(self, key: str, offset: tuple[int, ...]) -> torch.Tensor:
        """The chunk of `key` at global `offset` (prepended layer axis included)."""
        if (key, offset) not in self._where:
            raise CheckpointError(f"no source for checkpoint chunk {key!r} at offset {offset}")
        name, sh = self._where[(key, offset)]
        if self._cached is None or self._cached[0] != name:
            self._cached = None  # drop the previous group before producing the next
            self._cached = (name, self.produce(name))
        full = self._cached[1]
        # at TP=1 the unprepended global offset is the offset inside the module tensor
        inner = sh.global_offset[sh.prepend_axis_num:]
        index = tuple(slice(o, o + n) for o, n in zip(inner, sh.local_shape))
        part = full[index]
        if tuple(part.shape) != tuple(sh.local_shape):
            raise CheckpointError(f"{name}: produced shape {tuple(full.shape)} does not hold chunk "
                                  f"{tuple(sh.local_shape)} at {tuple(inner)}")
        return part.reshape((1,) * sh.prepend_axis_num + tuple(sh.local_shape)).to(sh.dtype).contiguous()


class _LazySavePlanner(MCoreSavePlanner):
    def __init__(self, source: TensorSource, **kwargs):
        super().__init__(**kwargs)
        self.source = source

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return self.source.chunk(write_item.index.fqn, tuple(write_item.index.offset))


class LazyTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """`dist_checkpointing.save(..., sharded_strategy=LazyTorchDistSaveStrategy(source))` for meta-device
    state dicts; single process (world size 1)."""

    def __init__(self, source: TensorSource):
        super().__init__("torch_dist", 1)
        self.source = source

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        sharded, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded, False)
        writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=False, thread_count=1)
        planner = _LazySavePlanner(self.source, dedup_replicated_tensors=False, flatten_state_dict=False,
                                   flatten_sharded_tensors=False)
        try:
            dcp.save(pyt_state_dict, storage_writer=writer, planner=planner)
        except CheckpointException as exc:
            # a BaseException wrapping the real error (a bad tensor, a full disk): surface that one
            (original, _trace), *_ = exc.failures.values()
            raise original from None


__all__ = ["LazyTorchDistSaveStrategy", "TensorSource"]
