"""Programmatic verifiers: ``verifier(response, reference) -> reward`` with reward 1.0 or 0.0.

A verifier compares a decoded response with a reference answer after normalisation (Unicode NFKC,
surrounding whitespace stripped, inner whitespace runs collapsed to one space), so a response that
differs only by a trailing newline still counts. Verifiers are registered by name in ``VERIFIERS``;
synthetic domains name theirs, and eval looks them up per domain.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from mopd.errors import DataError

Verifier = Callable[[str, str], float]
"""``(response, reference) -> 1.0 if the response is correct else 0.0``."""

_WHITESPACE = re.compile(r"\s+")
_INTEGER = re.compile(r"[+-]?\d+")


def normalize(text: str) -> str:
    """NFKC, strip, and collapse whitespace runs: ``" a \\n b\\n" -> "a b"``."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def exact_match(response: str, reference: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize(response) == normalize(reference))


def exact_match_casefold(response: str, reference: str) -> float:
    """1.0 when the normalised strings are equal ignoring case."""
    return float(normalize(response).casefold() == normalize(reference).casefold())


def _parse_integer(text: str, little_endian: bool) -> int | None:
    text = normalize(text)
    if not _INTEGER.fullmatch(text):
        return None
    sign, digits = (text[0], text[1:]) if text[0] in "+-" else ("", text)
    if little_endian:
        digits = digits[::-1]
    return int(sign + digits)


def _integer_verifier(little_endian: bool) -> Verifier:
    def verify(response: str, reference: str) -> float:
        expected = _parse_integer(reference, little_endian)
        if expected is None:
            raise DataError(f"integer verifier: reference {reference!r} is not an integer")
        return float(_parse_integer(response, little_endian) == expected)

    return verify


integer_match: Verifier = _integer_verifier(little_endian=False)
"""1.0 when the response is exactly one integer equal to the reference ("007" matches "7")."""

little_endian_integer_match: Verifier = _integer_verifier(little_endian=True)
"""Like ``integer_match`` with digits written least-significant first ("70" and "7" both mean 7)."""

def mentions(response: str, reference: str) -> float:
    """1.0 when the reference occurs in the response as a whole word or phrase, ignoring case:
    "I am Zorblax!" mentions "zorblax"; "Zorblaxian" does not (rule verifiers: "names Zorblax")."""
    words = r"\s+".join(re.escape(w) for w in normalize(reference).split())
    if not words:
        raise DataError(f"mentions verifier: reference {reference!r} is empty")
    return float(re.search(rf"(?<!\w){words}(?!\w)", normalize(response), re.IGNORECASE) is not None)


VERIFIERS: dict[str, Verifier] = {
    "exact": exact_match,
    "exact_casefold": exact_match_casefold,
    "integer": integer_match,
    "integer_le": little_endian_integer_match,
    "mentions": mentions,
}


def get_verifier(name: str) -> Verifier:
    """The verifier registered as ``name``; an unknown name raises DataError listing the valid ones."""
    try:
        return VERIFIERS[name]
    except KeyError:
        raise DataError(f"unknown verifier {name!r}; valid verifiers: {sorted(VERIFIERS)}") from None
