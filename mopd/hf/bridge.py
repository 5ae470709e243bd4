"""Optional Megatron-Bridge backend for families the built-in mapping does not cover.

Megatron-Bridge (`pip install megatron-bridge`) converts many more architectures (MoE, rope scaling,
sliding windows) through `AutoBridge`, but `import megatron.bridge` imports Transformer Engine
unconditionally, so it only works on GPU nodes with TE installed. Its checkpoints use Bridge's own
iteration folders and run config; train from them with Bridge-compatible settings.
API used (Megatron-Bridge 0.6): `AutoBridge.can_handle`, `AutoBridge.import_ckpt(hf, megatron_path)`,
`AutoBridge.from_hf_pretrained(hf).export_ckpt(megatron_path, hf_path)`.
"""

from __future__ import annotations

from pathlib import Path

from mopd.errors import CheckpointError

INSTALL_HINT = ("the bridge backend needs Megatron-Bridge: pip install megatron-bridge "
                "(it imports Transformer Engine at import time, so it also needs transformer-engine[pytorch] "
                "and a CUDA GPU node)")


def auto_bridge():
    """The `AutoBridge` class, or a CheckpointError saying how to install it."""
    try:
        from megatron.bridge import AutoBridge
    except (ImportError, OSError, RuntimeError) as exc:  # TE raises OSError/RuntimeError without CUDA
        raise CheckpointError(f"{INSTALL_HINT} (import failed: {type(exc).__name__}: {exc})") from None
    return AutoBridge


def import_with_bridge(hf_dir: str | Path, megatron_dir: str | Path, *, tp: int = 1, pp: int = 1) -> None:
    """HF checkpoint -> Megatron checkpoint through AutoBridge (any family it supports).

    `tp`/`pp` are not passed on: Bridge saves a torch_dist checkpoint that reshards at load time.
    Not run on the development machines (no Transformer Engine there); only the error path is tested.
    """
    bridge_cls = auto_bridge()
    out = Path(megatron_dir)
    if out.exists():
        raise CheckpointError(f"output folder {out} already exists; remove it or choose another")
    if not bridge_cls.can_handle(str(hf_dir)):
        raise CheckpointError(f"Megatron-Bridge cannot convert the model in {hf_dir}")
    bridge_cls.import_ckpt(str(hf_dir), str(out))


def export_with_bridge(megatron_dir: str | Path, hf_dir: str | Path, *, hf_reference: str | None) -> None:
    """Megatron checkpoint written by Bridge -> HF folder; `hf_reference` names the HF architecture/config."""
    bridge_cls = auto_bridge()
    if hf_reference is None:
        raise CheckpointError("--backend bridge export needs --hf-reference (the HF model id or folder it came from)")
    if Path(hf_dir).exists():
        raise CheckpointError(f"output folder {hf_dir} already exists; remove it or choose another")
    bridge_cls.from_hf_pretrained(hf_reference).export_ckpt(str(megatron_dir), str(hf_dir))


__all__ = ["INSTALL_HINT", "auto_bridge", "export_with_bridge", "import_with_bridge"]
