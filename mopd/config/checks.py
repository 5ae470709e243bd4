"""Range and consistency checks for config sections.

Each section dataclass may define ``problems() -> list[Problem]``; keys in a Problem are relative to
that section, and the loader prefixes the section's dotted path. Checks never modify a config:
derived values belong in ``mopd.plan``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One bad value: its key (relative to the section that found it), the value, and what is wrong."""

    key: str
    value: Any
    reason: str


def positive(section: object, *keys: str) -> list[Problem]:
    return [Problem(k, getattr(section, k), "must be > 0") for k in keys if not getattr(section, k) > 0]


def at_least(section: object, low: float, *keys: str) -> list[Problem]:
    return [Problem(k, getattr(section, k), f"must be >= {low}") for k in keys if not getattr(section, k) >= low]


def choice_of(section: object, key: str, choices: list[str] | tuple[str, ...]) -> list[Problem]:
    value = getattr(section, key)
    if value in choices:
        return []
    return [Problem(key, value, f"must be one of {sorted(choices)}")]
