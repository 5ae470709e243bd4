"""No config option is inert: every field of every config dataclass is read by the code it configures.

The scan looks for an attribute read (``.field``) or a string key (``"field"``, ``'field'``) of each
field name in ``mopd/`` outside ``mopd/config`` (a field's own ``problems()`` check does not count).
A name shared with something else (``dir``, ``path``, ``seed``) can hide a dead field from this scan,
so those were checked by hand when this test was written; the scan catches the common case, a new
option added to a dataclass and wired to nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_MODULES = ("mopd.config.distill", "mopd.config.model", "mopd.config.run")

ALLOWED = {
    # Read through a helper inside mopd/config: padded_vocab_size (mopd/config/model.py), which the
    # student builder, the HF converter and the loss all call.
    "ModelConfig.make_vocab_size_divisible_by",
    # Refused when set: the field exists so that a Megatron-LM user's setting stops the run with a
    # reason (its problems() check) instead of being an unknown key; nothing reads a refused value.
    "PrecisionConfig.fp8_param_gather",
    "FastPathConfig.overlap_param_gather",
    "FastPathConfig.tp_comm_overlap",
}


def config_fields() -> list[tuple[str, str]]:
    out = []
    for module_name in CONFIG_MODULES:
        module = importlib.import_module(module_name)
        for name, cls in inspect.getmembers(module, dataclasses.is_dataclass):
            if cls.__module__ == module_name:
                out += [(name, f.name) for f in dataclasses.fields(cls)]
    return out


def code_outside_config() -> str:
    files = [p for p in (ROOT / "mopd").rglob("*.py") if "config" not in p.relative_to(ROOT / "mopd").parts[:1]]
    return "\n".join(p.read_text() for p in files)


def test_every_config_field_is_read_outside_mopd_config():
    code = code_outside_config()
    dead = [f"{cls}.{name}" for cls, name in config_fields()
            if f"{cls}.{name}" not in ALLOWED
            and not re.search(rf"\.{name}\b|[\"']{name}[\"']", code)]
    assert dead == [], f"config fields read nowhere in mopd/ outside mopd/config (wire them or remove them): {dead}"


def test_the_allow_list_names_real_fields_that_the_scan_would_flag():
    """A stale entry (field removed or now read directly) would hide the next dead field of that name."""
    code = code_outside_config()
    known = {f"{cls}.{name}" for cls, name in config_fields()}
    assert ALLOWED <= known, sorted(ALLOWED - known)
    read = [entry for entry in sorted(ALLOWED)
            if re.search(rf"\.{entry.split('.')[1]}\b|[\"']{entry.split('.')[1]}[\"']", code)]
    assert read == [], f"allow-listed fields that are read directly now (drop them from ALLOWED): {read}"


def test_the_scan_sees_the_fields_of_every_section():
    classes = {cls for cls, _ in config_fields()}
    assert {"RunConfig", "StudentConfig", "TrainConfig", "DataConfig", "EvalConfig", "TeacherConfig",
            "RouterConfig", "SGLangConfig", "CheckpointConfig"} <= classes
