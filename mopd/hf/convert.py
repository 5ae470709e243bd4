"""Import an HF checkpoint into a Megatron-Core dist_checkpointing checkpoint, and export it back.

Both drivers stream. Import hands Megatron's `dist_checkpointing.save` a sharded state dict whose
data lives on the meta device and computes each tensor chunk from the HF safetensors only when
PyTorch DCP asks to write it (`_LazySavePlanner.resolve_data`), one DCP file per chunk, so nothing
is held after it is written. Export loads one tensor group (one layer) at a time with Megatron's own
`dist_checkpointing.load` and appends it to pre-planned safetensors shards.

Peak memory: a small multiple (about 2x for import, 4x for export: file read buffer, loaded tensor,
HF-layout copy) of the largest tensor group in the checkpoint dtype -- the embedding or one layer's
fused QKV / gate-up projection -- and independent of the number of layers. Measured by
`tests/test_hf_memory.py` on a 384 MiB fp32 Llama (largest tensor: the 32 MiB embedding): +61 MiB
RSS for import, +113 MiB for export.

Outputs appear atomically: everything is written to a hidden sibling folder that is renamed to the
target only at the very end, and removed if anything fails.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mopd.config import ModelConfig, ParallelConfig, StudentConfig, TrainConfig, build_config
from mopd.errors import CheckpointError, ConfigError
from mopd.hf import families, mapping
from mopd.hf.folder import atomic_dir
from mopd.hf.layout import meta_sharded_state_dict, single_process_megatron
from mopd.hf.stream import HFReader, ShardedSafetensorsWriter, TensorSpec

MODEL_YAML = "mopd_model.yaml"
HF_CONFIG_COPY = "hf_config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp", ".h5", ".msgpack")
_NOT_ASSETS = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json",
               "metadata.json", ".metadata", MODEL_YAML, HF_CONFIG_COPY, "common.pt", "mopd_checkpoint.json"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def import_hf(hf_dir: str | Path, megatron_dir: str | Path, *, tp: int = 1, pp: int = 1) -> ModelConfig:
    """HF safetensors checkpoint -> Megatron dist_checkpointing (torch_dist) checkpoint in `megatron_dir`.

    Writes the weights in the HF dtype, `mopd_model.yaml` (the `student.model` section), the original
    config.json as `hf_config.json`, and the tokenizer / generation files next to them. `tp` and `pp`
    pick the vocabulary padding and are checked against the model (heads, query groups, layers); the
    checkpoint loads at any TP/PP.
    """
    hf_dir, out = Path(hf_dir), Path(megatron_dir)
    hf_config = families.read_hf_config(hf_dir)
    cfg = families.model_config_from_hf(hf_config)
    check_layout(cfg, tp, pp)
    reader = HFReader(hf_dir)
    _check_hf_tensors(reader, cfg)
    dtype = reader.dtype(mapping.global_rules(cfg)[0].hf[0])
    padded = mapping.padded_vocab_size(cfg, tp)
    with atomic_dir(out) as tmp, single_process_megatron():
        _save_lazily(reader, cfg, padded, dtype, tmp)
        _copy_assets(hf_dir, tmp)
        (tmp / HF_CONFIG_COPY).write_text(json.dumps(hf_config, indent=2) + "\n")
        write_model_yaml(cfg, tmp / MODEL_YAML)
        _write_weights_marker(tmp, tp, pp)
    return cfg


def export_hf(megatron_dir: str | Path, hf_dir: str | Path, *, model_cfg: ModelConfig | None = None,
              dtype: torch.dtype | None = None, assets_from: str | Path | None = None,
              max_shard_bytes: int = 5 * 2**30) -> None:
    """Megatron dist_checkpointing checkpoint -> HF folder loadable by AutoModelForCausalLM.

    `model_cfg` defaults to the checkpoint's `mopd_model.yaml`; `dtype` to the dtype the checkpoint
    holds. Tokenizer / generation files and the extra config.json fields (token ids ...) come from
    next to the checkpoint (what import put there) or, for a training checkpoint, from the HF folder
    `assets_from`. Writes safetensors shards (+ index when more than one), config.json and
    generation_config.json.
    """
    src, out = Path(megatron_dir), Path(hf_dir)
    if not (src / "metadata.json").is_file():
        raise CheckpointError(f"{src} is not a Megatron dist_checkpointing checkpoint (no metadata.json)")
    cfg = model_cfg or read_model_yaml(src / MODEL_YAML)
    assets = Path(assets_from) if assets_from is not None else src
    old_config = _read_json(assets / HF_CONFIG_COPY) or _read_json(assets / "config.json")
    with atomic_dir(out) as tmp, single_process_megatron():
        dtype = dtype or _checkpoint_dtype(src)
        specs = [TensorSpec(name, shape, dtype) for name, shape in mapping.expected_hf_shapes(cfg).items()]
        writer = ShardedSafetensorsWriter(tmp, specs, max_shard_bytes=max_shard_bytes)
        for name, tensor in mapping.megatron_to_hf(_load_groups(src, cfg, dtype), cfg):
            writer.write(name, tensor.to(dtype))
        writer.close()
        _copy_assets(assets, tmp)
        dtype_name = next(k for k, v in _DTYPES.items() if v == dtype)
        config = families.hf_config_from_model(cfg, dtype=dtype_name, extra=old_config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if not (tmp / "generation_config.json").exists():
            gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def check_layout(cfg: ModelConfig, tp: int, pp: int) -> None:
    """Refuse a TP/PP the model cannot be split into, naming the field (ConfigError)."""
    build_config(StudentConfig, {"model": _plain(cfg), "parallel": _plain(ParallelConfig(tensor_parallel=tp,
                                                                                       pipeline_parallel=pp)),
                                 "train": _fitting_train(cfg.max_position_embeddings)})


def write_model_yaml(cfg: ModelConfig, path: Path) -> None:
    """`student: {model: ...}`: the section a run config includes to train from this checkpoint."""
    path.write_text(OmegaConf.to_yaml(OmegaConf.create({"student": {"model": _plain(cfg)}})))


def read_model_yaml(path: Path) -> ModelConfig:
    """The ModelConfig stored by `write_model_yaml`."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass the model config explicitly (--model-config)")
    node = OmegaConf.load(path)
    section = OmegaConf.select(node, "student.model")
    if section is None:
        raise ConfigError(f"{path} has no student.model section")
    max_positions = section.get("max_position_embeddings", None)
    train = _fitting_train(max_positions) if max_positions is not None else {}
    return build_config(StudentConfig, {"model": section, "train": train}).model


def _fitting_train(max_position_embeddings: int) -> dict:
    """A train section the model can hold: a checkpoint carries no run settings, and the default
    max_seq_len (256) would be refused for a model with fewer positions."""
    return {"max_seq_len": min(TrainConfig().max_seq_len, int(max_position_embeddings))}


# Fields that do not change what a checkpoint computes (init_method_std only draws random weights).
_NOT_COMPARED = {"init_method_std"}
_ROPE_SCALING_FIELDS = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                        "rope_original_max_position_embeddings")


def check_checkpoint_model(folder: Path, model: ModelConfig, *, key: str) -> None:
    """Refuse to start `model` from `folder` when the folder's mopd_model.yaml describes another model.

    Names the first differing field, both values and the file (ConfigError); a folder without the file
    (a training checkpoint) is left to the load itself, which checks every tensor's shape.
    """
    path = Path(folder) / MODEL_YAML
    if not path.is_file():
        return
    saved = read_model_yaml(path)
    skip = _NOT_COMPARED | (set(_ROPE_SCALING_FIELDS) if saved.rope_scaling == model.rope_scaling
                            and model.rope_scaling.value == "none" else set())
    for f in dataclasses.fields(ModelConfig):
        ours, theirs = getattr(model, f.name), getattr(saved, f.name)
        if f.name not in skip and ours != theirs:
            raise ConfigError(f"{key}={str(folder)!r}: student.model.{f.name}={_shown(ours)} but the checkpoint's "
                              f"{path} says {f.name}: {_shown(theirs)}; make student.model equal the checkpoint's "
                              f"(e.g. `include: {path}` in the run config)")


def _shown(value) -> str:
    return repr(value.value if hasattr(value, "value") else value)


def _check_hf_tensors(reader: HFReader, cfg: ModelConfig) -> None:
    """Every tensor the config implies is present with the right shape, and nothing else is."""
    expected = mapping.expected_hf_shapes(cfg)
    present = set(reader.names())
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    extra = sorted(n for n in present - set(expected) - ignorable if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise CheckpointError(f"HF checkpoint {reader.root} has {len(extra)} tensor(s) the {cfg.family.value} "
                              f"mapping does not know, e.g. {extra[0]!r}")
    missing = [n for n in expected if n not in present]
    if missing:
        raise CheckpointError(f"HF checkpoint {reader.root} is missing tensor {missing[0]!r} "
                              f"({len(missing)} missing in total)")
    for name, shape in expected.items():
        actual = reader.shape(name)
        if actual != shape:
            raise CheckpointError(f"HF tensor {name!r} has shape {actual}, but config.json implies {shape} "
                                  f"(hidden_size={cfg.hidden_size}, heads={cfg.num_attention_heads}, "
                                  f"kv_heads={cfg.num_query_groups}, head_dim={cfg.head_dim}, "
                                  f"intermediate_size={cfg.ffn_hidden_size}, vocab_size={cfg.vocab_size})")


def _save_lazily(reader: HFReader, cfg: ModelConfig, padded: int, dtype: torch.dtype, out: Path) -> None:
    from megatron.core import dist_checkpointing

    from mopd.hf.lazy_save import LazyTorchDistSaveStrategy, TensorSource

    sharded = meta_sharded_state_dict(cfg, padded, dtype)
    rules = {rule.megatron: rule for rule in mapping.all_rules(cfg)}

    def produce(module_name: str) -> torch.Tensor:
        rule = rules[module_name]
        return mapping.to_megatron(rule, [reader.get(n) for n in rule.hf], cfg, padded)

    strategy = LazyTorchDistSaveStrategy(TensorSource(sharded, produce))
    dist_checkpointing.save(sharded, str(out), sharded_strategy=strategy)


def _write_weights_marker(folder: Path, tp: int, pp: int) -> None:
    """The marker mopd.student.checkpoint.load_model_weights requires of a complete weights-only folder."""
    from mopd.student.checkpoint import MARKER

    marker = {"step": None, "kind": "weights", "layout": {"tp": tp, "pp": pp, "dp": 1}, "source": "hf_import"}
    (folder / MARKER).write_text(json.dumps(marker))


def _load_groups(src: Path, cfg: ModelConfig, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron module name, full tensor) in mapping order, loading one layer's tensors per call."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    padded = mapping.padded_vocab_size(cfg, 1)
    sharded = meta_sharded_state_dict(cfg, padded, dtype)
    glob = mapping.global_rules(cfg)
    groups = [glob[:1]] + [mapping.layer_rules(cfg, i) for i in range(cfg.num_layers)] + [glob[1:]]
    for group in groups:
        request = {rule.megatron: _chunk_request(sharded, rule.megatron) for rule in group}
        try:
            loaded = dist_checkpointing.load(request, str(src), validate_access_integrity=False)
        except (Exception, CheckpointException) as exc:  # DCP wraps errors in a BaseException
            cause = next(iter(exc.failures.values()))[0] if isinstance(exc, CheckpointException) else exc
            raise CheckpointError(f"cannot read {[r.megatron for r in group]} from {src}: "
                                  f"{type(cause).__name__}: {cause}") from None
        for rule in group:
            parts = [part.reshape(part.shape[1:]) if part.dim() > 1 and part.shape[0] == 1 and rule.layer is not None
                     else part for part in loaded[rule.megatron]]
            yield rule.megatron, torch.cat(parts) if len(parts) > 1 else parts[0]
        del loaded, request


def _chunk_request(sharded: dict, name: str) -> list:
    """Empty CPU ShardedTensors covering one module tensor (linear_fc1: its gate and up halves).

    The stacked layer axis becomes an ordinary axis of size 1 at offset `layer`: Megatron's
    prepended-axis path requires one process to request every layer of a key, which would defeat
    loading one layer at a time; DCP reads the overlapping region either way.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    item = sharded.get(name)
    if isinstance(item, ShardedTensorFactory):
        item = item.build()
    items = item if isinstance(item, list) else [item]
    if not items or not all(isinstance(sh, ShardedTensor) for sh in items):
        raise CheckpointError(f"Megatron model has no tensor {name!r}")
    out = []
    for sh in items:
        shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        out.append(dataclasses.replace(sh, data=torch.empty(shape, dtype=sh.dtype), local_shape=shape,
                                       prepend_axis_num=0))
    return out


def _checkpoint_dtype(src: Path) -> torch.dtype:
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(src))
    key = "embedding.word_embeddings.weight"
    if key not in meta:
        raise CheckpointError(f"{src} holds no {key!r}; is it a GPT model checkpoint?")
    return meta[key].dtype


def _copy_assets(src: Path, dst: Path) -> None:
    """Tokenizer, chat template and generation files: everything that is neither weights nor configs."""
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name not in _NOT_ASSETS and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, dst / path.name)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _plain(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


__all__ = ["check_checkpoint_model", "check_layout", "export_hf", "import_hf", "read_model_yaml", "write_model_yaml"]
