"""EmbeddedEngine against plain forward passes of the same tiny random Llama (no downloads)."""

from __future__ import annotations

import math
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from mopd.config import SamplingConfig
from mopd.errors import EngineError
from mopd.rollout.embedded import EmbeddedEngine
from mopd.rollout.engine import ScoreRequest
from mopd.rollout.scoring import tail_logmass
from mopd.types import Prompt
from sglang_protocol_server import tiny_llama

EOS = 1


@pytest.fixture(scope="module")
def engine() -> EmbeddedEngine:
    torch.set_num_threads(1)
    return EmbeddedEngine(tiny_llama(seed=0), eos_token_ids=[EOS], pad_token_id=0, name="tiny")


def prompts(lengths=(5, 3, 8)) -> list[Prompt]:
    g = torch.Generator().manual_seed(123)
    return [
        Prompt(index=i, ids=torch.randint(2, 96, (n,), generator=g), text="", domain="d")
        for i, n in enumerate(lengths)
    ]


def forward_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """[L, V] float64 log-softmax of one unpadded sequence, no cache: the reference."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), dim=-1)


def test_sampled_token_logprobs_equal_a_plain_forward_pass_at_those_tokens(engine):
    sampling = SamplingConfig(temperature=0.9, top_p=0.8, top_k=20, max_new_tokens=12, seed=7, n=2)
    rollouts = engine.generate(prompts(), sampling)
    assert len(rollouts) == 6
    assert [r.prompt_index for r in rollouts] == [0, 0, 1, 1, 2, 2]
    for r in rollouts:
        full = torch.cat([r.prompt_ids, r.response_ids])
        ref = forward_logprobs(engine.model, full)
        p, t = r.prompt_ids.numel(), r.response_ids.numel()
        expected = ref[p - 1 : p + t - 1].gather(1, r.response_ids[:, None]).squeeze(1)
        assert r.behaviour_logprobs.dtype == torch.float32
        assert torch.allclose(r.behaviour_logprobs.double(), expected, atol=1e-5, rtol=0)
        assert (r.finish == "stop") == (r.response_ids[-1].item() == EOS)
        assert r.finish == "stop" or t == sampling.max_new_tokens


def test_greedy_generation_is_deterministic_and_takes_the_argmax(engine):
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=10, n=1)
    a = engine.generate(prompts(), sampling)
    b = engine.generate(prompts()[::-1], sampling)[::-1]
    for x, y in zip(a, b):
        assert torch.equal(x.response_ids, y.response_ids)
        full = torch.cat([x.prompt_ids, x.response_ids])
        ref = forward_logprobs(engine.model, full)
        p = x.prompt_ids.numel()
        assert torch.equal(ref[p - 1 : -1].argmax(-1), x.response_ids)


def test_seeded_sampling_is_reproducible_and_different_seeds_differ(engine):
    def run(seed):
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=seed, n=2)
        return [r.response_ids.tolist() for r in engine.generate(prompts(), sampling)]

    first = run(11)
    assert first == run(11)
    assert first != run(12)
    # The n samples of one prompt use distinct derived seeds, so they differ.
    assert first[0] != first[1]


def test_stop_token_ids_end_generation_with_the_stop_token_included(engine):
    greedy = engine.generate(prompts(), SamplingConfig(temperature=0.0, max_new_tokens=10))
    stop_id = int(greedy[0].response_ids[2])
    again = engine.generate(prompts(), SamplingConfig(temperature=0.0, max_new_tokens=10, stop_token_ids=[stop_id]))
    first = again[0].response_ids.tolist()
    assert first[-1] == stop_id and stop_id not in first[:-1]
    assert again[0].finish == "stop"


def test_scores_match_a_float64_forward_reference_at_every_response_position(engine):
    g = torch.Generator().manual_seed(5)
    reqs = [ScoreRequest(ids=torch.randint(0, 128, (n,), generator=g), response_start=s) for n, s in ((9, 4), (6, 1), (12, 7))]
    scores = engine.score(reqs, top_k=16)
    for r, s in zip(reqs, scores):
        ref = forward_logprobs(engine.model, r.ids)[r.response_start - 1 : -1]
        t = r.ids.numel() - r.response_start
        assert s.topk_ids.shape == (t, 16) and s.topk_ids.dtype == torch.int32
        top = torch.topk(ref, 16, dim=-1)
        assert torch.equal(s.topk_ids.long(), top.indices)
        assert torch.allclose(s.topk_logprobs.double(), top.values, atol=1e-5)
        sampled = ref.gather(1, r.ids[r.response_start :, None]).squeeze(1)
        assert torch.allclose(s.sampled_logprob.double(), sampled, atol=1e-5)
        tail = torch.log1p(-top.values.exp().sum(-1))
        assert torch.allclose(s.tail_logmass.double(), tail, atol=1e-4)
        s.check(vocab_size=128, num_tokens=t)


def test_tail_logmass_is_stable_when_the_top_k_holds_almost_all_mass():
    lp = torch.log(torch.tensor([[0.5, 0.5 - 1e-9], [0.9, 0.1 + 1e-6], [0.25, 0.25]], dtype=torch.float64))
    tail = tail_logmass(lp.float())
    assert torch.isfinite(tail).all()
    assert tail[0].item() == pytest.approx(math.log(1e-7), rel=1e-3)  # clamped to the floor
    assert tail[2].item() == pytest.approx(math.log(0.5), abs=1e-6)
    assert tail_logmass(lp, vocab_size=2).isinf().all()


def test_update_weights_loads_a_subset_and_rejects_unknown_names_and_shapes(engine):
    name = "model.layers.0.mlp.down_proj.weight"
    old = engine.model.state_dict()[name].clone()
    new = torch.randn_like(old)
    engine.update_weights([(name, new)], version=3)
    assert torch.equal(engine.model.state_dict()[name], new)
    assert engine.health().weight_version == 3
    with pytest.raises(EngineError, match="unknown weight 'model.layers.9.mlp.down_proj.weight'"):
        engine.update_weights([("model.layers.9.mlp.down_proj.weight", new)], version=4)
    with pytest.raises(EngineError, match=r"has shape \(2, 2\), the model expects"):
        engine.update_weights([(name, torch.zeros(2, 2))], version=4)
    assert engine.health().weight_version == 3
    engine.update_weights([(name, old)], version=0)


def test_score_rejects_a_request_without_context_tokens(engine):
    with pytest.raises(EngineError, match="score request 0 has response_start=0"):
        engine.score([ScoreRequest(ids=torch.tensor([3, 4, 5]), response_start=0)], top_k=4)


def _allowed_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """[V] float64 sampling distribution: softmax(logits / T), cut to the top-k ids, then to the
    smallest most-probable set whose mass reaches top_p (of the top-k distribution), renormalised."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    order = torch.argsort(probs, descending=True)
    keep[order[: top_k if top_k > 0 else len(probs)]] = True
    probs = torch.where(keep, probs, 0.0)
    probs = probs / probs.sum()
    mass = 0.0
    for i in torch.argsort(probs, descending=True).tolist():
        if mass >= top_p:
            keep[i] = False
        mass += float(probs[i])
    probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (-1, 0.6), (12, 0.7)], ids=["top_k", "top_p", "both"])
def test_sampled_tokens_lie_in_the_top_k_and_nucleus_at_their_renormalised_frequencies(engine, top_k, top_p):
    n, temperature = 3000, 0.5
    prompt = prompts((6,))[0]
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=1, seed=11, n=n)
    first = torch.tensor([r.response_ids[0].item() for r in engine.generate([prompt], sampling)])
    want = _allowed_distribution(forward_logprobs(engine.model, prompt.ids)[-1], temperature, top_k, top_p)
    allowed = set(torch.nonzero(want).flatten().tolist())
    full = torch.softmax(forward_logprobs(engine.model, prompt.ids)[-1] / temperature, dim=-1)
    assert 2 <= len(allowed) and float(full[sorted(allowed)].sum()) < 0.9  # the filter removes real mass
    assert set(first.tolist()) <= allowed, sorted(set(first.tolist()) - allowed)
    freq = torch.bincount(first, minlength=want.numel()).double() / n
    # Each frequency within 4.5 standard errors of its renormalised probability (seeded: deterministic).
    bound = 4.5 * torch.sqrt(want * (1 - want) / n) + 1e-12
    assert bool(((freq - want).abs() <= bound).all()), [(i, float(freq[i]), float(want[i])) for i in sorted(allowed)]
