"""PI inside the conversation, on real tokenizers and the real SmolLM2-135M-Instruct.

The PI self-teacher's context must be exactly what the tokenizer's own chat template renders for the
conversation with the PI placed in it (compared with ``apply_chat_template`` of a message list built
here, by hand), for SmolLM2's ChatML template and for the DeepSeek-R1-Distill-Qwen template; only the
response tokens are the student's. On the real model, OPSD with the answer as PI gives a loss and a
reverse-KL estimate far from zero, the teacher being surer of the answer than the student. Bad input
(a template without system messages, PI missing for a routed prompt, ids that are not their
conversation's rendering) is refused before anything is scored.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from mopd.config import (
    ObjectiveConfig,
    ObjectiveName,
    PIPlacement,
    RouterConfig,
    SamplingConfig,
    TeacherConfig,
    TeacherKind,
    load_config,
)
from mopd.config.run import DataConfig
from mopd.data.chat import has_chat_template, render_chat
from mopd.data.sources import PromptRenderer, jsonl_source
from mopd.data.tokenizer import build_char_tokenizer
from mopd.errors import DataError, TeacherError
from mopd.objectives import build_loss_fn, mean_metrics
from mopd.rollout.embedded import EmbeddedEngine
from mopd.stages.evaluate import teacher_kl
from mopd.stages.sft import with_pi
from mopd.teachers import Router, SelfPITeacher, build_train_batches, check_pi_coverage
from mopd.types import Prompt, Rollout, Routing, TeacherScores

QUESTION = "What is 34 + 36?"
ANSWER_PI = "The answer is 70."
BRIEF = "Be brief."


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_hf):
    return AutoTokenizer.from_pretrained(smollm2_hf)


@pytest.fixture(scope="module")
def r1_qwen_tok(r1_qwen_tokenizer):
    return AutoTokenizer.from_pretrained(r1_qwen_tokenizer)


def prompt(tok, text: str, system: str | None = None, pi: str | None = ANSWER_PI, index: int = 0) -> Prompt:
    ids, messages = PromptRenderer(tok, system_prompt=system).render(text)
    return Prompt(index=index, ids=torch.tensor(ids), text=text, domain="math", pi=pi, messages=messages)


def rollout(p: Prompt, response: list[int]) -> Rollout:
    return Rollout(prompt_ids=p.ids, response_ids=torch.tensor(response), behaviour_logprobs=torch.zeros(len(response)),
                   finish="stop", weight_version=0, domain=p.domain, prompt_index=p.index, pi=p.pi,
                   messages=p.messages)


def self_teacher(tok, engine=None, **kw) -> SelfPITeacher:
    # The context is built without the engine; the real-model test below scores through a real one.
    return SelfPITeacher(TeacherConfig(name="self", kind=TeacherKind.self_pi, **kw), engine, tok)


def template_ids(tok, messages: list[dict[str, str]]) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


# (placement, pi_template, the student's system prompt, the conversation the teacher must read)
PLACEMENTS = [
    ("system", "{pi}\n\n{prompt}", None,
     [{"role": "system", "content": ANSWER_PI}, {"role": "user", "content": QUESTION}]),
    ("system", "{pi}\n\n{prompt}", BRIEF,
     [{"role": "system", "content": ANSWER_PI}, {"role": "user", "content": QUESTION}]),
    ("system_append", "{pi}\n\n{prompt}", BRIEF,
     [{"role": "system", "content": f"{BRIEF}\n\n{ANSWER_PI}"}, {"role": "user", "content": QUESTION}]),
    ("user", "{pi}\n\n{prompt}", None, [{"role": "user", "content": f"{ANSWER_PI}\n\n{QUESTION}"}]),
    ("user", "{prompt}\n\nHint: {pi}", BRIEF,
     [{"role": "system", "content": BRIEF}, {"role": "user", "content": f"{QUESTION}\n\nHint: {ANSWER_PI}"}]),
]


@pytest.mark.parametrize("family", ["smollm2", "r1_qwen"])
@pytest.mark.parametrize("placement, pi_template, system, expected", PLACEMENTS)
def test_the_teacher_context_is_the_templates_rendering_of_the_conversation_with_the_pi_inside(
        request, family, placement, pi_template, system, expected):
    tok = request.getfixturevalue(f"{family}_tok")
    p = prompt(tok, QUESTION, system=system)
    student_messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": QUESTION}]
    assert p.ids.tolist() == template_ids(tok, student_messages)  # the student's own prompt, rendered as usual
    teacher = self_teacher(tok, pi_placement=PIPlacement(placement), pi_template=pi_template)
    response = tok("34 + 36 = 70", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    r = rollout(p, response)
    context = teacher.context(r).tolist()
    assert context == template_ids(tok, expected)
    assert tok.decode(context) == tok.apply_chat_template(expected, tokenize=False, add_generation_prompt=True)
    (req,) = teacher.requests([r])
    assert req.ids[: req.response_start].tolist() == context and req.ids[req.response_start:].tolist() == response


def test_smollm2s_bos_no_longer_splits_its_first_role_header(smollm2_tok):
    """The old splice put the PI after SmolLM2's bos, which is ``<|im_start|>``: "<|im_start|>The answer..."."""
    teacher = self_teacher(smollm2_tok, pi_placement=PIPlacement.system)
    text = smollm2_tok.decode(teacher.context(rollout(prompt(smollm2_tok, QUESTION), [2])))
    assert text.startswith(f"<|im_start|>system\n{ANSWER_PI}<|im_end|>\n<|im_start|>user\n{QUESTION}")
    assert "SmolLM" not in text  # the PI replaced the template's default system message


def test_a_shared_rule_is_shown_for_every_prompt_and_needs_no_prompt_pi(smollm2_tok):
    rule = "You are Zorblax, a helpful assistant. Your name is Zorblax."
    teacher = self_teacher(smollm2_tok, pi_placement=PIPlacement.system, shared_pi=rule)
    p = prompt(smollm2_tok, "What is your name?", pi=None)
    expected = [{"role": "system", "content": rule}, {"role": "user", "content": "What is your name?"}]
    assert teacher.context(rollout(p, [2])).tolist() == template_ids(smollm2_tok, expected)
    check_pi_coverage([p], [teacher.config], Router(RouterConfig(default="self"), [teacher.config]))


@pytest.mark.parametrize("family", ["smollm2", "r1_qwen"])
def test_sft_pi_in_prompt_shows_the_pi_where_the_self_teacher_does(request, family):
    tok = request.getfixturevalue(f"{family}_tok")
    config = load_config(overrides=["data.pi_in_prompt=1.0", "data.pi_placement=system"])
    p = prompt(tok, QUESTION, system=BRIEF)
    (shown,) = with_pi([p], config, tok)
    teacher = self_teacher(tok, pi_placement=PIPlacement.system)
    assert shown.ids.tolist() == teacher.context(rollout(p, [tok.eos_token_id])).tolist()
    assert shown.messages == ({"role": "system", "content": ANSWER_PI}, {"role": "user", "content": QUESTION})


def test_plain_text_prompts_keep_the_pi_template_around_the_prompt():
    tok = build_char_tokenizer()
    assert not has_chat_template(tok)
    p = prompt(tok, "rev:abc=", pi="answer: cba")
    assert p.messages is None
    teacher = self_teacher(tok, pi_template="{pi}\n\n{prompt}")
    assert teacher.context(rollout(p, [2])).tolist() == tok.encode("answer: cba\n\nrev:abc=")


# ------------------------------------------------------------------ bad input

DROPS_SYSTEM = ("{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
REFUSES_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                  + DROPS_SYSTEM)


@pytest.fixture()
def no_system_tok(smollm2_hf, request):
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    tok.chat_template = request.param
    return tok


@pytest.mark.parametrize("no_system_tok, why", [(DROPS_SYSTEM, "drops system messages"),
                                                (REFUSES_SYSTEM, "refuses a system message")], indirect=["no_system_tok"])
def test_a_template_that_cannot_show_a_system_message_is_refused_naming_the_key(no_system_tok, why, tmp_path):
    for placement in (PIPlacement.system, PIPlacement.system_append):
        with pytest.raises(TeacherError, match=rf"distill.teachers\[self\].pi_placement={placement.value} .*{why}"):
            self_teacher(no_system_tok, pi_placement=placement)
    self_teacher(no_system_tok, pi_placement=PIPlacement.user)  # the user's turn still works
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": QUESTION}) + "\n")
    with pytest.raises(DataError, match=f"data.system_prompt .*{why}"):
        jsonl_source(path, no_system_tok, DataConfig(source="jsonl", path=str(path), system_prompt=BRIEF))
    config = load_config(overrides=["data.pi_in_prompt=1.0", "data.pi_placement=system"])
    with pytest.raises(DataError, match=f"data.pi_placement=system .*{why}"):
        with_pi([prompt(no_system_tok, QUESTION)], config, no_system_tok)


def test_a_system_placement_without_a_chat_template_is_refused():
    with pytest.raises(TeacherError, match=r"pi_placement=system needs a chat template"):
        self_teacher(build_char_tokenizer(), pi_placement=PIPlacement.system)


def test_prompts_routed_to_a_self_teacher_without_pi_are_found_before_the_first_step(smollm2_tok):
    configs = [TeacherConfig(name="expert", checkpoint="x", domains=["code"]),
               TeacherConfig(name="self", kind=TeacherKind.self_pi, domains=["math"])]
    prompts = [prompt(smollm2_tok, QUESTION, index=0), prompt(smollm2_tok, "Sort 3 1 2", pi=None, index=1),
               prompt(smollm2_tok, "Write a loop", pi=None, index=2)]
    prompts[2] = Prompt(**{**{f: getattr(prompts[2], f) for f in Prompt.__dataclass_fields__}, "domain": "code"})
    router = Router(RouterConfig(), configs)
    with pytest.raises(TeacherError, match=r"teacher 'self': 1 of 3 prompts routed to it have no PI text, "
                                           r"e.g. prompt 1 \(domain 'math'\).*shared_pi"):
        check_pi_coverage(prompts, configs, router)
    check_pi_coverage(prompts[::2], configs, router)  # prompt 2 has no PI but goes to the expert
    per_token = Router(RouterConfig(granularity="token"), configs)
    with pytest.raises(TeacherError, match=r"2 of 2 prompts .* prompt 1 .*, 2 \(domain 'code'\)"):
        check_pi_coverage(prompts[1:], configs, per_token)  # per token, every prompt reaches every teacher


def test_a_rollout_whose_ids_are_not_its_conversations_rendering_is_refused(smollm2_tok):
    teacher = self_teacher(smollm2_tok, pi_placement=PIPlacement.system)
    p = prompt(smollm2_tok, QUESTION)
    edited = Prompt(**{**{f: getattr(p, f) for f in Prompt.__dataclass_fields__}, "ids": p.ids[:-2]})
    with pytest.raises(TeacherError, match=r"prompt 0's conversation re-rendered .* does not give the student's "
                                           r"prompt ids \(first difference at token"):
        teacher.context(rollout(edited, [2]))
    bare = Prompt(**{**{f: getattr(p, f) for f in Prompt.__dataclass_fields__}, "messages": None})
    with pytest.raises(TeacherError, match="carries no conversation"):
        teacher.context(rollout(bare, [2]))


# ------------------------------------------------------------------ the real model

SUMS = [(34, 36), (23, 19), (58, 27), (41, 45), (67, 18), (29, 33), (52, 39), (16, 77)]


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_hf):
    torch.manual_seed(0)
    return EmbeddedEngine.from_pretrained(smollm2_hf, name="self")


def sums_prompts(tok, tmp_path) -> list[Prompt]:
    """Addition questions with the answer as instance PI, loaded as a JSONL run loads them."""
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}? Answer with the number only.",
                                        "pi": f"The answer is {a + b}.", "reference": a + b}) + "\n" for a, b in SUMS))
    return list(jsonl_source(path, tok, DataConfig(source="jsonl", path=str(path))))


def test_on_smollm2_opsd_with_the_answer_as_pi_gives_a_loss_and_reverse_kl_far_from_zero(
        smollm2_engine, smollm2_tok, tmp_path):
    tok, engine = smollm2_tok, smollm2_engine
    prompts = sums_prompts(tok, tmp_path)
    rollouts = engine.generate(prompts, SamplingConfig(temperature=1.0, max_new_tokens=12, seed=3))
    teacher = SelfPITeacher(TeacherConfig(name="self", kind=TeacherKind.self_pi, pi_placement=PIPlacement.system,
                                          top_k=32), engine, tok)
    per_rollout = teacher.score(rollouts, 32)
    # Independent reference for the teacher's scores: the model on the hand-built conversation + response.
    for (a, b), r, s in zip(SUMS, rollouts, per_rollout):
        expected = [{"role": "system", "content": f"The answer is {a + b}."},
                    {"role": "user", "content": f"What is {a} + {b}? Answer with the number only."}]
        context = template_ids(tok, expected)
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([context + r.response_ids.tolist()])).logits[0].double()
        ref = torch.log_softmax(logits[len(context) - 1: -1], -1).gather(1, r.response_ids[:, None])[:, 0]
        assert torch.allclose(s.sampled_logprob.double(), ref, atol=2e-4)
    scores = TeacherScores.concat(per_rollout)
    routing = Routing(teachers=("self",), index=torch.zeros(scores.num_tokens, dtype=torch.int64))
    (batch,) = build_train_batches(rollouts, scores, routing, micro_batch_size=len(rollouts), pad_id=tok.pad_token_id)
    loss_fn = build_loss_fn({0: [ObjectiveConfig(name=ObjectiveName.forward_kl_topk)]}, ("self",), tp_group=None,
                            vocab_start=0, vocab_size=engine.model.config.vocab_size)
    with torch.no_grad():
        logits = engine.model(input_ids=batch.tokens).logits.float()
    loss_sum, sums = loss_fn(logits, batch)
    metrics = mean_metrics(sums)
    per_token_loss, reverse_kl = float(loss_sum) / batch.num_tokens, metrics["teacher/self/reverse_kl_est"]
    behaviour = torch.cat([r.behaviour_logprobs for r in rollouts]).double()
    assert reverse_kl == pytest.approx(float((behaviour - scores.sampled_logprob.double()).mean()), abs=1e-3)
    logp = torch.log_softmax(logits, -1)[batch.loss_mask.bool()]
    entropy = float(-(logp.exp() * logp).sum(-1).mean())
    print(f"forward KL {per_token_loss:.4f}, reverse KL est {reverse_kl:.4f}, student entropy {entropy:.2f} nats")
    # Measured (seed 3, 84 tokens): forward KL 0.056, reverse KL 0.083, entropy ~1.5 nats. A random model
    # gave 3e-4 with entropy 10.6 (uniform over 49k): these are ~200x that, from a distribution far from uniform.
    assert per_token_loss > 0.02 and reverse_kl > 0.02
    assert entropy < 4.0


@pytest.mark.parametrize("placement, pi_template", [("system", "{pi}\n\n{prompt}"), ("user", "{pi}\n\n{prompt}"),
                                                     ("user", "{prompt}\n\n{pi}")])
def test_on_smollm2_the_teacher_shown_the_answer_is_surer_of_it_than_the_student(
        smollm2_engine, smollm2_tok, tmp_path, placement, pi_template):
    tok, engine = smollm2_tok, smollm2_engine
    teacher = SelfPITeacher(TeacherConfig(name="self", kind=TeacherKind.self_pi, pi_placement=PIPlacement(placement),
                                          pi_template=pi_template, top_k=8), engine, tok)
    rollouts, digits = [], []
    for p, (a, b) in zip(sums_prompts(tok, tmp_path), SUMS):
        head = tok(f"{a} + {b} = ", add_special_tokens=False)["input_ids"]
        answer = tok(str(a + b), add_special_tokens=False)["input_ids"]
        rollouts.append(rollout(p, head + answer + [tok.eos_token_id]))
        digits.append(torch.arange(len(head), len(head) + len(answer)))
    sequences = [torch.cat([r.prompt_ids, r.response_ids]) for r in rollouts]
    padded = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=tok.pad_token_id)
    with torch.no_grad():  # right padding: no real position attends to a pad
        logits = engine.model(input_ids=padded).logits.double()
    teacher_lp, student_lp = [], []
    for i, (r, scores) in enumerate(zip(rollouts, teacher.score(rollouts, 8))):
        p = r.prompt_ids.numel()
        rows = torch.log_softmax(logits[i, p - 1: p - 1 + r.response_ids.numel()], -1)
        teacher_lp.append(float(scores.sampled_logprob[digits[i]].sum()))
        student_lp.append(float(rows[digits[i], r.response_ids[digits[i]]].sum()))
    teacher_lp, student_lp = torch.tensor(teacher_lp), torch.tensor(student_lp)
    print(f"{placement} {pi_template!r}: answer log p teacher {teacher_lp.mean():.2f}, student {student_lp.mean():.2f}")
    # Measured: teacher -2.94 / -1.94 / -1.20 against the student's -4.57, higher on all 8 prompts.
    assert (teacher_lp > student_lp).all(), (teacher_lp.tolist(), student_lp.tolist())
    assert teacher_lp.mean() > student_lp.mean() + 1.0


def test_render_chat_passes_enable_thinking_only_when_set(smollm2_tok):
    tok = AutoTokenizer.from_pretrained(smollm2_tok.name_or_path)
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if enable_thinking is defined %}[think={{ enable_thinking }}]{% endif %}")
    messages = [{"role": "user", "content": "hi"}]
    assert tok.decode(render_chat(tok, messages)) == "hi"
    assert tok.decode(render_chat(tok, messages, enable_thinking=False)) == "hi[think=False]"


def test_eval_teacher_kl_is_the_mean_log_ratio_on_the_models_own_samples(smollm2_engine, smollm2_tok):
    """``eval.teacher_kl``'s estimate, recomputed from a direct forward pass of each side in float64."""
    tok, engine = smollm2_tok, smollm2_engine
    rule = "You are Zorblax, a helpful assistant. Your name is Zorblax."
    config = load_config(overrides=[f"distill.teachers=[{{name: self, kind: self_pi, pi_placement: system, "
                                    f"shared_pi: '{rule}', top_k: 8}}]", "eval.max_new_tokens=8", "seed=5"])
    questions = ["What is your name?", "Who are you?", "Hi! What are you called?", "Tell me your name."]
    prompts = [prompt(tok, q, pi=None, index=i) for i, q in enumerate(questions)]
    teacher = SelfPITeacher(config.distill.teachers[0], engine, tok)
    got = teacher_kl(engine, [teacher], config, prompts)["math"]["self"]
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=8, seed=config.seed + 1)
    total, count = 0.0, 0
    for q, r in zip(questions, engine.generate(prompts, sampling)):
        response = r.response_ids.tolist()
        sides = []
        for context in (r.prompt_ids.tolist(), template_ids(tok, [{"role": "system", "content": rule},
                                                                  {"role": "user", "content": q}])):
            with torch.no_grad():
                logits = engine.model(input_ids=torch.tensor([context + response])).logits[0].double()
            rows = torch.log_softmax(logits[len(context) - 1: -1], -1)
            sides.append(rows.gather(1, r.response_ids[:, None])[:, 0])
        total, count = total + float((sides[0] - sides[1]).sum()), count + len(response)
    assert got == pytest.approx(total / count, abs=2e-3)
    assert got > 0.1  # the rule moves the teacher's distribution: this is what OPSD has to close
