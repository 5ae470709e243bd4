"""Start-up check that a teacher's tokenizer means the same ids as the student's.

Teachers score the student's token ids directly, so a single id that decodes differently (a changed
merge, a different added token, another EOS) silently corrupts every KL term that touches it. The
check compares the vocabulary size, the full token -> id map, the bos/eos/pad/unk tokens and the
added tokens, and refuses a mismatch with a TeacherError that lists the first differing ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mopd.errors import TeacherError

if TYPE_CHECKING:  # transformers is heavy to import; only its type is needed here
    from transformers import PreTrainedTokenizerBase

SPECIAL_ROLES = ("bos", "eos", "pad", "unk")
MAX_LISTED = 10

@dataclass(frozen=True, slots=True)
class VocabDifference:
    """One way the teacher's tokenizer differs from the student's."""

    what: str
    """"id 17", "eos_token", "added token id 130", "vocab size"."""
    student: str
    teacher: str

    def __str__(self) -> str:
        return f"{self.what}: student {self.student}, teacher {self.teacher}"

def vocab_differences(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> list[VocabDifference]:
    """Every difference, in a stable order: size, special tokens, added tokens, then ids ascending."""
    out: list[VocabDifference] = []
    if len(student) != len(teacher):
        out.append(VocabDifference("vocab size", str(len(student)), str(len(teacher))))
    for role in SPECIAL_ROLES:
        s, t = _special(student, role), _special(teacher, role)
        if s != t:
            out.append(VocabDifference(f"{role}_token", s, t))
    s_added, t_added = _added(student), _added(teacher)
    for i in sorted(set(s_added) | set(t_added)):
        if s_added.get(i) != t_added.get(i):
            out.append(VocabDifference(f"added token id {i}", s_added.get(i, "(none)"), t_added.get(i, "(none)")))
    s_ids, t_ids = _id_to_token(student), _id_to_token(teacher)
    for i in sorted(set(s_ids) | set(t_ids)):
        if s_ids.get(i) != t_ids.get(i):
            out.append(VocabDifference(f"id {i}", _show(s_ids.get(i)), _show(t_ids.get(i))))
    return out

def check_vocab(teacher_name: str, student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase,
                hint: str = "") -> None:
    """Raise TeacherError naming the teacher and up to MAX_LISTED differing ids/tokens, if any.

    ``hint`` is appended to "so they must share its vocabulary" (the cross-tokenizer way out)."""
    diffs = vocab_differences(student, teacher)
    if not diffs:
        return
    listed = "\n  ".join(str(d) for d in diffs[:MAX_LISTED])
    more = f"\n  ... and {len(diffs) - MAX_LISTED} more" if len(diffs) > MAX_LISTED else ""
    raise TeacherError(
        f"teacher {teacher_name!r}: tokenizer does not match the student's ({len(diffs)} differences); teachers score "
        f"the student's token ids, so they must share its vocabulary{' ' + hint if hint else ''}:\n  {listed}{more}"
    )

def _special(tok: PreTrainedTokenizerBase, role: str) -> str:
    token = getattr(tok, f"{role}_token", None)
    if token is None:
        return "(none)"
    return f"{str(token)!r} (id {getattr(tok, f'{role}_token_id', None)})"

def _added(tok: PreTrainedTokenizerBase) -> dict[int, str]:
    return {i: f"{a.content!r}{' special' if a.special else ''}" for i, a in tok.added_tokens_decoder.items()}

def _id_to_token(tok: PreTrainedTokenizerBase) -> dict[int, str]:
    return {i: t for t, i in tok.get_vocab().items()}

def _show(token: str | None) -> str:
    return "(missing)" if token is None else repr(token)
