"""score_batch (one call per teacher, rows back in packing order) and build_train_batches (the
TrainBatch alignment rule, position by position), against direct forward passes of the teachers."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mopd.config import RouteGranularity, RouterConfig, SamplingConfig, TeacherConfig, TeacherKind, TokenRule
from mopd.data.tokenizer import build_char_tokenizer
from mopd.errors import TeacherError
from mopd.rollout.embedded import EmbeddedEngine
from mopd.teachers import ExpertTeacher, Router, build_teachers, build_train_batches, score_batch
from mopd.types import Prompt, Rollout, Routing, TeacherScores

K = 5
TEXTS = [("rev:abc=", "rev"), ("add:12+34=", "add"), ("rev:hello=", "rev"), ("srt:dcb=", "srt"), ("add:9+9=", "add")]


class CountingEngine(EmbeddedEngine):
    """EmbeddedEngine that counts score() calls (to show one call per teacher per batch)."""

    calls = 0

    def score(self, requests, top_k):
        self.calls += 1
        return super().score(requests, top_k)


def tiny_llama(tok, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer()
    student = EmbeddedEngine(tiny_llama(tok, 0), eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    prompts = [Prompt(index=i, ids=torch.tensor(tok.encode(t)), text=t, domain=d) for i, (t, d) in enumerate(TEXTS)]
    # Many stop ids, so that a random model's responses end at different lengths.
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=6, seed=3, stop_token_ids=list(range(4, 40)))
    rollouts = student.generate(prompts, sampling)
    assert len({r.response_ids.numel() for r in rollouts}) > 1, "want ragged responses"
    configs = [TeacherConfig(name="rev", domains=["rev", "srt"]), TeacherConfig(name="add", domains=["add"])]
    models = [tiny_llama(tok, 1), tiny_llama(tok, 2)]
    return tok, rollouts, configs, models


def teachers(setup):
    tok, _, configs, models = setup
    return [ExpertTeacher(c, CountingEngine(m, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                                            name=c.name), len(tok)) for c, m in zip(configs, models)]


def direct_rows(model, r: Rollout) -> torch.Tensor:
    """[T, V] float64 log-softmax at the positions that predict each response token."""
    ids = torch.cat([r.prompt_ids, r.response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
    p = r.prompt_ids.numel()
    return logp[p - 1 : p - 1 + r.response_ids.numel()]


def assert_rows_match(scores: TeacherScores, lo: int, rows: torch.Tensor, response: torch.Tensor, where: str):
    for t in range(rows.shape[0]):
        ref_lp, ref_ids = rows[t].topk(K)
        assert scores.topk_ids[lo + t].tolist() == ref_ids.tolist(), where
        assert torch.allclose(scores.topk_logprobs[lo + t].double(), ref_lp, atol=1e-5), where
        assert scores.sampled_logprob[lo + t].item() == pytest.approx(rows[t, response[t]].item(), abs=1e-5), where


def test_prompt_routing_calls_each_teacher_once_and_puts_rows_back_in_packing_order(setup):
    _, rollouts, configs, models = setup
    ts = teachers(setup)
    router = Router(RouterConfig(), configs)
    routing, scores = score_batch(rollouts, ts, router, K)
    assert [t.engine.calls for t in ts] == [1, 1]
    lengths = [r.response_ids.numel() for r in rollouts]
    assert scores.num_tokens == sum(lengths) and scores.teacher == "routed(rev,add)"
    expect_teacher = [0, 1, 0, 0, 1]
    assert routing.index.tolist() == [m for m, n in zip(expect_teacher, lengths) for _ in range(n)]
    lo = 0
    for b, r in enumerate(rollouts):
        assert_rows_match(scores, lo, direct_rows(models[expect_teacher[b]], r), r.response_ids, f"rollout {b}")
        lo += lengths[b]
    assert router.last.tokens == (sum(n for m, n in zip(expect_teacher, lengths) if m == 0),
                                  sum(n for m, n in zip(expect_teacher, lengths) if m == 1))
    assert router.last.rollouts == (3, 2)


def test_token_routing_by_confidence_scores_every_token_with_every_teacher_once_and_takes_the_best(setup):
    _, rollouts, configs, models = setup
    ts = teachers(setup)
    router = Router(RouterConfig(granularity=RouteGranularity.token, token_rule=TokenRule.confidence), configs)
    routing, scores = score_batch(rollouts, ts, router, K)
    assert [t.engine.calls for t in ts] == [1, 1]
    lo, chosen = 0, []
    for b, r in enumerate(rollouts):
        rows = [direct_rows(m, r) for m in models]
        t_idx = torch.arange(r.response_ids.numel())
        sampled = torch.stack([x[t_idx, r.response_ids] for x in rows])  # [2, T]
        best = sampled.argmax(0)
        chosen += best.tolist()
        for t in range(r.response_ids.numel()):
            assert_rows_match(scores, lo + t, rows[int(best[t])][t : t + 1], r.response_ids[t : t + 1], f"{b}/{t}")
        lo += r.response_ids.numel()
    assert routing.index.tolist() == chosen and 0 < sum(chosen) < len(chosen)


def test_mixture_routing_scores_every_token_with_the_exact_mixture_logprob_of_the_sampled_token(setup):
    _, rollouts, configs, models = setup
    ts = teachers(setup)
    router = Router(RouterConfig(granularity=RouteGranularity.token, token_rule=TokenRule.mixture,
                                 mixture={"rev": 1.0, "add": 3.0}), configs)
    routing, scores = score_batch(rollouts, ts, router, K, concurrent=True)
    assert [t.engine.calls for t in ts] == [1, 1]
    ref = []
    for r in rollouts:
        rows = [direct_rows(m, r).exp() for m in models]
        mix = 0.25 * rows[0] + 0.75 * rows[1]  # [T, V] full-vocabulary mixture, float64
        ref.append(mix[torch.arange(r.response_ids.numel()), r.response_ids].log())
    assert torch.allclose(scores.sampled_logprob.double(), torch.cat(ref), atol=1e-5)
    # The truncated top-K + tail is a distribution: entries and tail sum to one.
    total = scores.topk_logprobs.double().exp().sum(1) + scores.tail_logmass.double().exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    assert routing.index.unique().tolist() == [1] and routing.weights[0].tolist() == [0.25, 0.75]


def test_concurrent_scoring_gives_the_same_scores_as_sequential_scoring(setup):
    _, rollouts, configs, _ = setup
    a = score_batch(rollouts, teachers(setup), Router(RouterConfig(), configs), K)[1]
    b = score_batch(rollouts, teachers(setup), Router(RouterConfig(), configs), K, concurrent=True)[1]
    assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_logprobs, b.topk_logprobs)


def test_teachers_configured_with_different_top_k_need_an_explicit_batch_k(setup):
    tok, rollouts, configs, models = setup
    ts = teachers(setup)
    ts[1] = ExpertTeacher(TeacherConfig(name="add", domains=["add"], top_k=8), ts[1].engine, len(tok))
    with pytest.raises(TeacherError, match="different top_k \\(rev=64, add=8\\)"):
        score_batch(rollouts, ts, Router(RouterConfig(), configs))
    assert score_batch(rollouts, ts, Router(RouterConfig(), configs), top_k=3)[1].k == 3


def test_built_expert_and_self_pi_teachers_score_one_batch_each_on_their_own_context(setup):
    tok, rollouts, configs, models = setup
    pi_cfg = TeacherConfig(name="self", kind=TeacherKind.self_pi, domains=["hinted"], top_k=K)
    cfgs = [replace(configs[0], top_k=K), replace(configs[1], top_k=K), pi_cfg]
    engines = {c.name: CountingEngine(m, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
               for c, m in zip(cfgs, [models[0], models[1], models[0]])}
    ts = build_teachers(cfgs, engines, tok, teacher_tokenizers={"rev": tok, "add": build_char_tokenizer()})
    batch = list(rollouts)
    batch[1] = replace(batch[1], domain="hinted", pi="answer: 46")
    batch[3] = replace(batch[3], domain="hinted", pi="answer: bcd")
    routing, scores = score_batch(batch, ts, Router(RouterConfig(), cfgs))
    assert [e.calls for e in engines.values()] == [1, 1, 1]
    lo = 0
    for b, r in enumerate(batch):
        m = 2 if r.pi else (0 if r.domain in ("rev", "srt") else 1)
        assert routing.index[lo].item() == m
        if r.pi:  # the self-teacher's context: "<bos>answer: ..\n\n" + the prompt's characters
            ctx = torch.tensor(tok.encode(f"{r.pi}\n\n" + tok.decode(r.prompt_ids[1:])))
            r_ctx = replace(r, prompt_ids=ctx)
            assert_rows_match(scores, lo, direct_rows(models[0], r_ctx), r.response_ids, f"rollout {b}")
        else:
            assert_rows_match(scores, lo, direct_rows(models[m], r), r.response_ids, f"rollout {b}")
        lo += r.response_ids.numel()


class BrokenEngine(EmbeddedEngine):
    """Answers with the wrong K, or one row short, or an error."""

    mode = "k"

    def score(self, requests, top_k):
        if self.mode == "raise":
            raise RuntimeError("connection reset by peer")
        got = super().score(requests, top_k + 1 if self.mode == "k" else top_k)
        return got if self.mode == "k" else [s.select(torch.arange(s.num_tokens - 1)) for s in got]


@pytest.mark.parametrize("mode, message", [
    ("k", "teacher 'rev': engine returned K=6, asked for K=5"),
    ("rows", "teacher 'rev', prompt 0: .*scores cover"),
    ("raise", "teacher 'rev': scoring 5 rollouts failed: connection reset by peer"),
])
def test_a_teacher_answer_of_the_wrong_k_or_length_or_an_engine_failure_names_the_teacher(setup, mode, message):
    tok, rollouts, configs, models = setup
    engine = BrokenEngine(models[0], eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    engine.mode = mode
    with pytest.raises(TeacherError, match=message):
        ExpertTeacher(configs[0], engine, len(tok)).score(rollouts, K)


def test_score_batch_refuses_teachers_that_are_not_the_routers(setup):
    _, rollouts, configs, _ = setup
    with pytest.raises(TeacherError, match="not the router's teachers"):
        score_batch(rollouts, teachers(setup)[::-1], Router(RouterConfig(), configs), K)


def synthetic(rollouts: list[Rollout], m: int = 3) -> tuple[TeacherScores, Routing]:
    """Scores whose every value encodes its packed token n, so any misplacement shows."""
    n = sum(r.response_ids.numel() for r in rollouts)
    ar = torch.arange(n)
    scores = TeacherScores(
        topk_ids=(ar[:, None] * K + torch.arange(K)).to(torch.int32) % 97,
        topk_logprobs=-(ar[:, None] + torch.arange(K) / 10.0 + 1.0),
        sampled_logprob=-(ar + 0.5), tail_logmass=-(ar + 0.25), teacher="t",
    )
    return scores, Routing(teachers=tuple("abc"[:m]), index=ar % m)


def test_train_batches_put_response_token_t_at_position_p_minus_1_plus_t_everywhere(setup):
    _, rollouts, _, _ = setup
    scores, routing = synthetic(rollouts)
    rewards = [0.5, -1.0, 1.0, 0.0, 2.0]
    batches = build_train_batches(rollouts, scores, routing, micro_batch_size=2, pad_id=0, rewards=rewards,
                                  pad_to_multiple=4)
    s_len = max(r.prompt_ids.numel() + r.response_ids.numel() for r in rollouts)
    s_len = -(-s_len // 4) * 4
    assert len(batches) == 3 and all(b.tokens.shape == (2, s_len) for b in batches)
    n = 0
    for i, r in enumerate(rollouts):
        b, row = batches[i // 2], i % 2
        p, t = r.prompt_ids.numel(), r.response_ids.numel()
        seq = torch.cat([r.prompt_ids, r.response_ids])
        assert b.tokens[row, : p + t].tolist() == seq.tolist() and (b.tokens[row, p + t :] == 0).all()
        assert b.reward[row].item() == rewards[i]
        for s in range(s_len):
            inside = p - 1 <= s <= p + t - 2
            assert b.loss_mask[row, s].item() == float(inside), (i, s)
            assert b.position_ids[row, s].item() == s
            if s < p + t - 1:
                assert b.targets[row, s].item() == seq[s + 1].item()
            if not inside:
                assert b.teacher_index[row, s].item() == -1
                assert b.tail_logmass[row, s].item() == pytest.approx(-math.log(K + 1))
                continue
            j = n + s - (p - 1)  # packed index of the response token this position predicts
            assert b.targets[row, s].item() == r.response_ids[s - (p - 1)].item()
            assert b.topk_ids[row, s].tolist() == scores.topk_ids[j].tolist()
            assert torch.equal(b.topk_logprobs[row, s], scores.topk_logprobs[j])
            assert b.sampled_logprob[row, s].item() == scores.sampled_logprob[j].item()
            assert b.tail_logmass[row, s].item() == scores.tail_logmass[j].item()
            assert b.behaviour_logprobs[row, s].item() == r.behaviour_logprobs[s - (p - 1)].item()
            assert b.teacher_index[row, s].item() == routing.index[j].item()
        n += t
    last = batches[-1]
    assert last.loss_mask[1].sum() == 0 and (last.tokens[1] == 0).all()  # filler row: fully masked
    assert sum(b.num_tokens for b in batches) == n


def test_scored_train_batches_carry_the_teachers_logprob_of_each_target_token(setup):
    _, rollouts, configs, models = setup
    routing, scores = score_batch(rollouts, teachers(setup), Router(RouterConfig(), configs), K)
    batches = build_train_batches(rollouts, scores, routing, micro_batch_size=3, pad_id=0)
    for b in batches:
        for row in range(b.tokens.shape[0]):
            mask = b.loss_mask[row].bool()
            if not mask.any():
                continue
            m = int(b.teacher_index[row][mask][0])
            with torch.no_grad():
                logp = torch.log_softmax(models[m](input_ids=b.tokens[row : row + 1]).logits[0].double(), -1)
            ref = logp.gather(1, b.targets[row][:, None])[:, 0]
            assert torch.allclose(b.sampled_logprob[row][mask].double(), ref[mask], atol=1e-5)


def test_train_batches_refuse_mismatched_token_counts_and_overlong_sequences(setup):
    _, rollouts, _, _ = setup
    scores, routing = synthetic(rollouts)
    with pytest.raises(TeacherError, match="scores cover"):
        build_train_batches(rollouts[:-1], scores, routing, 2, 0)
    with pytest.raises(TeacherError, match="longer than seq_length=4"):
        build_train_batches(rollouts, scores, routing, 2, 0, seq_length=4)
