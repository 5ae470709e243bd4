"""PI self-teacher: privileged context that helps, scores re-aligned to the student's response
positions (checked against a direct forward pass), the EMA weight stream, and bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mopd.config import TeacherConfig, TeacherKind
from mopd.data.tokenizer import build_char_tokenizer
from mopd.errors import TeacherError
from mopd.rollout.embedded import EmbeddedEngine
from mopd.teachers import SelfPITeacher, build_train_batches
from mopd.teachers.in_trainer import build_teacher_inputs
from mopd.types import Rollout, Routing, TeacherScores

LETTERS = "abcdefgh"
TEMPLATE = "{pi}\n\n{prompt}"
K = 8


def tiny_llama(tok, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def copy_example(tok, gen: torch.Generator) -> tuple[str, list[int], list[int]]:
    """(answer, privileged context "<bos>abc\\n\\nQ:", response "abc<eos>") for a random 3-letter answer."""
    answer = "".join(LETTERS[i] for i in torch.randint(0, len(LETTERS), (3,), generator=gen).tolist())
    context = tok.encode(TEMPLATE.format(pi=answer, prompt="Q:"))
    return answer, context, tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def copier(tok) -> LlamaForCausalLM:
    """A tiny Llama trained on the spot (60 AdamW steps, ~1 s) to copy the answer shown in its context."""
    model = tiny_llama(tok)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        batch = [copy_example(tok, gen) for _ in range(64)]
        ids = torch.tensor([c + r for _, c, r in batch])
        labels = ids.clone()
        labels[:, : len(batch[0][1])] = -100  # learn the response only
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2, f"the copy task did not train (loss {loss.item():.3f})"
    return model.eval()


def rollout(tok, answer: str, response: list[int], index: int, pi: str | None) -> Rollout:
    return Rollout(
        prompt_ids=torch.tensor(tok.encode("Q:")), response_ids=torch.tensor(response),
        behaviour_logprobs=torch.zeros(len(response)), finish="stop", weight_version=0, domain="copy",
        prompt_index=index, pi=pi,
    )


def engine(model, tok) -> EmbeddedEngine:
    return EmbeddedEngine(model, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, name="self")


def self_teacher(model, tok, **kw) -> SelfPITeacher:
    cfg = TeacherConfig(name="self", kind=TeacherKind.self_pi, pi_template=TEMPLATE, **kw)
    return SelfPITeacher(cfg, engine(model, tok), tok)


def test_with_the_answer_in_its_context_the_self_teacher_gives_the_response_more_probability_than_the_student(
    tok, copier
):
    gen = torch.Generator().manual_seed(7)
    examples = [copy_example(tok, gen) for _ in range(12)]
    rollouts = [rollout(tok, a, resp, i, pi=a) for i, (a, _, resp) in enumerate(examples)]
    teacher_scores = self_teacher(copier, tok).score(rollouts, K)
    with torch.no_grad():
        student = torch.stack([
            torch.log_softmax(copier(input_ids=torch.cat([r.prompt_ids, r.response_ids])[None]).logits[0], -1)[
                torch.arange(2, 6), r.response_ids]
            for r in rollouts
        ])  # [12, 4]: position P-1+t predicts response token t (P = 3)
    teacher = torch.stack([s.sampled_logprob for s in teacher_scores])
    # The 3 answer letters: the student can only guess (at best log 1/8 each); the teacher copies.
    assert teacher[:, :3].mean() > -0.3
    assert student[:, :3].mean() < -1.0
    assert (teacher[:, :3].sum(1) > student[:, :3].sum(1) + 3.0).all()


def test_self_teacher_scores_sit_at_the_student_response_positions_as_a_direct_forward_pass_says(tok, copier):
    gen = torch.Generator().manual_seed(11)
    examples = [copy_example(tok, gen) for _ in range(3)]
    # Ragged responses: the second drops its EOS, the third is a (wrong) 5-token response.
    responses = [examples[0][2], examples[1][2][:-1], tok.encode("hgfed", add_special_tokens=False)]
    rollouts = [rollout(tok, a, resp, i, pi=a) for i, ((a, _, _), resp) in enumerate(zip(examples, responses))]
    teacher = self_teacher(copier, tok)
    got = teacher.score(rollouts, K)
    for (answer, context, _), r, s in zip(examples, rollouts, got):
        assert teacher.context(r).tolist() == context  # splicing ids == tokenising the whole template
        ids = torch.tensor(context + r.response_ids.tolist())
        with torch.no_grad():
            logp = torch.log_softmax(copier(input_ids=ids[None]).logits[0].double(), -1)
        for t in range(r.response_ids.numel()):
            row = logp[len(context) - 1 + t]
            ref_lp, ref_ids = row.topk(K)
            assert s.topk_ids[t].tolist() == ref_ids.tolist(), f"position {t}"
            assert torch.allclose(s.topk_logprobs[t].double(), ref_lp, atol=1e-5), f"position {t}"
            assert s.sampled_logprob[t].item() == pytest.approx(row[r.response_ids[t]].item(), abs=1e-5)
            tail = torch.log1p(-ref_lp.exp().sum())
            assert s.tail_logmass[t].item() == pytest.approx(tail.item(), abs=1e-4)


def test_a_template_with_text_after_the_prompt_splices_the_prompt_ids_unchanged(tok, copier):
    cfg = TeacherConfig(name="self", kind=TeacherKind.self_pi, pi_template="Hint: {pi}\n{prompt} (hint {pi})")
    teacher = SelfPITeacher(cfg, engine(copier, tok), tok)
    r = rollout(tok, "abc", tok.encode("abc", add_special_tokens=False), 0, pi="abc")
    expect = tok.encode("Hint: abc\nQ: (hint abc)")
    assert teacher.context(r).tolist() == expect
    (req,) = teacher.requests([r])
    assert req.response_start == len(expect) and req.ids[len(expect):].tolist() == r.response_ids.tolist()


def test_ema_self_teacher_streams_the_decayed_average_of_the_student_weights_into_its_engine(tok):
    initial = tiny_llama(tok, seed=0)
    init_state = {k: v.clone() for k, v in initial.state_dict().items()}
    cfg = TeacherConfig(name="ema", kind=TeacherKind.self_pi, ema_decay=0.75)
    eng = engine(tiny_llama(tok, seed=0), tok)
    teacher = SelfPITeacher(cfg, eng, tok, initial_weights=init_state.items())
    assert teacher.tracks_student
    name = "model.layers.0.mlp.up_proj.weight"
    s1 = {k: v + 0.1 * torch.randn_like(v) for k, v in init_state.items() if k.startswith("model.layers.0.")}
    s2 = {k: v - 0.2 for k, v in s1.items()}
    teacher.update_weights(s1.items(), version=1)
    teacher.update_weights(iter(s2.items()), version=2)
    expect = 0.75**2 * init_state[name].double() + 0.75 * 0.25 * s1[name].double() + 0.25 * s2[name].double()
    got = eng.model.state_dict()[name]
    assert torch.allclose(got.double(), expect, atol=1e-6)
    untouched = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(eng.model.state_dict()[untouched], init_state[untouched])
    assert eng.health().weight_version == 2
    with pytest.raises(TeacherError, match="'ema': streamed tensor 'bogus.weight' is not in the EMA shadow"):
        teacher.update_weights(iter([("bogus.weight", torch.zeros(1))]), version=3)
    # Resume: a fresh teacher on a fresh engine restores the shadow and continues the same average.
    eng2 = engine(tiny_llama(tok, seed=5), tok)
    resumed = SelfPITeacher(cfg, eng2, tok)
    resumed.load_ema_state(teacher.ema_state(), version=2)
    assert torch.allclose(eng2.model.state_dict()[name].double(), expect, atol=1e-6)
    resumed.update_weights(iter(s1.items()), version=3)
    teacher.update_weights(iter(s1.items()), version=3)
    assert torch.equal(eng2.model.state_dict()[name], eng.model.state_dict()[name])


def test_frozen_self_teacher_refuses_weight_updates_and_prompts_without_pi(tok, copier):
    teacher = self_teacher(copier, tok)
    assert not teacher.tracks_student
    with pytest.raises(TeacherError, match="frozen"):
        teacher.update_weights(iter([]), version=1)
    r = rollout(tok, "abc", tok.encode("abc", add_special_tokens=False), 42, pi=None)
    with pytest.raises(TeacherError, match="prompt 42 .* has no PI text"):
        teacher.score([r], K)


def test_a_template_without_a_prompt_slot_is_refused(tok, copier):
    cfg = TeacherConfig(name="self", kind=TeacherKind.self_pi, pi_template="{pi} only")
    with pytest.raises(TeacherError, match="exactly one \\{prompt\\}"):
        SelfPITeacher(cfg, engine(copier, tok), tok)


def test_in_trainer_inputs_put_the_self_teachers_logits_on_the_student_positions(tok, copier):
    gen = torch.Generator().manual_seed(5)
    examples = [copy_example(tok, gen) for _ in range(5)]
    responses = [resp[: 2 + i % 3] for i, (_, _, resp) in enumerate(examples)]  # ragged: 2..4 tokens
    pairs = enumerate(zip(examples, responses))
    rollouts = [rollout(tok, a, resp, i, pi=a * (1 + i % 2)) for i, ((a, _, _), resp) in pairs]  # PI lengths differ
    teacher = self_teacher(copier, tok)
    scores = TeacherScores.concat(teacher.score(rollouts, K))
    routing = Routing(teachers=("self",), index=torch.zeros(scores.num_tokens, dtype=torch.int64))
    batches = build_train_batches(rollouts, scores, routing, micro_batch_size=2, pad_id=tok.pad_token_id)
    inputs = build_teacher_inputs(rollouts, teacher, 2, tok.pad_token_id, batches[0].tokens.shape[1], pad_to_multiple=8)
    assert len(inputs) == len(batches) == 3 and inputs[0].tokens.shape[1] % 8 == 0
    for batch, ti in zip(batches, inputs):
        with torch.no_grad():  # right padding: causal attention never lets a real position see a pad
            aligned = ti.align(copier(input_ids=ti.tokens).logits.double())
        logp = torch.log_softmax(aligned, -1)
        mask = batch.loss_mask.bool()
        ref = logp.gather(-1, batch.targets[..., None])[..., 0]
        assert torch.allclose(batch.sampled_logprob[mask].double(), ref[mask], atol=1e-5)
        assert logp[mask].topk(K).indices.tolist() == batch.topk_ids[mask].tolist()
