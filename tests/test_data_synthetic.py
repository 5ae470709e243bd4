"""Synthetic domains and their verifiers: correct/incorrect/edge cases, determinism, disjoint splits."""

import json
import os
import re
import subprocess
import sys

import pytest

from mopd.data.synthetic import (
    DOMAINS, EVAL_ONE_IN, Domain, Example, PiMode, domain_verifier, generate, get_domain, register_domain, split_of,
)
from mopd.data.verifiers import (
    exact_match, exact_match_casefold, get_verifier, integer_match, little_endian_integer_match, normalize,
)
from mopd.errors import DataError


def solve(domain: str, prompt: str) -> str:
    """Independent solver, written from the prompt format alone."""
    tag, question = re.fullmatch(r"(\w+):(.*)=", prompt).groups()
    if domain == "reverse":
        return question[::-1]
    if domain == "caesar":
        return "".join("abcdefghijklmnopqrstuvwxyz"[("abcdefghijklmnopqrstuvwxyz".index(c) + 3) % 26] for c in question)
    if domain == "sort":
        return "".join(sorted(question))
    a, b = question.split("+")
    width = len(a) + 1
    return str(int(a) + int(b)).zfill(width)[::-1]


def test_exact_match_accepts_the_reference_up_to_surrounding_whitespace_only():
    assert exact_match("cba", "cba") == 1.0
    assert exact_match(" cba\n", "cba") == 1.0
    assert exact_match("a  b\n c", "a b c") == 1.0
    assert exact_match("cb", "cba") == 0.0
    assert exact_match("cbaa", "cba") == 0.0
    assert exact_match("CBA", "cba") == 0.0
    assert exact_match("", "cba") == 0.0
    assert exact_match_casefold("CBA", "cba") == 1.0
    assert normalize("\uff41 b") == "a b"  # NFKC folds the full-width letter


def test_integer_verifiers_compare_values_big_and_little_endian():
    assert integer_match("007", "7") == 1.0
    assert integer_match("-12", "-12") == 1.0
    assert integer_match("12", "-12") == 0.0
    assert integer_match("12 apples", "12") == 0.0
    assert integer_match("", "12") == 0.0
    # little-endian: "231" is 132; a dropped trailing zero ("23" for "230") is the same number 32
    assert little_endian_integer_match("231", "231") == 1.0
    assert little_endian_integer_match("23", "230") == 1.0
    assert little_endian_integer_match("032", "230") == 0.0
    assert little_endian_integer_match("132", "231") == 0.0
    assert little_endian_integer_match("abc", "231") == 0.0
    with pytest.raises(DataError, match="reference 'x1' is not an integer"):
        integer_match("1", "x1")


def test_unknown_verifier_or_domain_names_the_valid_choices():
    with pytest.raises(DataError, match=r"unknown verifier 'nope'; valid verifiers: \['exact'"):
        get_verifier("nope")
    with pytest.raises(DataError, match=r"unknown synthetic domain 'nope'; valid domains: \['addition'"):
        generate("nope", 3)
    assert domain_verifier("math") is exact_match
    assert domain_verifier("addition") is little_endian_integer_match


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_every_domain_references_match_an_independent_solver_and_its_verifier(domain):
    examples = generate(domain, 200, "train", seed=3)
    verify = get_domain(domain).verifier
    for ex in examples:
        assert ex.domain == domain
        assert ex.reference == solve(domain, ex.prompt), ex
        assert verify(ex.reference, ex.reference) == 1.0
        assert verify(ex.reference + "\n", ex.reference) == 1.0
        assert verify("", ex.reference) == 0.0
    # a wrong answer (another prompt's answer whose value differs) is rejected
    wrong = [(a, b) for a, b in zip(examples, examples[1:]) if solve(domain, a.prompt) != b.reference][:50]
    assert len(wrong) >= 40
    assert all(verify(b.reference, a.reference) == 0.0 for a, b in wrong)


def test_domain_sizes_match_the_documented_ranges():
    lengths = {len(ex.reference) for ex in generate("reverse", 500)}
    assert lengths == set(range(3, 9))
    assert {len(ex.reference) for ex in generate("sort", 500)} == set(range(3, 7))
    additions = generate("addition", 300)
    assert all(re.fullmatch(r"add:\d\d\+\d\d=", ex.prompt) and len(ex.reference) == 3 for ex in additions)
    assert all(re.fullmatch(r"add3:\d{3}\+\d{3}=", ex.prompt) for ex in generate("addition3", 300))


def test_generation_is_deterministic_distinct_and_seed_dependent():
    a = generate("reverse", 300, "train", seed=7)
    assert a == generate("reverse", 300, "train", seed=7)
    assert len({ex.prompt for ex in a}) == 300
    assert a != generate("reverse", 300, "train", seed=8)


def test_train_and_eval_splits_are_disjoint_across_seeds():
    for domain in ("reverse", "addition"):
        train = {ex.prompt for seed in (0, 1) for ex in generate(domain, 1000, "train", seed)}
        evals = {ex.prompt for seed in (0, 1) for ex in generate(domain, 300, "eval", seed)}
        assert len(evals) > 300 and train.isdisjoint(evals)
        assert all(split_of(domain, p) == "eval" for p in evals)
    # the hash puts about one candidate in EVAL_ONE_IN into eval
    share = sum(split_of("reverse", f"rev:{i}=") == "eval" for i in range(5000)) / 5000
    assert abs(share - 1 / EVAL_ONE_IN) < 0.03


def test_asking_for_more_prompts_than_a_split_holds_is_a_clear_error():
    # 2-digit addition has 10^4 prompts, about 2000 of them in eval
    with pytest.raises(DataError, match=r"'addition': found only \d+ distinct eval prompts .* lower data.num_prompts"):
        generate("addition", 2500, "eval")
    with pytest.raises(DataError, match=r"split 'test' is not one of \['train', 'eval'\]"):
        generate("reverse", 3, "test")


def test_pi_text_is_the_answer_or_a_hint_or_nothing():
    ex = Example("reverse", "rev:abcd=", "dcba")
    assert ex.pi(PiMode.answer) == "answer: dcba"
    assert ex.pi(PiMode.hint) == "hint: dc"
    assert Example("reverse", "rev:abc=", "cba").pi(PiMode.hint) == "hint: c"
    assert ex.pi(PiMode.none) is None


def test_registering_a_domain_with_a_taken_name_or_tag_is_refused():
    with pytest.raises(DataError, match="clashes with registered"):
        register_domain(Domain("reverse2", "rev", "exact", lambda rng: ("a", "a")))
    with pytest.raises(DataError, match="clashes with registered"):
        register_domain(Domain("reverse", "rv2", "exact", lambda rng: ("a", "a")))


def test_generation_is_identical_in_a_fresh_process_with_another_hash_seed():
    code = ("import json; from mopd.data.synthetic import generate; "
            "print(json.dumps([e.prompt for e in generate('caesar', 50, 'eval', 11)]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == [e.prompt for e in generate("caesar", 50, "eval", 11)]
