"""Validation of raw prompt records (JSONL lines, HF dataset rows) and the bad-record report.

A record is a JSON object with a prompt (a string or a list of chat messages) or a messages field,
and optional domain, PI and reference fields (names from ``DataConfig``). Anything else is a ``BadRecord`` with its 1-based line (or 0-based row) and a reason.
Loading tolerates up to ``max_bad_fraction`` bad records and then stops with a DataError that names
the file, the count per reason and the first few line numbers of each.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from mopd.errors import DataError

DEFAULT_DOMAIN = "default"
"""Domain of a record without a domain field."""


class BadReason(str, Enum):
    invalid_json = "invalid_json"
    not_an_object = "not_an_object"
    missing_prompt = "missing_prompt"
    wrong_type = "wrong_type"
    unknown_domain = "unknown_domain"
    too_long = "too_long"


@dataclass(frozen=True, slots=True)
class FieldNames:
    """Which keys of a record hold what (``DataConfig.*_field``)."""

    prompt: str = "prompt"
    messages: str = "messages"
    domain: str = "domain"
    pi: str = "pi"
    reference: str = "reference"


@dataclass(frozen=True, slots=True)
class Record:
    """One valid record, before tokenisation."""

    location: int
    """1-based line of a JSONL file, or 0-based row of a dataset."""
    prompt: str
    """The prompt text; for a conversation, the content of its last user message."""
    domain: str
    pi: str | None = None
    reference: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    """The record's other scalar fields, as strings (routing rules can match on them)."""
    messages: tuple[dict[str, str], ...] | None = None
    """``{"role", "content"}`` messages when the record held a conversation (its prompt field as a list,
    TRL's conversational format, or its messages field); rendered with the chat template as a whole."""


@dataclass(frozen=True, slots=True)
class BadRecord:
    location: int
    reason: BadReason
    detail: str


def _optional_text(raw: dict, key: str, location: int, allow_int: bool = False) -> str | None | BadRecord:
    value = raw.get(key)
    if value is None or isinstance(value, str):
        return value
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return BadRecord(location, BadReason.wrong_type, f"field {key!r} is {type(value).__name__}, expected a string")


def _messages(value: list, key: str, location: int) -> tuple[dict[str, str], ...] | BadRecord:
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return BadRecord(location, BadReason.wrong_type,
                             f"{key}[{i}] is not a message with string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        return BadRecord(location, BadReason.missing_prompt, f"conversation {key!r} has no non-empty user message")
    return tuple(out)


def _prompt(raw: dict, fields: FieldNames, location: int) -> tuple[str, tuple[dict[str, str], ...] | None] | BadRecord:
    """``(text, messages)`` from a string prompt, a list of chat messages, or the messages field."""
    key = fields.prompt
    if key not in raw and fields.messages in raw:
        key = fields.messages
        if not isinstance(raw[key], list):
            return BadRecord(location, BadReason.wrong_type,
                             f"field {key!r} is {type(raw[key]).__name__}, expected a list of messages")
    elif key in raw and fields.messages in raw and fields.messages != key:
        return BadRecord(location, BadReason.wrong_type,
                         f"record has both {key!r} and {fields.messages!r}; give one of them")
    prompt = raw.get(key)
    if prompt is None or prompt == [] or (isinstance(prompt, str) and not prompt.strip()):
        return BadRecord(location, BadReason.missing_prompt, f"no non-empty {key!r} field")
    if isinstance(prompt, str):
        return prompt, None
    if not isinstance(prompt, list):
        return BadRecord(location, BadReason.wrong_type,
                         f"field {key!r} is {type(prompt).__name__}, expected a string or a list of messages")
    messages = _messages(prompt, key, location)
    if isinstance(messages, BadRecord):
        return messages
    return next(m["content"] for m in reversed(messages) if m["role"] == "user" and m["content"].strip()), messages


def parse_record(raw: object, location: int, fields: FieldNames, domains: frozenset[str] | None) -> Record | BadRecord:
    """Validate one decoded record; ``domains`` (when set) lists the domains to accept."""
    if not isinstance(raw, dict):
        return BadRecord(location, BadReason.not_an_object, f"record is {type(raw).__name__}, expected an object")
    prompt = _prompt(raw, fields, location)
    if isinstance(prompt, BadRecord):
        return prompt
    text, messages = prompt
    parsed = [_optional_text(raw, fields.domain, location), _optional_text(raw, fields.pi, location, allow_int=True),
              _optional_text(raw, fields.reference, location, allow_int=True)]
    for value in parsed:
        if isinstance(value, BadRecord):
            return value
    domain, pi, reference = parsed
    if domains and (domain or DEFAULT_DOMAIN) not in domains:
        what = f"domain {domain!r}" if domain else f"no {fields.domain!r} field, so domain {DEFAULT_DOMAIN!r},"
        return BadRecord(location, BadReason.unknown_domain, f"{what} is not one of data.domains {sorted(domains)}")
    domain = domain or DEFAULT_DOMAIN
    used = {fields.prompt, fields.messages, fields.domain, fields.pi, fields.reference}
    metadata = {k: str(v) for k, v in raw.items()
                if k not in used and isinstance(v, (str, int, float, bool))}
    return Record(location, text, domain, pi, reference, metadata, messages)


def parse_json_line(line: bytes, location: int, fields: FieldNames,
                    domains: frozenset[str] | None) -> Record | BadRecord:
    """Decode (UTF-8 JSON) and validate one JSONL line."""
    try:
        raw = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return BadRecord(location, BadReason.invalid_json, str(e))
    return parse_record(raw, location, fields, domains)


@dataclass(frozen=True, slots=True)
class RecordReport:
    """What loading one file or dataset found."""

    origin: str
    """The file path or dataset name."""
    unit: str
    """What ``location`` counts: "line" or "row"."""
    total: int
    """Records seen (blank JSONL lines are not records)."""
    bad: tuple[BadRecord, ...]

    @property
    def fraction(self) -> float:
        return len(self.bad) / self.total if self.total else 0.0

    def counts(self) -> dict[BadReason, int]:
        """Bad records per reason, most frequent first."""
        return dict(Counter(b.reason for b in self.bad).most_common())

    def summary(self, max_locations: int = 5) -> str:
        """``"data.jsonl: 3 of 10 records are bad (30.0%): invalid_json 2 (lines 3, 7); ..."``."""
        parts = []
        for reason, count in self.counts().items():
            where = [b.location for b in self.bad if b.reason is reason]
            shown = ", ".join(str(x) for x in where[:max_locations]) + (", ..." if count > max_locations else "")
            parts.append(f"{reason.value} {count} ({self.unit}{'s' if count > 1 else ''} {shown})")
        head = f"{self.origin}: {len(self.bad)} of {self.total} records are bad ({100 * self.fraction:.1f}%)"
        return head + (": " + "; ".join(parts) if parts else "")

    def check(self, max_bad_fraction: float) -> None:
        """Raise DataError when more than ``max_bad_fraction`` of the records (or all of them) are bad."""
        if self.total == len(self.bad):
            raise DataError(f"{self.summary()}; no usable prompts")
        if self.fraction > max_bad_fraction:
            raise DataError(f"{self.summary()}; more than data.max_bad_fraction={max_bad_fraction}")
