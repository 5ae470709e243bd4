"""Synthetic domains with programmatic verifiers, for the demo and the tests.

Each domain draws a question from a seeded ``random.Random`` and knows its reference answer. Prompts
read ``"<tag>:<question>="`` and the model answers with the reference followed by ``<eos>``:

=========  ================  ========  ========================================================
domain     prompt            answer    task
=========  ================  ========  ========================================================
reverse    ``rev:abcd=``     ``dcba``  reverse 3-8 lowercase letters
caesar     ``rot:abcz=``     ``defc``  shift 3-8 lowercase letters by 3 (a per-character map)
addition   ``add:47+85=``    ``231``   add two zero-padded 2-digit numbers; the 3-digit sum is
                                       written little-endian (132 -> "231")
addition3  ``add3:347+685=`` ``2301``  the same with 3 digits (slower to learn; see below)
sort       ``srt:dbca=``     ``abcd``  sort 3-6 lowercase letters
=========  ================  ========  ========================================================

Sizes follow the calibration in DESIGN.md §6 and were measured with ``python -m mopd.data.calibrate``
(SFT of a 0.68M-parameter Llama, loss on answer tokens only, batch 128, AdamW lr 1e-3, one CPU thread,
seed 0; greedy exact match on 200 eval prompts, CPU seconds of the training steps only):

- reverse: 0.85 greedy accuracy after 200 steps (38 s), 0.97 after 300 (57 s);
- caesar: 0.61 after 200 (41 s), 0.985 after 300 (61 s);
- addition: 0.66 after 300 (39 s), 1.00 after 500 (66 s) (6000 train prompts);
- sort: 0.83 after 200 (33 s), 0.96 after 700 (112 s);
- addition3: 0.00 after 400 (66 s), 0.41 after 700 (114 s), 0.99 after 900 (148 s).

3-digit addition sits on a loss plateau (~1.4) for ~400 steps before it takes off, hence the 2-digit
default: fixed-width operands put every digit at a fixed position and, little-endian, each answer digit
depends on one column and its carry.

Splits are disjoint by construction: whether a prompt belongs to ``train`` or ``eval`` is a hash of
its domain and text, independent of the seed, so no seed's eval prompt is ever any seed's train prompt.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

from mopd.data.verifiers import Verifier, get_verifier
from mopd.errors import DataError

SPLITS = ("train", "eval")
EVAL_ONE_IN = 5
"""One candidate prompt in ``EVAL_ONE_IN`` (by hash) belongs to the eval split."""


class PiMode(str, Enum):
    """What a PI self-teacher is shown in front of the prompt."""

    answer = "answer"
    """The reference answer: ``"answer: dcba"``."""
    hint = "hint"
    """The first half of the reference answer: ``"hint: dc"``."""
    none = "none"
    """Nothing (``Prompt.pi`` is None)."""


@dataclass(frozen=True, slots=True)
class Example:
    domain: str
    prompt: str
    """The full prompt text, e.g. ``"rev:abcd="``."""
    reference: str
    """The answer the verifier accepts, e.g. ``"dcba"``."""

    def pi(self, mode: PiMode) -> str | None:
        """The privileged information for ``mode`` (see ``PiMode``)."""
        if mode is PiMode.answer:
            return f"answer: {self.reference}"
        if mode is PiMode.hint:
            return f"hint: {self.reference[: max(1, len(self.reference) // 2)]}"
        return None


@dataclass(frozen=True)
class Domain:
    name: str
    tag: str
    """Prompt prefix before the colon."""
    verifier_name: str
    """Key in ``mopd.data.verifiers.VERIFIERS``."""
    draw: Callable[[random.Random], tuple[str, str]]
    """``rng -> (question, reference)``."""

    @property
    def verifier(self) -> Verifier:
        return get_verifier(self.verifier_name)

    def example(self, rng: random.Random) -> Example:
        question, reference = self.draw(rng)
        return Example(domain=self.name, prompt=f"{self.tag}:{question}=", reference=reference)


def _letters(rng: random.Random, shortest: int, longest: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(shortest, longest)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = _letters(rng, 3, 8)
    return word, word[::-1]


def _caesar(rng: random.Random, shift: int = 3) -> tuple[str, str]:
    word = _letters(rng, 3, 8)
    shifted = "".join(chr((ord(c) - ord("a") + shift) % 26 + ord("a")) for c in word)
    return word, shifted


def _sort(rng: random.Random) -> tuple[str, str]:
    word = _letters(rng, 3, 6)
    return word, "".join(sorted(word))


def _addition(digits: int) -> Callable[[random.Random], tuple[str, str]]:
    def draw(rng: random.Random) -> tuple[str, str]:
        a, b = rng.randrange(10**digits), rng.randrange(10**digits)
        # Fixed width on both sides: operands zero-padded, sum padded to digits+1, then reversed.
        return f"{a:0{digits}d}+{b:0{digits}d}", f"{a + b:0{digits + 1}d}"[::-1]

    return draw


DOMAINS: dict[str, Domain] = {}


def register_domain(domain: Domain) -> Domain:
    """Add a domain to the registry; a second domain with the same name or tag is refused."""
    clash = [d.name for d in DOMAINS.values() if d.name == domain.name or d.tag == domain.tag]
    if clash:
        raise DataError(f"domain {domain.name!r} (tag {domain.tag!r}) clashes with registered {clash}")
    DOMAINS[domain.name] = domain
    return domain


for _d in (
    Domain("reverse", "rev", "exact", _reverse),
    Domain("caesar", "rot", "exact", _caesar),
    Domain("addition", "add", "integer_le", _addition(2)),
    Domain("addition3", "add3", "integer_le", _addition(3)),
    Domain("sort", "srt", "exact", _sort),
):
    register_domain(_d)


def get_domain(name: str) -> Domain:
    """The registered domain ``name``; an unknown name raises DataError listing the valid ones."""
    try:
        return DOMAINS[name]
    except KeyError:
        raise DataError(f"unknown synthetic domain {name!r}; valid domains: {sorted(DOMAINS)}") from None


def split_of(domain: str, prompt: str) -> str:
    """``"eval"`` for one prompt in ``EVAL_ONE_IN`` (a stable hash of domain and text), else ``"train"``."""
    digest = hashlib.blake2b(f"{domain}\0{prompt}".encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "little") % EVAL_ONE_IN == 0 else "train"


def generate(domain: str, num: int, split: str = "train", seed: int = 0) -> list[Example]:
    """``num`` distinct examples of ``domain`` from ``split``, the same list for the same arguments."""
    if split not in SPLITS:
        raise DataError(f"synthetic split {split!r} is not one of {list(SPLITS)}")
    spec = get_domain(domain)
    # A string seed is hashed with SHA-512 by random.Random: stable across processes and Python runs.
    rng = random.Random(f"mopd/{seed}/{domain}/{split}")
    seen: set[str] = set()
    out: list[Example] = []
    max_draws = 50 * num + 1000
    for _ in range(max_draws):
        if len(out) == num:
            break
        ex = spec.example(rng)
        if ex.prompt not in seen and split_of(domain, ex.prompt) == split:
            seen.add(ex.prompt)
            out.append(ex)
    if len(out) < num:
        raise DataError(
            f"synthetic domain {domain!r}: found only {len(out)} distinct {split} prompts in {max_draws} draws "
            f"(asked for {num}); lower data.num_prompts"
        )
    return out


def domain_verifier(domain: str, default: str = "exact", named: Mapping[str, str] | None = None) -> Verifier:
    """The verifier of a registered synthetic domain, else the one ``named`` for the domain
    (``data.verifiers``, for JSONL/HF data), else the ``default`` verifier."""
    spec = DOMAINS.get(domain)
    if spec is not None:
        return spec.verifier
    return get_verifier((named or {}).get(domain, default))
