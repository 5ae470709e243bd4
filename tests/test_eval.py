"""Eval metrics: pass@k against brute-force enumeration, per-domain accuracy, epistemic markers."""

import itertools
import math
from fractions import Fraction

import pytest
import torch

from mopd.eval import DEFAULT_MARKERS, EvalSample, epistemic_marker_counts, evaluate, pass_at_k
from mopd.types import Rollout


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of all k-subsets of n responses (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_equals_brute_force_enumeration_of_all_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_is_accurate_for_large_n_and_reduces_to_c_over_n_at_k_1():
    for n, c, k in ((200, 2, 100), (1000, 1, 10), (500, 37, 64), (64, 0, 8)):
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
    assert pass_at_k(7, 3, 1) == pytest.approx(3 / 7)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match=f"n={n}, c={c}, k={k}"):
        pass_at_k(n, c, k)


def test_epistemic_markers_are_whole_words_case_insensitive_and_configurable():
    text = "Wait... hmm, WAIT. Let me  check: awaited hmmm. Actually, double-check."
    assert epistemic_marker_counts(text) == (2, 1, 1, 1, 1)
    assert DEFAULT_MARKERS == ("wait", "hmm", "let me check", "actually", "double-check")
    assert epistemic_marker_counts(text, ["hmmm", "check"]) == (1, 2)
    assert epistemic_marker_counts("", ["wait"]) == (0,)


def samples():
    """Two reverse prompts and one addition prompt, each with a greedy answer and 4 samples."""
    out = []
    rows = [  # (domain, prompt_index, reference, greedy response, sampled responses)
        ("reverse", 0, "cba", "cba", ["cba", "abc", "cba\n", "wait, cba"]),
        ("reverse", 1, "zyx", "zy", ["zyx", "xyz", "hmm", "zz"]),
        ("addition", 2, "231", "2310", ["231", "231", "132", "23100"]),
    ]
    for domain, i, ref, greedy, sampled in rows:
        out.append(EvalSample(i, domain, greedy, ref, greedy=True))
        out.extend(EvalSample(i, domain, r, ref, greedy=False) for r in sampled)
    return out


def test_evaluate_reports_greedy_accuracy_pass_at_k_and_markers_per_domain():
    result = evaluate(samples(), ks=(2, 4))
    rev, add = result.domain("reverse"), result.domain("addition")
    assert [d.domain for d in result.domains] == ["reverse", "addition"]
    # reverse: greedy 1/2; prompt 0 has c=2 of n=4 ("cba\n" normalises, "wait, cba" does not), prompt 1 has c=1
    assert rev.greedy_accuracy == 0.5 and rev.num_prompts == 2 and rev.samples_per_prompt == 4
    pk = lambda n, c, k: 1 - math.comb(n - c, k) / math.comb(n, k)  # noqa: E731
    assert rev.pass_at[1] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert rev.pass_at[2] == pytest.approx((pk(4, 2, 2) + pk(4, 1, 2)) / 2)
    assert rev.pass_at[4] == pytest.approx(1.0)
    assert rev.markers["wait"] == pytest.approx(1 / 10) and rev.markers["hmm"] == pytest.approx(1 / 10)
    # addition is little-endian integer match: "2310" and "23100" are 132 too; "132" is 231
    assert add.greedy_accuracy == 1.0
    assert add.pass_at[1] == pytest.approx(3 / 4) and add.pass_at[2] == pytest.approx(pk(4, 3, 2))
    metrics = result.metrics()
    assert metrics["eval/reverse/greedy_accuracy"] == 0.5
    assert metrics["eval/addition/pass@4"] == 1.0
    assert metrics["eval/reverse/markers/let_me_check"] == 0.0
    assert metrics["eval/addition/num_prompts"] == 1.0
    assert metrics["eval/mean/greedy_accuracy"] == 0.75
    assert metrics["eval/mean/pass@1"] == pytest.approx((rev.pass_at[1] + 3 / 4) / 2)


def test_greedy_only_evaluation_has_no_pass_at_k_and_custom_verifiers_are_used():
    only_greedy = [s for s in samples() if s.greedy]
    result = evaluate(only_greedy, verifier_for=lambda domain: lambda resp, ref: float(resp[:2] == ref[:2]))
    assert result.domain("reverse").greedy_accuracy == 1.0
    assert result.domain("reverse").pass_at == {} and result.domain("reverse").samples_per_prompt == 0
    assert "eval/reverse/pass@1" not in result.metrics()


def test_bad_eval_input_names_the_prompt_and_domain():
    with pytest.raises(ValueError, match="pass@8 needs 8 samples per prompt; domain 'reverse' prompt 0 has 4"):
        evaluate(samples(), ks=(8,))
    with pytest.raises(ValueError, match="prompt 5 of domain 'reverse' has no reference answer"):
        evaluate([EvalSample(5, "reverse", "a", None, greedy=True)])
    with pytest.raises(ValueError, match="prompt 0 of domain 'reverse' has two greedy responses"):
        evaluate([EvalSample(0, "reverse", "a", "a", True), EvalSample(0, "reverse", "b", "a", True)])
    with pytest.raises(KeyError, match="no eval result for domain 'caesar'"):
        evaluate(samples()).domain("caesar")


def test_eval_samples_come_straight_from_rollouts():
    r = Rollout(prompt_ids=torch.tensor([1, 2]), response_ids=torch.tensor([3]), behaviour_logprobs=torch.zeros(1),
                finish="stop", weight_version=3, domain="reverse", prompt_index=9, reference="ba", text="ba")
    assert EvalSample.from_rollout(r, greedy=True) == EvalSample(9, "reverse", "ba", "ba", True)
