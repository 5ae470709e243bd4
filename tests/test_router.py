"""Router: per-prompt rules, domains and default; per-token confidence, entropy and mixture against
hand-computed values; the recorded counts."""

from __future__ import annotations

import math

import pytest
import torch

from mopd.config import RouteGranularity, RouteRule, RouterConfig, TeacherConfig, TeacherKind, TokenRule
from mopd.errors import TeacherError
from mopd.teachers.router import Router, route_counts, topk_entropy
from mopd.types import Prompt, Rollout, Routing, TeacherScores

TEACHERS = [
    TeacherConfig(name="math", domains=["math", "arith"]),
    TeacherConfig(name="code", domains=["code"]),
    TeacherConfig(name="pi", kind=TeacherKind.self_pi),
]


def rollout(domain: str, index: int, t: int = 2) -> Rollout:
    return Rollout(
        prompt_ids=torch.tensor([1, 5]), response_ids=torch.arange(t) + 4, behaviour_logprobs=torch.zeros(t),
        finish="stop", weight_version=0, domain=domain, prompt_index=index,
    )


def prompt(index: int, domain: str, **metadata: str) -> Prompt:
    return Prompt(index=index, ids=torch.tensor([1, 5]), text="x", domain=domain, metadata=metadata)


def scores(name: str, ids: list[list[int]], probs: list[list[float]], sampled: list[float]) -> TeacherScores:
    p = torch.tensor(probs, dtype=torch.float64)
    return TeacherScores(
        topk_ids=torch.tensor(ids, dtype=torch.int32),
        topk_logprobs=p.log().float(),
        sampled_logprob=torch.tensor(sampled, dtype=torch.float64).log().float(),
        tail_logmass=(1 - p.sum(1)).log().float(),
        teacher=name,
    )


def router(**kw) -> Router:
    return Router(RouterConfig(**kw), TEACHERS)


def test_prompt_routing_applies_rules_in_order_then_teacher_domains_then_default():
    r = router(
        rules=[
            RouteRule(teacher="pi", metadata_key="source", metadata_pattern="^olymp"),
            RouteRule(teacher="code", domain="sql"),
            RouteRule(teacher="pi", domain="sql"),  # shadowed by the rule above
        ],
        default="math",
    )
    rollouts = [rollout("math", 0), rollout("math", 1), rollout("sql", 2), rollout("code", 3), rollout("arith", 4),
                rollout("poetry", 5)]
    prompts = {0: prompt(0, "math", source="olympiad-2019"), 1: prompt(1, "math", source="textbook"),
               2: prompt(2, "sql"), 3: prompt(3, "code"), 4: prompt(4, "arith"), 5: prompt(5, "poetry")}
    got = r.route_prompts(rollouts, prompts)
    assert [r.teachers[i] for i in got] == ["pi", "math", "code", "code", "math", "math"]


def test_prompt_routing_of_an_unknown_domain_without_default_names_the_prompt_and_the_known_domains():
    r = router(rules=[RouteRule(teacher="code", domain="sql")])
    with pytest.raises(TeacherError) as err:
        r.route_prompts([rollout("math", 0), rollout("poetry", 7)])
    msg = str(err.value)
    assert "prompt 7" in msg and "'poetry'" in msg and "['arith', 'code', 'math', 'sql']" in msg


def test_metadata_rules_without_prompts_bad_regex_and_unknown_teachers_are_refused_with_the_key():
    with pytest.raises(TeacherError, match=r"rules\[0\] matches on metadata.*prompt 3"):
        router(rules=[RouteRule(teacher="pi", metadata_key="src", metadata_pattern="a")]).route_prompts(
            [rollout("math", 3)])
    with pytest.raises(TeacherError, match=r"router.rules\[0\].metadata_pattern='\('"):
        router(rules=[RouteRule(teacher="pi", metadata_key="src", metadata_pattern="(")])
    with pytest.raises(TeacherError, match=r"router.rules\[0\].teacher='poet' is not a teacher"):
        router(rules=[RouteRule(teacher="poet", domain="x")])
    with pytest.raises(TeacherError, match=r"router.default='poet'"):
        router(default="poet")


def test_prompt_routing_expands_to_every_response_token_and_counts_tokens_and_rollouts_per_teacher():
    r = router(default="pi")
    rollouts = [rollout("code", 0, t=3), rollout("math", 1, t=2), rollout("x", 2, t=4), rollout("code", 3, t=1)]
    per = r.route_prompts(rollouts)
    routing = r.expand(per, [3, 2, 4, 1])
    assert routing.index.tolist() == [1, 1, 1, 0, 0, 2, 2, 2, 2, 1]
    counts = r.record(routing, [3, 2, 4, 1])
    assert counts.tokens == (2, 4, 4) and counts.rollouts == (1, 2, 1)
    r.record(routing, [3, 2, 4, 1])
    assert r.totals.tokens == (4, 8, 8) and r.totals.rollouts == (2, 4, 2)
    m = counts.metrics()
    assert m["teacher/code/routed_tokens"] == 4.0 and m["teacher/pi/routed_rollouts"] == 1.0
    assert m["teacher/math/token_share"] == pytest.approx(0.2)


def test_token_routing_by_confidence_picks_the_highest_sampled_token_logprob_first_teacher_on_ties():
    r = router(granularity=RouteGranularity.token, token_rule=TokenRule.confidence)
    a = scores("math", [[1, 2]] * 3, [[0.5, 0.3]] * 3, [0.5, 0.2, 0.3])
    b = scores("code", [[3, 4]] * 3, [[0.6, 0.1]] * 3, [0.4, 0.6, 0.3])
    c = scores("pi", [[5, 6]] * 3, [[0.2, 0.1]] * 3, [0.1, 0.1, 0.1])
    routing, merged = r.route_tokens({0: a, 1: b, 2: c})
    assert routing.index.tolist() == [0, 1, 0] and routing.granularity == "token" and routing.weights is None
    assert merged.topk_ids.tolist() == [[1, 2], [3, 4], [1, 2]]
    assert torch.allclose(merged.sampled_logprob, torch.tensor([0.5, 0.6, 0.3]).log())
    assert torch.allclose(merged.tail_logmass, torch.tensor([0.2, 0.3, 0.2]).log())


def test_token_routing_by_entropy_picks_the_lowest_entropy_over_top_k_plus_tail():
    r = router(granularity=RouteGranularity.token, token_rule=TokenRule.entropy)
    probs_a = [[0.5, 0.3], [0.9, 0.05]]
    probs_b = [[0.6, 0.1], [0.4, 0.4]]
    a = scores("math", [[1, 2]] * 2, probs_a, [0.5, 0.5])
    b = scores("code", [[3, 4]] * 2, probs_b, [0.5, 0.5])
    c = scores("pi", [[5, 6]] * 2, [[0.34, 0.33]] * 2, [0.5, 0.5])

    def entropy(p):  # float64, by hand: top-K entries plus the tail bucket
        return -sum(x * math.log(x) for x in [*p, 1 - sum(p)])

    ha, hb = [entropy(p) for p in probs_a], [entropy(p) for p in probs_b]
    assert torch.allclose(topk_entropy(a), torch.tensor(ha, dtype=torch.float32), atol=1e-6)
    expect = [0 if ha[i] < hb[i] else 1 for i in range(2)]
    assert expect == [1, 0]  # the case really distinguishes the two teachers
    routing, merged = r.route_tokens({0: a, 1: b, 2: c})
    assert routing.index.tolist() == expect
    assert merged.topk_ids.tolist() == [[3, 4], [1, 2]]


def test_entropy_of_a_top_k_that_covers_the_vocabulary_ignores_the_empty_tail():
    s = TeacherScores(torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([[0.25, 0.75]]).log(),
                      torch.tensor([0.25]).log(), torch.tensor([-math.inf]), "math")
    expect = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert topk_entropy(s).item() == pytest.approx(expect, rel=1e-6)


def test_token_routing_by_mixture_returns_the_mixture_distribution_truncated_to_k_plus_tail():
    r = router(granularity=RouteGranularity.token, token_rule=TokenRule.mixture, mixture={"math": 3.0, "code": 1.0})
    assert r.candidates() == [0, 1]
    # Token 0: A = {1: .5, 2: .3}, tail .2; B = {2: .4, 3: .2}, tail .4; sampled id 3 (A gives it .05).
    # Mixture .75 A + .25 B: id1 .375, id2 .225 + .1 = .325, id3 .05 -> top-2 [1, 2], tail 1 - .7 = .3.
    # Token 1: A = {7: .6, 8: .1}, B = {9: .7, 7: .2}; sampled id 9 (A: .01).
    # Mixture: id7 .45 + .05 = .5, id9 .175, id8 .075 -> top-2 [7, 9], tail .325.
    a = scores("math", [[1, 2], [7, 8]], [[0.5, 0.3], [0.6, 0.1]], [0.05, 0.01])
    b = scores("code", [[2, 3], [9, 7]], [[0.4, 0.2], [0.7, 0.2]], [0.2, 0.7])
    routing, merged = r.route_tokens({0: a, 1: b})
    assert merged.topk_ids.tolist() == [[1, 2], [7, 9]]
    assert torch.allclose(merged.topk_logprobs.exp(), torch.tensor([[0.375, 0.325], [0.5, 0.175]]), atol=1e-6)
    assert torch.allclose(merged.tail_logmass.exp(), torch.tensor([0.3, 0.325]), atol=1e-6)
    assert torch.allclose(merged.sampled_logprob.exp(), torch.tensor([0.0875, 0.1825]), atol=1e-6)
    assert routing.index.tolist() == [0, 0]
    assert torch.allclose(routing.weights, torch.tensor([[0.75, 0.25, 0.0]] * 2))


def test_mixture_weights_must_name_teachers_and_be_positive():
    with pytest.raises(TeacherError, match=r"router.mixture\['poet'\]"):
        router(granularity=RouteGranularity.token, token_rule=TokenRule.mixture, mixture={"poet": 1.0})
    with pytest.raises(TeacherError, match="positive weight"):
        router(granularity=RouteGranularity.token, token_rule=TokenRule.mixture, mixture={"math": 0.0})


def test_token_routing_refuses_scores_of_different_tokens_or_a_missing_candidate():
    r = router(granularity=RouteGranularity.token)
    a = scores("math", [[1, 2]] * 2, [[0.5, 0.3]] * 2, [0.5, 0.5])
    b = scores("code", [[1, 2]] * 3, [[0.5, 0.3]] * 3, [0.5, 0.5, 0.5])
    c = scores("pi", [[1, 2]] * 2, [[0.5, 0.3]] * 2, [0.5, 0.5])
    with pytest.raises(TeacherError, match="same tokens"):
        r.route_tokens({0: a, 1: b, 2: c})
    with pytest.raises(TeacherError, match=r"missing \['pi'\]"):
        r.route_tokens({0: a, 1: a})


def test_route_counts_count_a_rollout_once_per_teacher_it_uses():
    routing = Routing(teachers=("a", "b"), index=torch.tensor([0, 1, 0, 1, 1]), granularity="token")
    c = route_counts(routing, [3, 0, 2])
    assert c.tokens == (2, 3) and c.rollouts == (1, 2)
