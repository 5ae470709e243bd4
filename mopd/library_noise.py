"""Library notices that say nothing a mopd user can act on, kept off mopd's console (both CLIs and runs).

Warnings: the CPU fallbacks (no Apex/TE on CPU machines) and deprecations inside Megatron/torch code
paths, printed at import or on every step. Log records: Megatron-Core 0.19 logs on every model build
about APIs mopd uses on purpose. Everything else still prints.
"""

from __future__ import annotations

import logging
import warnings

WARNINGS = (
    "Transformer Engine and Apex are not installed", "Apex is not installed", "absl.logging is not installed",
    "full scope is deprecated", "MimoModelConfig is experimental", r"`torch.distributed.\w+` is deprecated",
    "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
    "The argument order of load has been changed",  # torch DCP, about the way Megatron calls it
)
MEGATRON_LOG_RECORDS = ("GPTModel IS DEPRECATED", "full_param_layout not provided", "async save is deprecated")


class _DropMegatronNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in MEGATRON_LOG_RECORDS)


def quiet_library_warnings() -> None:
    """Ignore the WARNINGS (call before the libraries are imported: most warn at import)."""
    for pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"


def drop_megatron_log_noise() -> None:
    """Filter the MEGATRON_LOG_RECORDS out of every root handler (Python's last resort when there is none)."""
    for handler in logging.getLogger().handlers or [logging.lastResort]:
        if not any(isinstance(f, _DropMegatronNoise) for f in handler.filters):
            handler.addFilter(_DropMegatronNoise())


__all__ = ["MEGATRON_LOG_RECORDS", "WARNINGS", "drop_megatron_log_noise", "quiet_library_warnings"]
