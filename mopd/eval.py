"""Eval metrics as pure functions: per-domain greedy accuracy, sampled pass@k and epistemic markers.

Input is a flat list of ``EvalSample``s, greedy and sampled responses alike, each tagged with its prompt
and domain. Per domain:

- greedy accuracy: mean verifier reward of the one greedy response per prompt;
- pass@k: mean over prompts of the unbiased estimator ``1 - C(n-c, k) / C(n, k)`` from the prompt's ``n``
  sampled responses of which ``c`` are correct (Chen et al. 2021); pass@1 is the mean of ``c / n``;
- markers: mean count per response of each epistemic marker ("wait", "hmm", ...), over all responses.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from mopd.data.synthetic import domain_verifier
from mopd.data.verifiers import Verifier
from mopd.types import Rollout

DEFAULT_MARKERS: tuple[str, ...] = ("wait", "hmm", "let me check", "actually", "double-check")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of ``k`` responses drawn without replacement from ``n`` (``c``
    correct) is correct: ``1 - C(n-c, k) / C(n, k)``, computed as a product to stay exact for large n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def _marker_pattern(marker: str) -> re.Pattern[str]:
    words = r"\s+".join(re.escape(w) for w in marker.split())
    return re.compile(rf"(?<!\w){words}(?!\w)", re.IGNORECASE)


def epistemic_marker_counts(text: str, markers: Sequence[str] = DEFAULT_MARKERS) -> tuple[int, ...]:
    """Whole-word, case-insensitive occurrences of each marker in ``text``, in ``markers`` order.

    ``"Wait... hmm, wait."`` -> ``(2, 1, 0, 0, 0)`` with the default markers; "awaited" is no "wait".
    """
    return tuple(len(_marker_pattern(m).findall(text)) for m in markers)


@dataclass(frozen=True, slots=True)
class EvalSample:
    prompt_index: int
    domain: str
    response: str
    """Decoded response text (special tokens removed)."""
    reference: str | None
    greedy: bool
    """True for the greedy (temperature 0) response, False for a sampled one."""

    @staticmethod
    def from_rollout(rollout: Rollout, greedy: bool) -> EvalSample:
        return EvalSample(rollout.prompt_index, rollout.domain, rollout.text, rollout.reference, greedy)


@dataclass(frozen=True, slots=True)
class DomainResult:
    domain: str
    num_prompts: int
    greedy_accuracy: float | None
    """None when no greedy responses were given."""
    samples_per_prompt: int
    """Fewest sampled responses of any prompt (0 when only greedy responses were given)."""
    pass_at: dict[int, float] = field(default_factory=dict)
    """k -> pass@k over sampled responses (always includes 1 when there are samples)."""
    markers: dict[str, float] = field(default_factory=dict)
    """Marker -> mean occurrences per response."""


@dataclass(frozen=True, slots=True)
class EvalResult:
    domains: tuple[DomainResult, ...]

    def domain(self, name: str) -> DomainResult:
        for d in self.domains:
            if d.domain == name:
                return d
        raise KeyError(f"no eval result for domain {name!r}; domains: {[d.domain for d in self.domains]}")

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat metrics for the logger: ``eval/<domain>/greedy_accuracy``, ``eval/<domain>/pass@k``,
        ``eval/<domain>/markers/<marker>`` (spaces as underscores), ``eval/<domain>/num_prompts``, and the
        unweighted mean over domains of accuracy and pass@k as ``eval/mean/...``."""
        out: dict[str, float] = {}
        greedy = [d.greedy_accuracy for d in self.domains if d.greedy_accuracy is not None]
        if greedy:
            out[f"{prefix}/mean/greedy_accuracy"] = sum(greedy) / len(greedy)
        for k in sorted({k for d in self.domains for k in d.pass_at}):
            values = [d.pass_at[k] for d in self.domains if k in d.pass_at]
            out[f"{prefix}/mean/pass@{k}"] = sum(values) / len(values)
        for d in self.domains:
            key = f"{prefix}/{d.domain}"
            out[f"{key}/num_prompts"] = float(d.num_prompts)
            if d.greedy_accuracy is not None:
                out[f"{key}/greedy_accuracy"] = d.greedy_accuracy
            out.update({f"{key}/pass@{k}": v for k, v in d.pass_at.items()})
            out.update({f"{key}/markers/{m.replace(' ', '_')}": v for m, v in d.markers.items()})
        return out


def _reward(sample: EvalSample, verifier: Verifier) -> float:
    if sample.reference is None:
        raise ValueError(f"eval: prompt {sample.prompt_index} of domain {sample.domain!r} has no reference answer")
    return verifier(sample.response, sample.reference)


def _domain_result(domain: str, samples: list[EvalSample], verifier: Verifier, ks: Sequence[int],
                   markers: Sequence[str]) -> DomainResult:
    greedy: dict[int, float] = {}
    sampled: dict[int, list[float]] = defaultdict(list)
    for s in samples:
        if s.greedy:
            if s.prompt_index in greedy:
                raise ValueError(f"eval: prompt {s.prompt_index} of domain {domain!r} has two greedy responses")
            greedy[s.prompt_index] = _reward(s, verifier)
        else:
            sampled[s.prompt_index].append(_reward(s, verifier))
    pass_at: dict[int, float] = {}
    if sampled:
        for k in sorted({1, *ks}):
            short = [i for i, r in sampled.items() if len(r) < k]
            if short:
                raise ValueError(f"eval: pass@{k} needs {k} samples per prompt; domain {domain!r} prompt {short[0]} "
                                 f"has {len(sampled[short[0]])}")
            pass_at[k] = sum(pass_at_k(len(r), int(sum(r)), k) for r in sampled.values()) / len(sampled)
    counts = [epistemic_marker_counts(s.response, markers) for s in samples]
    return DomainResult(
        domain=domain,
        num_prompts=len(set(greedy) | set(sampled)),
        greedy_accuracy=sum(greedy.values()) / len(greedy) if greedy else None,
        samples_per_prompt=min((len(r) for r in sampled.values()), default=0),
        pass_at=pass_at,
        markers={m: sum(c[j] for c in counts) / len(counts) for j, m in enumerate(markers)},
    )


def evaluate(samples: Iterable[EvalSample], ks: Sequence[int] = (1,),
             verifier_for: Callable[[str], Verifier] = domain_verifier,
             markers: Sequence[str] = DEFAULT_MARKERS) -> EvalResult:
    """Per-domain results (domains in order of first appearance); ``verifier_for(domain)`` picks the
    verifier (default: the synthetic domain's own, exact match for any other domain)."""
    by_domain: dict[str, list[EvalSample]] = defaultdict(list)
    for s in samples:
        by_domain[s.domain].append(s)
    return EvalResult(tuple(_domain_result(d, ss, verifier_for(d), ks, markers) for d, ss in by_domain.items()))
