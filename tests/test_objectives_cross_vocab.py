"""Cross-vocabulary objectives (mopd/objectives/cross_vocab.py) against float64 references, values and
gradients, through the real LossFn; and their reduction to the same-tokenizer objectives when the
teacher's tokenizer is the student's (an EmbeddedEngine teacher scored both ways)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mopd.config import ObjectiveConfig, ObjectiveName, SamplingConfig, TeacherConfig
from mopd.data.tokenizer import build_char_tokenizer
from mopd.errors import ObjectiveError
from mopd.objectives import build_loss_fn, mean_metrics
from mopd.rollout.embedded import EmbeddedEngine
from mopd.teachers import ExpertTeacher, build_train_batches
from mopd.teachers.cross import CrossTokenizerTeacher, map_topk
from mopd.teachers.alignment import VocabMap
from mopd.teachers.token_bytes import token_bytes
from mopd.types import ChunkScores, Prompt, Rollout, Routing, TeacherScores

V, K, P = 13, 4, 3
# Per rollout: student chunk of each response token and the chunk's teacher width (0: after a cut, the
# teacher did not read it; its sampled_logprob is UNREAD_LOGPROB), -1: a placeholder outside every chunk.
CHUNKS = [[0, 0, 1, 2, 2, 2, 3, -1], [0, 1, 1, 2, 3, 4]]
WIDTHS = [[3, 3, 1, 2, 2, 2, 1, 0], [1, 1, 1, 1, 0, 0]]


def _case(seed: int = 0):
    """Rollouts, cross-tokenizer-shaped scores (random teacher values) and the student's logits."""
    g = torch.Generator().manual_seed(seed)
    rollouts, parts = [], []
    for b, (chunk, width) in enumerate(zip(CHUNKS, WIDTHS)):
        t = len(chunk)
        resp = torch.randint(0, V, (t,), generator=g)
        rollouts.append(Rollout(prompt_ids=torch.randint(0, V, (P,), generator=g), response_ids=resp,
                                behaviour_logprobs=-torch.rand(t, generator=g) * 3, finish="length",
                                weight_version=0, domain="d", prompt_index=b))
        full = torch.log_softmax(torch.randn(t, V, generator=g) * 2, dim=-1)
        lp, ids = full.topk(K, dim=1)
        tail = torch.log1p(-lp.exp().sum(1).clamp(max=1 - 1e-6))
        first = torch.tensor([i == 0 or chunk[i] != chunk[i - 1] for i in range(t)])
        sampled = torch.where(first & (torch.tensor(chunk) >= 0), -torch.rand(t, generator=g) * 4, 0.0)
        parts.append(TeacherScores(topk_ids=ids.int(), topk_logprobs=lp, sampled_logprob=sampled, tail_logmass=tail,
                                   teacher="x", chunks=ChunkScores(torch.tensor(chunk), torch.tensor(width).int())))
    scores = TeacherScores.concat(parts)
    n = scores.num_tokens
    batch = build_train_batches(rollouts, scores, Routing(("x",), torch.zeros(n, dtype=torch.long)), 2, pad_id=0)[0]
    logits = torch.randn(batch.tokens.shape[0], batch.tokens.shape[1], V, generator=g) * 1.5
    return rollouts, parts, batch, logits


def _reference(rollouts, parts, logits: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """The float64 loss SUM of the module docstring of cross_vocab.py, written out token by token."""
    logp = torch.log_softmax(logits, dim=-1)
    total = logits.new_zeros(())
    for b, (r, s) in enumerate(zip(rollouts, parts)):
        chunk, width = s.chunks.chunk.tolist(), s.chunks.teacher_tokens.tolist()
        rows = [logp[b, P - 1 + t] for t in range(len(chunk))]
        y = r.response_ids.tolist()
        for c in sorted(set(chunk) - {-1}):
            toks = [t for t in range(len(chunk)) if chunk[t] == c]
            one = len(toks) == 1 and width[toks[0]] == 1
            t0 = toks[0]
            t_lp = s.topk_logprobs[t0].double()
            t_cols = torch.cat([t_lp, s.tail_logmass[t0:t0 + 1].double()])
            log_z = torch.logsumexp(t_cols, 0)
            if cfg.name == ObjectiveName.reverse_kl_sampled:
                teacher_c = float(s.sampled_logprob[t0]) - (float(log_z) if one else 0.0)
                student_c = sum(float(rows[t][y[t]]) for t in toks)
                adv = teacher_c - student_c
                if cfg.token_clip:
                    adv = max(-cfg.token_clip, min(cfg.token_clip, adv))
                for t in toks:
                    w = 1.0
                    if cfg.importance_ratio:
                        w = min(math.exp(float(rows[t][y[t]]) - float(r.behaviour_logprobs[t])), cfg.ratio_cap)
                    total = total - w * adv * rows[t][y[t]]
            elif cfg.name == ObjectiveName.forward_kl_topk and one:
                pt = (t_cols - log_z).exp()
                ids = s.topk_ids[t0].long()
                ps_top = rows[t0][ids].exp()
                ps = torch.cat([ps_top, (1 - ps_top.sum()).reshape(1)])
                total = total + (pt * (pt.log() - ps.log())).sum()
            elif cfg.name == ObjectiveName.uld and not one and width[t0] > 0:
                pt = (t_cols - log_z).exp()
                ps_all = rows[t0].exp()
                ps_top = ps_all.sort(descending=True).values[:K]
                l1 = (ps_top - pt[:K].sort(descending=True).values).abs().sum()
                total = total + l1 + ((1 - ps_top.sum()) - pt[K]).abs()
    return total


CONFIGS = [
    ObjectiveConfig(name=ObjectiveName.reverse_kl_sampled),
    ObjectiveConfig(name=ObjectiveName.reverse_kl_sampled, importance_ratio=True, ratio_cap=1.5, token_clip=2.0),
    ObjectiveConfig(name=ObjectiveName.forward_kl_topk),
    ObjectiveConfig(name=ObjectiveName.uld),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name.value}{'-is-clip' if c.importance_ratio else ''}")
def test_cross_vocab_objective_equals_the_float64_reference_in_value_and_gradient(cfg):
    rollouts, parts, batch, logits = _case()
    loss_fn = build_loss_fn({0: [cfg]}, ("x",), tp_group=None, vocab_start=0, vocab_size=V)
    x = logits.clone().requires_grad_(True)
    loss, metrics = loss_fn(x, batch)
    loss.backward()
    ref_x = logits.double().clone().requires_grad_(True)
    ref = _reference(rollouts, parts, ref_x, cfg)
    ref.backward()
    assert float(ref) != 0.0
    assert float(loss) == pytest.approx(float(ref), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-5)


def test_chunk_metrics_count_aligned_tokens_chunks_and_unscored_tokens():
    _, _, batch, logits = _case()
    loss_fn = build_loss_fn({0: [CONFIGS[0]]}, ("x",), tp_group=None, vocab_start=0, vocab_size=V)
    _, sums = loss_fn(logits, batch)
    m = mean_metrics(sums)
    tokens = sum(len(c) for c in CHUNKS)
    # 1:1 tokens: rollout 0 chunks 1 and 3; rollout 1 chunks 0 and 2.
    assert m["teacher/x/tokens"] == tokens
    assert m["teacher/x/aligned_fraction"] == pytest.approx(4 / tokens)
    assert m["teacher/x/unscored_fraction"] == pytest.approx(3 / tokens)
    assert m["teacher/x/chunks/tokens"] == 7
    assert m["teacher/x/chunks/len"] == pytest.approx((2 + 1 + 3 + 1 + 1 + 2 + 1) / 7)
    assert m["teacher/x/aligned/tokens"] == 4


def test_an_objective_not_defined_across_vocabularies_is_refused_naming_the_teacher():
    _, _, batch, logits = _case()
    loss_fn = build_loss_fn({0: [ObjectiveConfig(name=ObjectiveName.aopd)]}, ("x",), tp_group=None, vocab_start=0,
                            vocab_size=V)
    with pytest.raises(ObjectiveError, match="teacher 'x': aopd is not defined for a cross-tokenizer teacher"):
        loss_fn(logits, batch)


def test_map_topk_moves_unmapped_mass_to_the_tail_and_merges_entries_of_one_student_token():
    vm = VocabMap.__new__(VocabMap)  # a hand-made table: the merge case needs two ids of one student token
    vm.table = torch.tensor([5, -1, 5, 2])  # teacher ids 0 and 2 are the same student token
    ids = torch.tensor([[0, 1, 2, 3]])
    lp = torch.log(torch.tensor([[0.4, 0.2, 0.1, 0.05]]))
    tail = torch.log(torch.tensor([0.25]))
    out_ids, out_lp, out_tail = map_topk(ids, lp, tail, vm)
    assert out_ids.tolist() == [[5, 5, 5, 2]]
    torch.testing.assert_close(out_lp.exp(), torch.tensor([[0.5, 0.0, 0.0, 0.05]]))
    torch.testing.assert_close(out_tail.exp(), torch.tensor([0.45]))


def test_a_teacher_subword_maps_to_the_longest_student_token_it_begins_with_so_a_char_student_gets_the_next_char():
    from mopd.data.domain_bpe import train_domain_bpe

    char, bpe = build_char_tokenizer(), train_domain_bpe(["reverse", "caesar"], 64, byte_alphabet=False)
    vm = VocabMap(token_bytes(char, "student"), token_bytes(bpe, "teacher"))
    t = bpe.convert_tokens_to_ids
    s = char.convert_tokens_to_ids
    # Same bytes where the student has them; a merge to its first character (the longest student prefix).
    assert vm(torch.tensor([t("e"), t("ey"), t("rev"), t("rot"), t(":")])).tolist() == [s("e"), s("e"), s("r"), s("r"),
                                                                                       s(":")]
    assert vm(torch.tensor([bpe.eos_token_id])).tolist() == [char.eos_token_id]
    # Specials map by content only (both have <unk> and <pad>), never by prefix.
    assert vm(torch.tensor([bpe.unk_token_id, bpe.pad_token_id])).tolist() == [char.unk_token_id, char.pad_token_id]
    merges = sum(len(p) > 1 and not p.startswith("<") for p in bpe.get_vocab())
    assert (vm.mapped, vm.prefixed) == (len(bpe) - merges, merges)
    # The teacher's next-token top-K, mapped: the char student's target is the teacher's distribution of
    # the next character (float64: p(e) + p(ey) for "e", p(rev) + p(rot) for "r"), the rest in the tail.
    probs = torch.tensor([[0.30, 0.20, 0.15, 0.10, 0.05]], dtype=torch.float64)
    ids = torch.tensor([[t("e"), t("ey"), t("rev"), t("rot"), t("=")]])
    out_ids, out_lp, out_tail = map_topk(ids, probs.log().float(), torch.tensor([math.log(0.20)]), vm)
    mass = {}
    for i, lp in zip(out_ids[0].tolist(), out_lp[0].double().exp().tolist()):
        mass[i] = mass.get(i, 0.0) + lp
    assert mass == pytest.approx({s("e"): 0.50, s("r"): 0.25, s("="): 0.05}, abs=1e-6)
    assert float(out_tail.exp()) == pytest.approx(0.20, abs=1e-6)


# ---------------------------------------------------------------- reduction: the same tokenizer on both sides


def _tiny(tok, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def same_tokenizer_scores():
    tok = build_char_tokenizer()
    student = EmbeddedEngine(_tiny(tok, 0), eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    prompts = [Prompt(index=i, ids=torch.tensor(tok.encode(t)), text=t, domain="d")
               for i, t in enumerate(["rev:abc=", "add:12+34=", "cae:hello="])]
    rollouts = student.generate(prompts, SamplingConfig(temperature=1.0, max_new_tokens=8, seed=1,
                                                        stop_token_ids=list(range(60, 80))))
    engine = EmbeddedEngine(_tiny(tok, 1), eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    cfg = TeacherConfig(name="t", top_k=K, tokenizer="char")
    same = ExpertTeacher(cfg, engine, len(tok)).score(rollouts, K)
    cross = CrossTokenizerTeacher(cfg, engine, tok, build_char_tokenizer()).score(rollouts, K)
    return tok, rollouts, same, cross


def test_a_cross_tokenizer_teacher_with_the_students_tokenizer_returns_the_same_scores(same_tokenizer_scores):
    _, rollouts, same, cross = same_tokenizer_scores
    assert VocabMap(*(token_bytes(build_char_tokenizer(), w) for w in "st")).table.tolist() == list(range(100))
    for r, a, b in zip(rollouts, same, cross):
        assert b.chunks.chunk.tolist() == list(range(r.response_ids.numel()))
        assert b.chunks.teacher_tokens.tolist() == [1] * r.response_ids.numel()
        assert torch.equal(a.topk_ids, b.topk_ids)
        torch.testing.assert_close(a.topk_logprobs.float(), b.topk_logprobs, rtol=0, atol=0)
        torch.testing.assert_close(a.sampled_logprob, b.sampled_logprob, rtol=0, atol=0)
        torch.testing.assert_close(a.tail_logmass, b.tail_logmass, rtol=0, atol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name.value}{'-is-clip' if c.importance_ratio else ''}")
def test_each_cross_objective_reduces_to_the_same_tokenizer_objective(same_tokenizer_scores, cfg):
    tok, rollouts, same, cross = same_tokenizer_scores
    n = sum(r.response_ids.numel() for r in rollouts)
    routing = Routing(("t",), torch.zeros(n, dtype=torch.long))
    plain = build_train_batches(rollouts, TeacherScores.concat(same), routing, 3, pad_id=0)[0]
    chunked = build_train_batches(rollouts, TeacherScores.concat(cross), routing, 3, pad_id=0)[0]
    assert plain.chunk_index is None and chunked.chunk_index is not None
    logits = torch.randn(*plain.tokens.shape, len(tok), generator=torch.Generator().manual_seed(2))
    same_cfg = cfg if cfg.name != ObjectiveName.uld else ObjectiveConfig(name=ObjectiveName.forward_kl_topk, coef=0.0)
    loss_fn = build_loss_fn({0: [cfg]}, ("t",), tp_group=None, vocab_start=0, vocab_size=len(tok))
    ref_fn = build_loss_fn({0: [same_cfg]}, ("t",), tp_group=None, vocab_start=0, vocab_size=len(tok))
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    loss_a, _ = loss_fn(a, chunked)
    loss_b, _ = ref_fn(b, plain)
    if cfg.name == ObjectiveName.uld:  # no chunk is wider than one token: the term has nothing to act on
        assert float(loss_a) == 0.0
        return
    (loss_a + 0 * a.sum()).backward()
    (loss_b + 0 * b.sum()).backward()
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-6, abs=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
