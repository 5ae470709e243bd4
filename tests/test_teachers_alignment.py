"""Cross-tokenizer alignment on real tokenizers (SmolLM2's 49,152-entry BPE, DeepSeek-R1-Distill-Qwen's
152k BPE, mopd's char tokenizer): every chunk's bytes equal on both sides, special tokens never cross as
text, the conversation is re-rendered with the teacher's own chat template, and bad input is refused
naming the teacher and the rollout."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from mopd.config import TeacherConfig
from mopd.data.chat import render_chat
from mopd.data.tokenizer import build_char_tokenizer
from mopd.errors import TeacherError
from mopd.teachers.alignment import align_pieces
from mopd.teachers.build import configured_tokenizer
from mopd.teachers.cross import CrossTokenizerTeacher
from mopd.types import Rollout, TeacherScores

sys.path.insert(0, str(Path(__file__).parent))
from real_models import r1_qwen_tokenizer_dir, smollm2_hf_dir  # noqa: E402

PROSE = ("Beautiful is better than ugly. Explicit is better than implicit.\n  Simple is better than complex; "
         "don't you think so? \"Readability counts,\" they said.\n\n")
NUMERICS = "12345 + 678 = 13023. 3.14159 * 2 = 6.28318; 1,000,000 / 8 = 125000.\n"
UNICODE = "Café naïve — 日本語のテキスト 😀 ok"


@pytest.fixture(scope="module")
def toks():
    return {"smollm2": AutoTokenizer.from_pretrained(smollm2_hf_dir()),
            "r1_qwen": AutoTokenizer.from_pretrained(r1_qwen_tokenizer_dir()),
            "char": build_char_tokenizer()}


PAIRS = [("smollm2", "r1_qwen"), ("r1_qwen", "smollm2"), ("smollm2", "char"), ("char", "smollm2"),
         ("r1_qwen", "char"), ("char", "r1_qwen")]


_TEACHERS: dict[tuple[str, str], CrossTokenizerTeacher] = {}


def teacher_of(toks, student: str, teacher: str) -> CrossTokenizerTeacher:
    """A cross-tokenizer teacher without an engine (alignment needs none), built once per pair."""
    if (student, teacher) not in _TEACHERS:
        cfg = TeacherConfig(name=f"{teacher}_expert", top_k=8, tokenizer="x")
        _TEACHERS[student, teacher] = CrossTokenizerTeacher(cfg, engine=None, student_tokenizer=toks[student],
                                                            teacher_tokenizer=toks[teacher])
    return _TEACHERS[student, teacher]


def rollout(ids: list[int], finish: str = "stop", messages=None, prompt_ids=(1, 2)) -> Rollout:
    return Rollout(prompt_ids=torch.tensor(prompt_ids), response_ids=torch.tensor(ids, dtype=torch.long),
                   behaviour_logprobs=torch.zeros(len(ids)), finish=finish, weight_version=0, domain="d",
                   prompt_index=7, messages=messages)


def check_chunks(t: CrossTokenizerTeacher, r: Rollout, teacher_ids: list[int], alignment) -> None:
    """Every chunk covers the same bytes on both sides, chunks tile the scored tokens in order."""
    s_ids = r.response_ids.tolist()
    prev_s = prev_t = 0
    for s0, s1, t0, t1 in alignment.chunks:
        assert (s0, t0) == (prev_s, prev_t) and s1 > s0 and t1 > t0
        s_bytes = t.student_bytes.join(s_ids[s0:s1])
        t_bytes = t.teacher_bytes.join(teacher_ids[t0:t1])
        specials = [i for i in s_ids[s0:s1] if i in t.student_bytes.special]
        if specials:  # a special token is its own 1:1 chunk with the teacher's counterpart, never text
            assert s1 - s0 == 1 and t1 - t0 == 1 and teacher_ids[t0] in t.teacher_bytes.special
        else:
            assert s_bytes == t_bytes
            assert not any(i in t.teacher_bytes.special for i in teacher_ids[t0:t1])
        prev_s, prev_t = s1, t1
    if alignment.cut is None:
        assert prev_t == len(teacher_ids)
    else:  # the teacher's last token is the probe after the scored text, its EOS
        assert alignment.cut == prev_s and prev_t == len(teacher_ids) - 1
        assert teacher_ids[-1] == t.teacher_bytes.eos_id


def noncanonical(tok, text: str) -> list[int]:
    """The student sampling its text in small pieces (each word split in two), as on-policy students do."""
    out: list[int] = []
    for word in text.split(" "):
        for part in (word[: len(word) // 2], word[len(word) // 2:]):
            if part:
                out += tok(part, add_special_tokens=False)["input_ids"]
        out += tok(" ", add_special_tokens=False)["input_ids"]
    return out[:-1]


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_every_chunk_holds_the_same_bytes_on_both_sides_for_real_tokenizer_pairs(toks, student, teacher):
    t = teacher_of(toks, student, teacher)
    s_tok = toks[student]
    texts = [PROSE, NUMERICS] + ([UNICODE] if "char" not in (student, teacher) else [])
    for text in texts:
        for ids in (s_tok(text, add_special_tokens=False)["input_ids"], noncanonical(s_tok, text)):
            r = rollout(ids + [s_tok.eos_token_id])
            teacher_ids, alignment = t._response(r)
            check_chunks(t, r, teacher_ids, alignment)
            assert alignment.chunks[-1][0] == len(ids)  # the EOS is scored, as the teacher's EOS
            assert teacher_ids[-1] == toks[teacher].eos_token_id
            assert (alignment.student_chunk() >= 0).all()
            assert t.teacher_bytes.join(teacher_ids[:-1]).decode() == s_tok.decode(ids)


def test_a_response_cut_inside_a_character_is_scored_up_to_the_last_whole_character(toks):
    t = teacher_of(toks, "smollm2", "r1_qwen")
    ids = toks["smollm2"]("ok 日本語", add_special_tokens=False)["input_ids"]
    pieces = [t.student_bytes.pieces[i] for i in ids]
    cut = next(k for k in range(1, len(ids)) if not _valid(b"".join(pieces[:k])))
    r = rollout(ids[:cut], finish="length")
    teacher_ids, alignment = t._response(r)
    chunk = alignment.student_chunk()
    whole = max(k for k in range(cut + 1) if _valid(b"".join(pieces[:k])))
    assert (chunk[:whole] >= 0).all() and alignment.cut == whole < cut and unread_after(chunk, whole)
    assert t.teacher_bytes.join(teacher_ids[:-1]) == b"".join(pieces[:whole])
    check_chunks(t, r, teacher_ids, alignment)


def unread_after(chunk: torch.Tensor, cut: int) -> bool:
    """From the cut token on, each student token is a chunk of its own."""
    return chunk[cut:].tolist() == list(range(int(chunk[cut]), int(chunk[cut]) + len(chunk) - cut))


def _valid(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_byte_pieces_that_are_not_utf8_alone_and_leading_spaces_align_exactly():
    chunks = align_pieces([b" caf", b"\xc3", b"\xa9", b" x"], [b" ", b"caf\xc3\xa9", b" x"])
    assert chunks == [(0, 3, 0, 2), (3, 4, 2, 3)]
    assert align_pieces([b"", b"ab"], [b"a", b"b", b""]) == [(0, 2, 0, 3)]


def test_special_tokens_never_cross_as_text(toks):
    t = teacher_of(toks, "smollm2", "r1_qwen")
    smol = toks["smollm2"]
    # The student wrote the characters "<|im_end|>" as text: the teacher reads them as text.
    as_text = smol("say <|im_end|> here", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    teacher_ids, alignment = t._response(rollout(as_text + [smol.eos_token_id]))
    assert not any(i in t.teacher_bytes.special for i in teacher_ids[:-1])
    assert b"<|im_end|>" in t.teacher_bytes.join(teacher_ids[:-1])
    # The student emitted its special <|im_start|> mid-response: the teacher has no such symbol, so the
    # scored text ends before it and the rest gets no teacher signal.
    start = smol.convert_tokens_to_ids("<|im_start|>")
    head = smol("first part", add_special_tokens=False)["input_ids"]
    ids = head + [start] + smol(" more", add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
    teacher_ids, alignment = t._response(rollout(ids))
    chunk = alignment.student_chunk()
    assert (chunk[: len(head)] >= 0).all() and alignment.cut == len(head) and unread_after(chunk, len(head))
    assert t.teacher_bytes.join(teacher_ids[:-1]) == b"first part"


def test_the_teacher_reads_the_conversation_in_its_own_chat_template(toks):
    t = teacher_of(toks, "smollm2", "r1_qwen")
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"})
    student_prompt = render_chat(toks["smollm2"], messages)
    r = rollout(toks["smollm2"]("4", add_special_tokens=False)["input_ids"] + [toks["smollm2"].eos_token_id],
                messages=messages, prompt_ids=student_prompt)
    context = t.context(r)
    assert context == render_chat(toks["r1_qwen"], messages)
    text = toks["r1_qwen"].decode(context)
    assert "<|im_start|>" not in text and "What is 2 + 2?" in text and "Be brief." in text


def test_a_plain_text_prompt_is_retokenised_by_the_teacher_with_its_own_bos(toks):
    t = teacher_of(toks, "char", "smollm2")
    char = toks["char"]
    r = rollout(char("olleh", add_special_tokens=False)["input_ids"], prompt_ids=char.encode("rev:hello="))
    assert t.context(r) == toks["smollm2"]("rev:hello=", add_special_tokens=True)["input_ids"]


def test_a_conversation_for_a_teacher_without_a_chat_template_is_an_error_naming_teacher_and_rollout(toks):
    t = teacher_of(toks, "smollm2", "char")
    r = rollout([42], messages=({"role": "user", "content": "hi"},))
    with pytest.raises(TeacherError, match=r"teacher 'char_expert': rollout of prompt 7 .* no chat template"):
        t.context(r)


def test_a_teacher_tokenizer_that_cannot_be_loaded_is_an_error_naming_the_teacher(tmp_path):
    cfg = TeacherConfig(name="qwen", tokenizer=str(tmp_path / "missing"))
    with pytest.raises(TeacherError, match=r"teacher 'qwen': distill.teachers\[qwen\].tokenizer=.* cannot be loaded"):
        configured_tokenizer(cfg, None, Path)


def test_a_teacher_tokenizer_that_changes_the_response_bytes_is_an_error_naming_teacher_and_rollout(toks, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(["<eos>", *sorted(set("Ġhelo"))])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # a space the text does not have
    backend.decoder = decoders.ByteLevel()
    teacher = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    t = CrossTokenizerTeacher(TeacherConfig(name="spacey", top_k=4, tokenizer="x"), None, toks["char"], teacher)
    char = toks["char"]
    with pytest.raises(TeacherError, match=r"teacher 'spacey', rollout of prompt 7: the teacher's tokenizer does "
                                           r"not reproduce the response text"):
        t._response(rollout(char("hello", add_special_tokens=False)["input_ids"]))


def test_a_tokenizer_whose_token_bytes_cannot_be_read_is_refused_at_start_up(toks):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    backend.decoder = decoders.WordPiece()
    teacher = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[UNK]")
    with pytest.raises(TeacherError, match=r"teacher 'wp': the tokenizer's decoder .*WordPiece"):
        CrossTokenizerTeacher(TeacherConfig(name="wp", top_k=4, tokenizer="x"), None, toks["char"], teacher)


def test_text_the_teacher_cannot_spell_ends_the_scored_text_before_it(toks):
    t = teacher_of(toks, "smollm2", "char")
    smol = toks["smollm2"]
    head = smol("abc de", add_special_tokens=False)["input_ids"]
    ids = head + smol("\x05fg", add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
    teacher_ids, alignment = t._response(rollout(ids))
    chunk = alignment.student_chunk()
    assert t.teacher_bytes.join(teacher_ids[:-1]) == b"abc de"
    assert (chunk[: len(head)] >= 0).all() and alignment.cut == len(head) and unread_after(chunk, len(head))
    check_chunks(t, rollout(ids), teacher_ids, alignment)


def test_the_cut_token_is_scored_against_the_teachers_distribution_after_the_scored_text(toks):
    """A student cannot escape the teacher by writing what it cannot read: the first token after the scored
    text gets the teacher's next-token top-K there, and its probability (a same-bytes entry, else
    UNREAD_LOGPROB, as every later token)."""
    import math

    from mopd.teachers.cross import UNREAD_LOGPROB, to_student_scores

    t = teacher_of(toks, "smollm2", "char")
    smol, char = toks["smollm2"], toks["char"]
    head = smol("ab", add_special_tokens=False)["input_ids"]
    for tail_text, in_topk in (("\x05", False), ("c", True)):
        ids = head + smol(tail_text, add_special_tokens=False)["input_ids"]
        if in_topk:  # pretend the text ended on a character it cannot spell right after "ab"
            _, alignment = t._response(rollout(head + smol("\x05", add_special_tokens=False)["input_ids"]))
        else:
            _, alignment = t._response(rollout(ids))
        nt = alignment.num_teacher
        probe_ids = torch.tensor([[char.convert_tokens_to_ids("c"), char.convert_tokens_to_ids("d")]] * nt)
        probe_lp = torch.log(torch.tensor([[0.5, 0.3]] * nt))
        teacher = TeacherScores(topk_ids=probe_ids.int(), topk_logprobs=probe_lp,
                                sampled_logprob=torch.full((nt,), -1.0), tail_logmass=torch.full((nt,), math.log(0.2)),
                                teacher="c")
        scores = to_student_scores(alignment, teacher, t.vocab_map, 2, "c", cut_token=ids[alignment.cut])
        row = alignment.cut
        assert scores.topk_ids[row].tolist() == [smol.convert_tokens_to_ids("c"), smol.convert_tokens_to_ids("d")]
        expected = math.log(0.5) if in_topk else UNREAD_LOGPROB
        assert float(scores.sampled_logprob[row]) == pytest.approx(expected)
        assert int(scores.chunks.teacher_tokens[row]) == 1


def test_per_token_routing_with_a_cross_tokenizer_teacher_is_refused_naming_it(toks):
    from mopd.config import RouteGranularity, RouterConfig
    from mopd.teachers import Router, score_batch

    t = teacher_of(toks, "smollm2", "char")
    router = Router(RouterConfig(granularity=RouteGranularity.token), [t.config])
    with pytest.raises(TeacherError, match=r"per-token routing .* \['char_expert'\] score chunks of another"):
        score_batch([rollout([42, 43])], [t], router)
