"""Full (TP-gathered) Megatron tensors from live model chunks, for weight sync and export.

Every rank of a tensor-parallel group must iterate together (each parameter is one all_gather over
the TP group). Each pipeline stage yields only the layers it holds, under their global layer index;
the caller streams per stage. Memory: one gathered parameter at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


def iter_full_megatron_tensors(chunks: list[torch.nn.Module], *, tp_group=None
                               ) -> Iterator[tuple[str, torch.Tensor]]:
    """`(megatron name with global layer index, full unsharded tensor)` for every parameter of `chunks`.

    `tp_group` defaults to Megatron's tensor-parallel group. Tensors are detached; the vocabulary
    stays padded (mapping.to_hf cuts it).
    """
    if tp_group is None and torch.distributed.is_initialized():
        from megatron.core import parallel_state

        tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
    for chunk in chunks:
        model = unwrap(chunk)
        offsets = _layer_numbers(model)
        for name, param in model.named_parameters():
            yield _global_name(name, offsets), _gather(name, param, tp, tp_group)


def _layer_numbers(model: torch.nn.Module) -> dict[int, int]:
    """local layer index -> global layer index (Megatron's layer_number is 1-based and global)."""
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "layers", [])
    return {j: layer.layer_number - 1 for j, layer in enumerate(layers)}


def _global_name(name: str, offsets: dict[int, int]) -> str:
    match = _LAYER.match(name)
    if not match:
        return name
    return f"decoder.layers.{offsets[int(match.group(1))]}." + name[match.end():]


def _gather(name: str, param: torch.nn.Parameter, tp: int, group) -> torch.Tensor:
    tensor = param.detach()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor
    dim = param.partition_dim
    shards = [torch.empty_like(tensor) for _ in range(tp)]
    torch.distributed.all_gather(shards, tensor.contiguous(), group=group)
    if name.endswith("mlp.linear_fc1.weight"):
        # each rank holds [gate_r; up_r]; the full tensor is [gate_0..gate_n; up_0..up_n]
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


__all__ = ["iter_full_megatron_tensors", "unwrap"]
