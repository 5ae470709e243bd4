"""Two tokenisations of one response, cut into chunks at their shared byte boundaries (DESIGN.md §13).

The student's response tokens and the teacher's tokens of the same response text are byte spans of one
byte string. Every offset that ends a token on both sides is a shared boundary; consecutive shared
boundaries delimit a chunk: a run of >= 1 student and >= 1 teacher tokens covering exactly the same bytes
(``align_pieces``; exact by construction, and ``tests/test_teachers_alignment.py`` checks every chunk's
bytes). A chunk of one token on each side is "1:1": both tokens are the same bytes, predicted from the
same text, so their distributions can be compared entry by entry through a ``VocabMap``.

What a teacher scores of a student response (``align_response``): runs of text between special tokens,
each tokenised by the teacher, and the special tokens themselves, which never cross as text:
- the last token of a response that stopped on a special token (its EOS / end of turn) is its own 1:1
  chunk with the teacher's EOS, so the decision to stop is supervised too;
- a special token inside the response is a 1:1 chunk with the teacher's special token of the same
  content (``VocabMap.special_of``); if the teacher has none, the scored text ends before it;
- text must be valid UTF-8 for the teacher's tokenizer to read it: a response cut by its length inside a
  multi-byte character (byte-level BPE pieces are not UTF-8 on their own) is scored up to the last
  student token that ends on a whole character; an invalid byte sequence in the middle ends the scored
  text there too, and so does a character the teacher has no token for (its tokenizer gives its unknown
  token: a character vocabulary meets a control byte a byte-level student sampled).
A student must not escape supervision by writing what the teacher cannot read (in the toy, a BPE
student learnt within 50 steps to fill its responses with bytes a character teacher cannot spell when
they cost nothing). So the first student token after the scored text (the "cut" token) is scored
against the teacher's next-token distribution right after the scored text (a probe position: the
context the student sampled that token in) as a 1:1 chunk: top-K divergences use the probe's mapped
top-K; the chunk reverse KL uses the cut token's entry in the probe's mapped top-K when it has one, else ``mopd.teachers.cross.UNREAD_LOGPROB`` (-30: text the teacher would not write). Each
later token is a chunk of its own with no teacher token (``teacher_tokens`` 0) scored at that value:
the reverse KL keeps pushing such text down, the top-K terms skip it. Their share is the metric ``teacher/<name>/unscored_fraction``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mopd.teachers.token_bytes import TokenBytes


def align_pieces(student: Sequence[bytes], teacher: Sequence[bytes]) -> list[tuple[int, int, int, int]]:
    """Chunks ``(s0, s1, t0, t1)``: student tokens [s0, s1) and teacher tokens [t0, t1) with equal bytes.

    ``b"".join(student)`` must equal ``b"".join(teacher)`` (ValueError otherwise). Every chunk has >= 1
    token on each side; tokens of zero bytes join the chunk that follows them (the last one at the end).
    """
    if b"".join(student) != b"".join(teacher):
        raise ValueError("align_pieces: the two tokenisations cover different bytes")
    ns, nt = len(student), len(teacher)
    chunks: list[tuple[int, int, int, int]] = []
    i = j = 0
    while i < ns and j < nt:
        s0, t0 = i, j
        a, b = len(student[i]), len(teacher[j])
        i, j = i + 1, j + 1
        while a != b or (a == 0 and (i < ns and j < nt)):
            if a == b:  # both zero-length so far: take one more token on each side
                a, b, i, j = a + len(student[i]), b + len(teacher[j]), i + 1, j + 1
            elif a < b:
                a, i = a + len(student[i]), i + 1
            else:
                b, j = b + len(teacher[j]), j + 1
        chunks.append((s0, i, t0, j))
    if (i < ns or j < nt) and chunks:  # trailing zero-byte tokens on one side
        s0, _, t0, _ = chunks.pop()
        chunks.append((s0, ns, t0, nt))
    elif i < ns or j < nt:  # one side is all zero-byte tokens, the other empty: nothing pairs up
        raise ValueError("align_pieces: tokens of zero bytes with nothing on the other side to pair with")
    return chunks


class VocabMap:
    """Teacher id -> a student id (-1 if none), for the teacher's top-K at 1:1 chunks; the EOS pair.

    A text token maps to the student's text token of the same bytes; one the student has no token for,
    to the student's longest text token that its bytes begin with (``prefixed`` of them). At a 1:1 chunk
    both models predict the next text from the same prefix, so the teacher's mass on "ey" is mass on text
    that begins with "e": for a character student the mapped top-K is exactly the teacher's distribution
    of the next character (restricted to its top-K); for a subword student it is the usual first-token
    approximation. A special token maps only to the student's special token of the same content (e.g.
    ``<|endoftext|>`` in both), and the two EOS tokens to each other whatever their content (each side's
    end of turn). When several student ids share bytes the lowest wins. With identical tokenizers the
    map is the identity. Built once per teacher.
    """

    def __init__(self, student: TokenBytes, teacher: TokenBytes) -> None:
        text: dict[bytes, int] = {}
        special: dict[bytes, int] = {}
        for i, piece in enumerate(student.pieces):
            if i == student.eos_id:
                continue
            into = special if i in student.special else text
            if piece and piece not in into:
                into[piece] = i
        longest = max((len(p) for p in text), default=0)
        table = torch.full((len(teacher),), -1, dtype=torch.long)
        prefixed = 0
        for i, piece in enumerate(teacher.pieces):
            if i == teacher.eos_id:
                continue
            got = special.get(piece) if i in teacher.special else text.get(piece)
            if got is None and i not in teacher.special:
                got = next((text[piece[:n]] for n in range(min(len(piece) - 1, longest), 0, -1)
                            if piece[:n] in text), None)
                prefixed += got is not None
            if got is not None:
                table[i] = got
        if teacher.eos_id is not None and student.eos_id is not None:
            table[teacher.eos_id] = student.eos_id
        self.table = table
        self._special_back = {int(table[i]): i for i in sorted(teacher.special) if int(table[i]) >= 0}
        self.prefixed = prefixed
        self.mapped = int((table >= 0).sum()) - prefixed
        """Teacher ids with a student token of the same bytes (the EOS pair included)."""

    def special_of(self, student_id: int) -> int | None:
        """The teacher's special token for the student's special ``student_id`` (same content, or the EOS
        pair); None if it has none."""
        return self._special_back.get(int(student_id))

    def __call__(self, teacher_ids: torch.Tensor) -> torch.Tensor:
        """Student ids of ``teacher_ids`` (any shape; -1 where unmapped)."""
        return self.table[teacher_ids.long()]


@dataclass(frozen=True, slots=True)
class Alignment:
    """The chunks of one rollout's scored response."""

    chunks: tuple[tuple[int, int, int, int], ...]
    """``(s0, s1, t0, t1)`` per chunk: student response tokens [s0, s1), teacher response tokens [t0, t1)."""
    num_student: int
    """All of the rollout's response tokens (scored or not)."""
    num_teacher: int
    """The teacher's response tokens (its EOS included when scored, the probe when cut)."""
    cut: int | None = None
    """When the scored text ends before the response does: the first student token after it. The teacher's
    last token is then a probe (its EOS) whose row is the teacher's next-token distribution after the
    scored text, the same context that student token was sampled in."""

    def student_chunk(self) -> torch.Tensor:
        """[num_student] int64 chunk of each student token; from the cut token on, each token its own chunk."""
        out = torch.full((self.num_student,), -1, dtype=torch.long)
        for c, (s0, s1, _, _) in enumerate(self.chunks):
            out[s0:s1] = c
        if self.cut is not None:
            out[self.cut:] = torch.arange(self.num_student - self.cut) + len(self.chunks)
        return out


def align_response(response_ids: Sequence[int], finish: str, student: TokenBytes, teacher: TokenBytes,
                   vocab_map: VocabMap, encode: Callable[[str, int], tuple[list[int], int]]
                   ) -> tuple[list[int], Alignment]:
    """(the teacher's response ids, the chunks) of one student response (module docstring).

    ``encode(text, start)`` is the teacher's tokenisation of a text run that starts at student token
    ``start`` and how many of its bytes those tokens cover: fewer than all when the teacher meets a
    character it has no token for (its unknown token), where the scored text then ends. It checks the
    round trips and names the rollout in its errors.
    """
    ids = [int(i) for i in response_ids]
    teacher_ids: list[int] = []
    chunks: list[tuple[int, int, int, int]] = []
    k = 0
    while k < len(ids):
        if ids[k] in student.special:
            last = k == len(ids) - 1 and finish == "stop"
            mapped = teacher.eos_id if last else vocab_map.special_of(ids[k])
            if mapped is None:
                break  # a special token the teacher has no symbol for: the scored text ends here
            chunks.append((k, k + 1, len(teacher_ids), len(teacher_ids) + 1))
            teacher_ids.append(mapped)
            k += 1
            continue
        end = next((j for j in range(k, len(ids)) if ids[j] in student.special), len(ids))
        pieces = [student.pieces[i] for i in ids[k:end]]
        whole = whole_characters(pieces)
        text_ids, covered = encode(b"".join(pieces[:whole]).decode("utf-8"), k) if whole else ([], 0)
        if covered < sum(len(p) for p in pieces[:whole]):  # the teacher cannot spell all of it
            whole = _pieces_within(pieces, covered)
            text_ids, covered = encode(b"".join(pieces[:whole]).decode("utf-8"), k) if whole else ([], 0)
            if covered != sum(len(p) for p in pieces[:whole]):  # the shorter text tokenises differently
                whole, text_ids = 0, []
            end = -1  # nothing after this run is scored
        if whole:
            for s0, s1, t0, t1 in align_pieces(pieces[:whole], [teacher.pieces[i] for i in text_ids]):
                chunks.append((k + s0, k + s1, len(teacher_ids) + t0, len(teacher_ids) + t1))
            teacher_ids += text_ids
        if end < 0 or whole < end - k:
            k += whole
            break  # invalid UTF-8 (a character cut by the length limit, garbage bytes) or unspellable text
        k = end
    if k < len(ids):  # cut: probe the teacher's next-token distribution where the scored text ends
        teacher_ids.append(teacher.eos_id)
        return teacher_ids, Alignment(tuple(chunks), len(ids), len(teacher_ids), cut=k)
    return teacher_ids, Alignment(tuple(chunks), len(ids), len(teacher_ids))


def _pieces_within(pieces: Sequence[bytes], size: int) -> int:
    """How many leading ``pieces`` fit in ``size`` bytes."""
    n, end = 0, 0
    while n < len(pieces) and end + len(pieces[n]) <= size:
        end += len(pieces[n])
        n += 1
    return n


def whole_characters(pieces: Sequence[bytes]) -> int:
    """How many leading ``pieces`` end on whole UTF-8 characters of the valid prefix of their bytes."""
    data = b"".join(pieces)
    try:
        data.decode("utf-8")
        valid = len(data)
    except UnicodeDecodeError as exc:
        valid = exc.start
    n, end = 0, 0
    while n < len(pieces) and end + len(pieces[n]) <= valid:
        end += len(pieces[n])
        n += 1
    return n
