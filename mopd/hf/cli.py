"""`convert_hf.py import|export`: the command line of the HF <-> Megatron converter.

    python tools/convert_hf.py import --hf-dir HF --megatron-dir OUT [--tp N] [--pp N] [--backend bridge]
    python tools/convert_hf.py export --megatron-dir IN --hf-dir OUT [--model-config YAML] [--dtype bf16]
                                      [--assets-from HF_DIR]
    python tools/convert_hf.py from-gguf --gguf FILE --hf-dir OUT [--dtype bf16]

All three write to a hidden sibling folder and rename it at the end; an existing OUT is never touched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mopd.errors import MopdError
from mopd.library_noise import drop_megatron_log_noise, quiet_library_warnings

_DTYPES = ("fp32", "bf16", "fp16")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_hf.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF safetensors -> Megatron dist_checkpointing (torch_dist)")
    imp.add_argument("--hf-dir", type=Path, required=True)
    imp.add_argument("--megatron-dir", type=Path, required=True)
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size the vocabulary is padded for")
    imp.add_argument("--pp", type=int, default=1, help="pipeline size to check the layer count against")
    imp.add_argument("--backend", choices=("builtin", "bridge"), default="builtin",
                     help="builtin: Llama/Qwen2/Qwen3/Mistral mapping; bridge: Megatron-Bridge AutoBridge")
    exp = sub.add_parser("export", help="Megatron dist_checkpointing -> HF safetensors")
    exp.add_argument("--megatron-dir", type=Path, required=True)
    exp.add_argument("--hf-dir", type=Path, required=True)
    exp.add_argument("--model-config", type=Path, default=None,
                     help="YAML with student.model (default: MEGATRON_DIR/mopd_model.yaml)")
    exp.add_argument("--dtype", choices=_DTYPES, default=None, help="output dtype (default: the checkpoint's)")
    exp.add_argument("--assets-from", type=Path, default=None,
                     help="HF folder to take tokenizer files and config extras from (for training checkpoints)")
    exp.add_argument("--max-shard-gb", type=float, default=5.0)
    exp.add_argument("--backend", choices=("builtin", "bridge"), default="builtin")
    exp.add_argument("--hf-reference", default=None,
                     help="bridge backend only: HF model id or folder whose config the export follows")
    gguf = sub.add_parser("from-gguf", help="GGUF file (any quantisation) -> dequantised HF safetensors folder")
    gguf.add_argument("--gguf", type=Path, required=True, help="the .gguf file")
    gguf.add_argument("--hf-dir", type=Path, required=True)
    gguf.add_argument("--dtype", choices=_DTYPES, default="bf16", help="dtype of the written weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_library_warnings()
    drop_megatron_log_noise()
    args = _parser().parse_args(argv)
    try:
        {"import": _import, "export": _export, "from-gguf": _from_gguf}[args.command](args)
    except MopdError as exc:
        print(f"convert_hf.py {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


def _import(args: argparse.Namespace) -> None:
    if args.backend == "bridge":
        from mopd.hf.bridge import import_with_bridge

        import_with_bridge(args.hf_dir, args.megatron_dir, tp=args.tp, pp=args.pp)
    else:
        from mopd.hf.convert import import_hf

        cfg = import_hf(args.hf_dir, args.megatron_dir, tp=args.tp, pp=args.pp)
        print(f"imported {cfg.family.value} ({cfg.num_layers} layers, hidden {cfg.hidden_size}) "
              f"into {args.megatron_dir}")


def _export(args: argparse.Namespace) -> None:
    if args.backend == "bridge":
        from mopd.hf.bridge import export_with_bridge

        export_with_bridge(args.megatron_dir, args.hf_dir, hf_reference=args.hf_reference)
        return
    import torch

    from mopd.hf.convert import export_hf, read_model_yaml

    cfg = read_model_yaml(args.model_config) if args.model_config else None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    export_hf(args.megatron_dir, args.hf_dir, model_cfg=cfg, dtype=dtype, assets_from=args.assets_from,
              max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"exported {args.megatron_dir} to {args.hf_dir}")


def _from_gguf(args: argparse.Namespace) -> None:
    from mopd.hf.gguf import gguf_to_hf

    gguf_to_hf(args.gguf, args.hf_dir, dtype=args.dtype)
    print(f"dequantised {args.gguf} into {args.hf_dir}")


__all__ = ["main"]
