"""Start-up vocabulary check: a teacher whose tokenizer differs from the student's is refused with
the ids that differ; an identical one (even reloaded from disk) passes."""

from __future__ import annotations

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mopd.config import TeacherConfig
from mopd.data.tokenizer import build_char_tokenizer
from mopd.errors import TeacherError
from mopd.teachers import build_teachers, check_vocab, vocab_differences
from mopd.teachers.vocab import MAX_LISTED


def variant(student: PreTrainedTokenizerFast, rename: dict[int, str], eos: str = "<eos>") -> PreTrainedTokenizerFast:
    """The student's vocabulary with some ids renamed (a different special token is a renamed id)."""
    id_to_token = {i: t for t, i in student.get_vocab().items()}
    id_to_token.update(rename)
    vocab = {t: i for i, t in id_to_token.items()}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    specials = ["<pad>", "<bos>", eos, "<unk>"]
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token=eos, pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def student() -> PreTrainedTokenizerFast:
    return build_char_tokenizer()


def test_a_teacher_with_one_changed_token_and_a_different_eos_is_refused_naming_the_ids(student):
    g = student.convert_tokens_to_ids("g")
    eos = student.eos_token_id
    teacher = variant(student, {g: "\u00e9", eos: "<end>"}, eos="<end>")
    assert len(teacher) == len(student)  # same size: only the content differs
    with pytest.raises(TeacherError) as err:
        check_vocab("math_expert", student, teacher)
    msg = str(err.value)
    assert "teacher 'math_expert'" in msg
    assert f"id {g}: student 'g', teacher '\u00e9'" in msg
    assert f"id {eos}: student '<eos>', teacher '<end>'" in msg
    assert f"eos_token: student '<eos>' (id {eos}), teacher '<end>' (id {eos})" in msg
    assert f"added token id {eos}: student '<eos>' special, teacher '<end>' special" in msg
    assert "vocab size" not in msg and "bos_token" not in msg


def test_identical_tokenizers_pass_including_one_saved_and_reloaded(student, tmp_path):
    student.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert vocab_differences(student, reloaded) == []
    check_vocab("twin", student, reloaded)


def test_a_larger_teacher_vocabulary_reports_its_size_and_lists_at_most_ten_ids(student):
    teacher = variant(student, {i: f"tok{i}" for i in range(10, 30)})
    teacher.add_tokens(["<extra>"])
    diffs = vocab_differences(student, teacher)
    assert str(diffs[0]) == f"vocab size: student {len(student)}, teacher {len(student) + 1}"
    with pytest.raises(TeacherError) as err:
        check_vocab("big", student, teacher)
    listed = [line for line in str(err.value).splitlines() if line.startswith("  ") and ":" in line]
    assert len(listed) == MAX_LISTED
    assert f"... and {len(diffs) - MAX_LISTED} more" in str(err.value)


def test_building_an_expert_teacher_checks_its_tokenizer_and_requires_one(student):
    teacher_tok = variant(student, {student.convert_tokens_to_ids("x"): "y2"})
    config = TeacherConfig(name="code")
    with pytest.raises(TeacherError, match="teacher 'code': tokenizer does not match"):
        build_teachers([config], {"code": None}, student, {"code": teacher_tok})
    with pytest.raises(TeacherError, match="teacher 'code': its tokenizer is needed"):
        build_teachers([config], {"code": None}, student)
    with pytest.raises(TeacherError, match="no engine was built"):
        build_teachers([config], {}, student)
