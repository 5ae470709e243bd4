"""Which teacher supervises which response token (DESIGN.md §1 step 3).

Per prompt: ``router.rules`` in order (domain tag and/or a regex searched in one metadata value),
then the teachers' ``domains`` (teacher list order), then ``router.default``; a rollout nothing
matches is a TeacherError naming its prompt index and domain and the known domains.

Per token (every candidate teacher has scored every token; ``tokens`` below is over the packed
response tokens of the batch):
- confidence: the teacher with the highest logprob of the sampled token;
- entropy: the teacher with the lowest entropy over its top-K plus the tail bucket,
  ``H = -sum_k p_k log p_k - p_tail log p_tail``;
- mixture: fixed weights from ``router.mixture`` (normalised). The supervising distribution is the
  mixture ``sum_m w_m p_m`` over the union of the teachers' top-K ids, where a teacher's mass outside
  its own top-K counts towards the tail (it is unknown per id), truncated back to the K largest
  entries with the rest in the tail bucket. Its sampled-token logprob is exact:
  ``log sum_m w_m p_m(y)``. For forward KL this gives the same student gradient as the w-weighted sum
  of per-teacher forward KLs (both are ``-sum_v p_mix(v) grad log p_s(v)``), up to the top-K coarsening.
Ties go to the teacher listed first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mopd.config import RouteGranularity, RouteRule, RouterConfig, TeacherConfig, TokenRule
from mopd.errors import TeacherError
from mopd.rollout.scoring import tail_logmass
from mopd.types import Prompt, Rollout, Routing, TeacherScores


@dataclass(frozen=True, slots=True)
class RouteCounts:
    """What the router decided for one batch (or cumulatively), per teacher in ``teachers`` order."""

    teachers: tuple[str, ...]
    tokens: tuple[int, ...]
    """Response tokens whose primary teacher (``Routing.index``) is this teacher."""
    rollouts: tuple[int, ...]
    """Rollouts in which this teacher is the primary teacher of at least one token."""

    def __add__(self, other: RouteCounts) -> RouteCounts:
        return RouteCounts(
            self.teachers,
            tuple(a + b for a, b in zip(self.tokens, other.tokens)),
            tuple(a + b for a, b in zip(self.rollouts, other.rollouts)),
        )

    def metrics(self) -> dict[str, float]:
        """Log-sink keys: ``teacher/<name>/routed_tokens``, ``.../routed_rollouts``, ``.../token_share``."""
        total = max(sum(self.tokens), 1)
        out: dict[str, float] = {}
        for name, tok, roll in zip(self.teachers, self.tokens, self.rollouts):
            out[f"teacher/{name}/routed_tokens"] = float(tok)
            out[f"teacher/{name}/routed_rollouts"] = float(roll)
            out[f"teacher/{name}/token_share"] = tok / total
        return out


def route_counts(routing: Routing, lengths: Sequence[int]) -> RouteCounts:
    """Counts of ``routing`` over rollouts of the given response lengths (in packing order)."""
    m = len(routing.teachers)
    tokens = torch.bincount(routing.index, minlength=m)
    rollouts = torch.zeros(m, dtype=torch.int64)
    for part in torch.split(routing.index, list(lengths)):
        if part.numel():
            rollouts[torch.unique(part)] += 1
    return RouteCounts(routing.teachers, tuple(int(x) for x in tokens), tuple(int(x) for x in rollouts))


class Router:
    """Routing decisions from ``RouterConfig`` and the teachers' configs (their order defines indices)."""

    def __init__(self, config: RouterConfig, teachers: Sequence[TeacherConfig]) -> None:
        self.config = config
        self.teachers = tuple(t.name for t in teachers)
        if not self.teachers:
            raise TeacherError("router: no teachers configured (distill.teachers is empty)")
        self._index = {name: i for i, name in enumerate(self.teachers)}
        self._rules = [self._compile(i, rule) for i, rule in enumerate(config.rules)]
        self._domains: dict[str, int] = {}
        for t in teachers:
            for d in t.domains:
                self._domains.setdefault(d, self._index[t.name])
        self._default = None if config.default is None else self._lookup("router.default", config.default)
        self.mixture = self._mixture_weights() if config.token_rule == TokenRule.mixture else None
        self.totals = RouteCounts(self.teachers, (0,) * len(self.teachers), (0,) * len(self.teachers))
        self.last: RouteCounts | None = None

    @property
    def per_token(self) -> bool:
        return self.config.granularity == RouteGranularity.token

    def candidates(self) -> list[int]:
        """Teachers that score every token under per-token routing (mixture: those with weight > 0)."""
        if self.mixture is not None:
            return [i for i, w in enumerate(self.mixture.tolist()) if w > 0]
        return list(range(len(self.teachers)))

    def route_prompts(self, rollouts: Sequence[Rollout], prompts: Mapping[int, Prompt] | None = None) -> list[int]:
        """Teacher index per rollout. ``prompts`` (by ``prompt_index``) supply metadata for regex rules."""
        return [self._route_one(pos, r, prompts) for pos, r in enumerate(rollouts)]

    def expand(self, per_rollout: Sequence[int], lengths: Sequence[int]) -> Routing:
        """Per-prompt decisions as per-token Routing over the packed response tokens."""
        index = torch.repeat_interleave(torch.tensor(list(per_rollout), dtype=torch.int64),
                                        torch.tensor(list(lengths), dtype=torch.int64))
        return Routing(teachers=self.teachers, index=index, granularity="prompt")

    def route_tokens(self, scores: Mapping[int, TeacherScores]) -> tuple[Routing, TeacherScores]:
        """Per-token routing from each candidate teacher's scores of the same N tokens.

        ``scores`` maps teacher index -> [N, K] scores (all candidates, one K). Returns the Routing and
        the [N, K] scores of the chosen teacher (or of the mixture) at each token.
        """
        cand = sorted(scores)
        missing = [self.teachers[i] for i in self.candidates() if i not in scores]
        if missing:
            raise TeacherError(f"router: per-token routing needs scores from every candidate; missing {missing}")
        parts = [scores[i] for i in cand]
        _same_shape(parts)
        if self.mixture is not None:
            return self._mix(cand, parts)
        sampled = torch.stack([p.sampled_logprob.float() for p in parts])  # [M', N]
        if self.config.token_rule == TokenRule.confidence:
            key = sampled
        else:
            key = -torch.stack([topk_entropy(p) for p in parts])
        choice = torch.argmax(key, dim=0)  # first maximum on ties: the teacher listed first
        index = torch.tensor(cand, dtype=torch.int64)[choice]
        rows = torch.arange(choice.numel())
        merged = TeacherScores(
            topk_ids=torch.stack([p.topk_ids for p in parts])[choice, rows],
            topk_logprobs=torch.stack([p.topk_logprobs.to(logprob_dtype(parts)) for p in parts])[choice, rows],
            sampled_logprob=sampled[choice, rows],
            tail_logmass=torch.stack([p.tail_logmass.float() for p in parts])[choice, rows],
            teacher=routed_label(self.teachers),
        )
        return Routing(teachers=self.teachers, index=index, granularity="token"), merged

    def record(self, routing: Routing, lengths: Sequence[int]) -> RouteCounts:
        """Count one batch's decisions (``last``) and add them to the run's ``totals``."""
        self.last = route_counts(routing, lengths)
        self.totals = self.totals + self.last
        return self.last

    def _route_one(self, pos: int, r: Rollout, prompts: Mapping[int, Prompt] | None) -> int:
        for i, (rule, pattern) in enumerate(self._rules):
            if rule.domain is not None and rule.domain != r.domain:
                continue
            if rule.metadata_key is not None:
                value = self._metadata(i, pos, r, prompts).get(rule.metadata_key)
                if value is None or (pattern is not None and pattern.search(value) is None):
                    continue
            return self._index[rule.teacher]
        if r.domain in self._domains:
            return self._domains[r.domain]
        if self._default is not None:
            return self._default
        raise TeacherError(
            f"router: rollout {pos} (prompt {r.prompt_index}) has domain {r.domain!r}, which no rule or teacher "
            f"covers and router.default is null; known domains: {sorted(self._known_domains())}"
        )

    def _metadata(self, rule_i: int, pos: int, r: Rollout, prompts: Mapping[int, Prompt] | None) -> Mapping[str, str]:
        if prompts is None or r.prompt_index not in prompts:
            raise TeacherError(
                f"router.rules[{rule_i}] matches on metadata, but no Prompt was given for rollout {pos} "
                f"(prompt {r.prompt_index}); pass prompts={{index: Prompt}} to the router"
            )
        return prompts[r.prompt_index].metadata

    def _known_domains(self) -> set[str]:
        return set(self._domains) | {rule.domain for rule in self.config.rules if rule.domain is not None}

    def _compile(self, i: int, rule: RouteRule) -> tuple[RouteRule, re.Pattern[str] | None]:
        self._lookup(f"router.rules[{i}].teacher", rule.teacher)
        if rule.metadata_pattern is not None and rule.metadata_key is None:
            raise TeacherError(f"router.rules[{i}]: metadata_pattern needs metadata_key (which value to search)")
        try:
            pattern = None if rule.metadata_pattern is None else re.compile(rule.metadata_pattern)
        except re.error as exc:
            raise TeacherError(f"router.rules[{i}].metadata_pattern={rule.metadata_pattern!r}: {exc}") from None
        return rule, pattern

    def _lookup(self, key: str, name: str) -> int:
        if name not in self._index:
            raise TeacherError(f"{key}={name!r} is not a teacher; teachers: {list(self.teachers)}")
        return self._index[name]

    def _mixture_weights(self) -> torch.Tensor:
        w = torch.zeros(len(self.teachers), dtype=torch.float64)
        for name, value in self.config.mixture.items():
            if value < 0:
                raise TeacherError(f"router.mixture[{name!r}]={value} must be >= 0")
            w[self._lookup(f"router.mixture[{name!r}]", name)] = value
        if w.sum() <= 0:
            raise TeacherError("router.token_rule=mixture needs router.mixture with a positive weight per teacher")
        return (w / w.sum()).float()

    def _mix(self, cand: list[int], parts: list[TeacherScores]) -> tuple[Routing, TeacherScores]:
        assert self.mixture is not None
        n, k = parts[0].topk_ids.shape
        w = self.mixture[cand]
        merged = mix_topk(parts, w, k, routed_label(self.teachers))
        weights = self.mixture.expand(n, -1).clone()
        index = torch.full((n,), int(torch.argmax(self.mixture)), dtype=torch.int64)
        return Routing(teachers=self.teachers, index=index, weights=weights, granularity="token"), merged


def topk_entropy(scores: TeacherScores) -> torch.Tensor:
    """[N] fp32 entropy over the top-K entries plus the tail bucket (0 log 0 = 0)."""
    lp = scores.topk_logprobs.float()
    tail = scores.tail_logmass.float()
    h = -torch.special.xlogy(lp.exp(), lp.exp()).sum(-1)
    return h - torch.special.xlogy(tail.exp(), tail.exp())


def mix_topk(parts: Sequence[TeacherScores], weights: torch.Tensor, k: int, teacher: str) -> TeacherScores:
    """Top-K + tail of the mixture ``sum_m weights[m] * p_m`` (see the module docstring)."""
    ids = torch.cat([p.topk_ids.to(torch.int64) for p in parts], dim=1)  # [N, M*K]
    mass = torch.cat([w * p.topk_logprobs.float().exp() for w, p in zip(weights.tolist(), parts)], dim=1)
    sorted_ids, order = ids.sort(dim=1)
    mass = mass.gather(1, order)
    # One segment per distinct id in a row: sum the teachers' mass for that id.
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    seg = new.cumsum(1) - 1
    seg_mass = torch.full_like(mass, -1.0).scatter_reduce(1, seg, mass, reduce="sum", include_self=False)
    seg_ids = torch.zeros_like(sorted_ids).scatter(1, seg, sorted_ids)
    top_mass, top_pos = seg_mass.topk(k, dim=1)
    sampled = torch.logsumexp(
        torch.stack([p.sampled_logprob.float() for p in parts]) + weights.float().log()[:, None], dim=0
    )
    return TeacherScores(
        topk_ids=seg_ids.gather(1, top_pos).to(torch.int32),
        topk_logprobs=top_mass.log().to(logprob_dtype(parts)),
        sampled_logprob=sampled,
        tail_logmass=tail_logmass(top_mass.log()),  # floored like the engines' tails: rounding never gives log(0)
        teacher=teacher,
    )


def logprob_dtype(parts: Sequence[TeacherScores]) -> torch.dtype:
    """The dtype that holds every part's top-K logprobs without loss (bf16 + fp16 -> fp32)."""
    dtype = parts[0].topk_logprobs.dtype
    for p in parts[1:]:
        dtype = torch.promote_types(dtype, p.topk_logprobs.dtype)
    return dtype


def _same_shape(parts: Sequence[TeacherScores]) -> None:
    shapes = {(p.teacher, tuple(p.topk_ids.shape)) for p in parts}
    if len({s for _, s in shapes}) != 1:
        raise TeacherError(f"router: per-token routing needs every teacher's scores for the same tokens and K; got {sorted(shapes)}")


def routed_label(teachers: Sequence[str]) -> str:
    return "routed(" + ",".join(teachers) + ")"
