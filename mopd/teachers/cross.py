"""A teacher with its own tokenizer and chat template, scoring the student's responses as text (DESIGN.md §13).

Rollouts stay in the student's tokens. Per rollout the teacher reads:

    context  = the conversation (``Rollout.messages``) re-rendered by the TEACHER's chat template with
               ``add_generation_prompt=True`` (``mopd.data.chat.render_chat``), or, for a plain-text
               prompt, the prompt's text tokenised by the teacher with its own special tokens (bos);
    response = the response text (``alignment.split_response``) tokenised by the teacher with
               ``split_special_tokens=True``, so text that looks like a special token stays text, then
               the teacher's EOS when the student stopped on its own.

No id crosses from one vocabulary to the other: special tokens are each side's own. The engine scores
the teacher's tokens (top-K in the teacher's vocabulary); ``to_student_scores`` puts them on the
student's positions, one row per student response token:

- every chunk (``alignment.align_pieces``): ``sampled_logprob`` of its FIRST student token is the
  teacher's log p(chunk text) (sum over its teacher tokens), 0 on the chunk's other tokens, so a segment
  sum gives the chunk's value; ``chunks.chunk`` / ``chunks.teacher_tokens`` say which chunk and how wide;
- a 1:1 chunk: the teacher's top-K through the ``VocabMap`` (same bytes, else the longest student token
  the entry begins with -> student id); unmapped entries get probability 0 and their mass joins the tail
  bucket; entries mapping to one student id are merged;
- the first student token of a wider chunk: the teacher's raw top-K log-probabilities (sorted-probability
  terms need no ids) with placeholder ids ``0..K-1``; other tokens and unscored ones: the uniform
  placeholder of ``build_train_batches``;
- the cut token (``Alignment.cut``): the probe row mapped like a 1:1 chunk, its sampled log-probability
  the teacher's for the token's entry in the mapped top-K if it has one, else ``UNREAD_LOGPROB``; later
  tokens: their own chunks of no teacher token, sampled log-probability ``UNREAD_LOGPROB`` (alignment.py).
Objectives read these rows only through ``mopd.objectives.cross_vocab``, which knows which is which.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from mopd.config import TeacherConfig
from mopd.data.chat import has_chat_template, render_chat
from mopd.errors import ObjectiveError, TeacherError
from mopd.rollout.engine import Engine, ScoreRequest
from mopd.teachers.alignment import Alignment, VocabMap, align_response
from mopd.teachers.base import Teacher
from mopd.teachers.token_bytes import check_round_trip, token_bytes
from mopd.types import ChunkScores, Rollout, TeacherScores

if TYPE_CHECKING:  # transformers is heavy to import; only its type is needed here
    from transformers import PreTrainedTokenizerBase


class CrossTokenizerTeacher(Teacher):
    """An expert of another tokenizer (see the module docstring). ``enable_thinking`` is passed to the
    teacher's chat template as it was to the student's (``data.enable_thinking``)."""

    def __init__(self, config: TeacherConfig, engine: Engine, student_tokenizer: PreTrainedTokenizerBase,
                 teacher_tokenizer: PreTrainedTokenizerBase, enable_thinking: bool | None = None) -> None:
        super().__init__(config, engine, len(student_tokenizer))
        who = f"teacher {config.name!r}"
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.student_bytes = token_bytes(student_tokenizer, f"{who} (the student's tokenizer)")
        self.teacher_bytes = token_bytes(teacher_tokenizer, who)
        if self.teacher_bytes.eos_id is None:
            raise TeacherError(f"{who}: its tokenizer has no eos_token, which a stopped student response ends on")
        if config.top_k > len(student_tokenizer):
            raise TeacherError(f"{who}: top_k={config.top_k} is larger than the student's vocabulary "
                               f"({len(student_tokenizer)})")
        self.vocab_map = VocabMap(self.student_bytes, self.teacher_bytes)
        self.enable_thinking = enable_thinking
        self.teacher_vocab = len(teacher_tokenizer)

    def describe(self) -> str:
        """One line for the start-up log."""
        return (f"teacher {self.name!r}: cross-tokenizer ({len(self.teacher_bytes)} teacher tokens, "
                f"{self.vocab_map.mapped} of them map to a student token of the same bytes, "
                f"{self.vocab_map.prefixed} to the longest student token they begin with)")

    # ------------------------------------------------------------------ context and response

    def context(self, rollout: Rollout) -> list[int]:
        """The teacher's ids before the response (see the module docstring)."""
        tok = self.teacher_tokenizer
        if rollout.messages is not None:
            if not has_chat_template(tok):
                raise TeacherError(f"teacher {self.name!r}: rollout of prompt {rollout.prompt_index} is a "
                                   "conversation, but the teacher's tokenizer has no chat template to re-render it "
                                   "with (give the teacher's tokenizer folder a chat_template)")
            ids = render_chat(tok, rollout.messages, enable_thinking=self.enable_thinking)
        else:
            text = self.student_tokenizer.decode(rollout.prompt_ids.tolist(), skip_special_tokens=True)
            ids = list(tok(text, add_special_tokens=True)["input_ids"])
        if not ids:
            raise TeacherError(f"teacher {self.name!r}: rollout of prompt {rollout.prompt_index} gives the teacher "
                               "an empty context (no bos, no text): its first response token has nothing to follow")
        return ids

    def _response(self, rollout: Rollout) -> tuple[list[int], Alignment]:
        """(the teacher's response ids, the alignment) of one rollout."""
        what = f"teacher {self.name!r}, rollout of prompt {rollout.prompt_index}"
        ids = rollout.response_ids.tolist()

        def encode(text: str, start: int) -> tuple[list[int], int]:
            check_round_trip(self.student_tokenizer, self.student_bytes, _run_of(ids, start, text, self.student_bytes),
                             what)
            out = list(self.teacher_tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
            unknown = self.teacher_tokenizer.unk_token_id
            cut = unknown is not None and unknown in out
            if cut:  # a character it cannot spell: scored up to there
                out = out[:out.index(unknown)]
            got, want = self.teacher_bytes.join(out), text.encode("utf-8")
            if not (got == want or (cut and want.startswith(got))):
                raise TeacherError(f"{what}: the teacher's tokenizer does not reproduce the response text as bytes "
                                   f"({text[:40]!r} -> {got[:40]!r}); a normaliser or an added prefix space "
                                   "changes it, so its tokens cannot be aligned with the student's")
            return out, len(got)

        return align_response(ids, rollout.finish, self.student_bytes, self.teacher_bytes, self.vocab_map, encode)

    def requests(self, rollouts: Sequence[Rollout]) -> list[ScoreRequest]:
        out = []
        for r in rollouts:
            ctx, (resp, _) = self.context(r), self._response(r)
            out.append(ScoreRequest(ids=torch.tensor(ctx + resp, dtype=torch.int64), response_start=len(ctx)))
        return out

    # ------------------------------------------------------------------ scoring

    def score(self, rollouts: Sequence[Rollout], top_k: int) -> list[TeacherScores]:
        """Per rollout, TeacherScores on the student's ``T`` response positions with ``chunks`` set."""
        prepared = []
        for r in rollouts:
            if r.response_ids.numel() == 0:
                prepared.append(None)
                continue
            resp, alignment = self._response(r)
            prepared.append((r, resp, alignment))
        live = [p for p in prepared if p is not None and p[2].num_teacher > 0]
        reqs = []
        for r, resp, _ in live:
            ctx = self.context(r)
            reqs.append(ScoreRequest(ids=torch.tensor(ctx + resp, dtype=torch.int64), response_start=len(ctx)))
        got = self._engine_scores(reqs, top_k) if reqs else []
        by_id = {id(p): s for p, s in zip(live, got)}
        out = []
        for p in prepared:
            if p is None:
                out.append(_with_chunks(self._empty(top_k), torch.zeros(0, dtype=torch.long),
                                        torch.zeros(0, dtype=torch.int32)))
                continue
            r, _, alignment = p
            teacher = by_id.get(id(p))
            cut_token = int(r.response_ids[alignment.cut]) if alignment.cut is not None else None
            out.append(to_student_scores(alignment, teacher, self.vocab_map, top_k, self.name, cut_token))
        return out

    def _engine_scores(self, reqs: list[ScoreRequest], top_k: int) -> list[TeacherScores]:
        got = self._engine_score(reqs, top_k)
        for req, s in zip(reqs, got):
            if s.k != top_k:
                raise TeacherError(f"teacher {self.name!r}: engine returned K={s.k}, asked for K={top_k}")
            try:
                s.check(self.teacher_vocab, num_tokens=int(req.ids.numel()) - req.response_start)
            except ObjectiveError as exc:
                raise TeacherError(f"teacher {self.name!r}: {exc}") from None
        return got


UNREAD_LOGPROB = -30.0
"""The teacher's log-probability of a student token of text it did not read (alignment.py): text it would
not write. Below any log-probability a teacher gives text it can read in practice (e^-30 ~ 1e-13), so no
response scores better by leaving the teacher's vocabulary. A bound such as the probe's tail mass spread
over its unsent entries (~e^-12.5 for the toy's character experts) is above what the experts give a wrong
letter, and a student learnt to fill its responses with unreadable bytes within 50 steps."""


def to_student_scores(alignment: Alignment, teacher: TeacherScores | None, vocab_map: VocabMap, k: int,
                      name: str, cut_token: int | None = None) -> TeacherScores:
    """The teacher's per-teacher-token scores on the student's positions (module docstring); ``cut_token``
    is the student's token at ``alignment.cut`` (scored against the teacher's probe row)."""
    n = alignment.num_student
    placeholder = -math.log(k + 1)
    ids = torch.arange(k, dtype=torch.int32).expand(n, k).clone()
    logprobs = torch.full((n, k), placeholder)
    tail = torch.full((n,), placeholder)
    sampled = torch.zeros(n)
    chunk = alignment.student_chunk()
    width = torch.zeros(n, dtype=torch.int32)
    if teacher is not None and alignment.chunks:
        t_lp, t_ids = teacher.topk_logprobs.float(), teacher.topk_ids.long()
        t_sampled, t_tail = teacher.sampled_logprob.float(), teacher.tail_logmass.float()
        firsts = torch.tensor([c[0] for c in alignment.chunks])
        t_firsts = torch.tensor([c[2] for c in alignment.chunks])
        spans = torch.tensor([[c[1] - c[0], c[3] - c[2]] for c in alignment.chunks])
        t_chunk = torch.repeat_interleave(torch.arange(len(alignment.chunks)), spans[:, 1])
        sampled[firsts] = torch.zeros(len(alignment.chunks)).index_add_(0, t_chunk, t_sampled[:t_chunk.numel()])
        for c, (s0, s1, _, _) in enumerate(alignment.chunks):
            width[s0:s1] = int(spans[c, 1])
        one = (spans[:, 0] == 1) & (spans[:, 1] == 1)
        logprobs[firsts[~one]] = t_lp[t_firsts[~one]]
        tail[firsts[~one]] = t_tail[t_firsts[~one]]
        m_ids, m_lp, m_tail = map_topk(t_ids[t_firsts[one]], t_lp[t_firsts[one]], t_tail[t_firsts[one]], vocab_map)
        ids[firsts[one]], logprobs[firsts[one]], tail[firsts[one]] = m_ids.to(torch.int32), m_lp, m_tail
    if teacher is not None and alignment.cut is not None:
        probe = alignment.num_teacher - 1
        c_ids, c_lp, c_tail = map_topk(teacher.topk_ids[probe:probe + 1].long(),
                                       teacher.topk_logprobs[probe:probe + 1].float(),
                                       teacher.tail_logmass[probe:probe + 1].float(), vocab_map)
        p = alignment.cut
        ids[p], logprobs[p], tail[p] = c_ids[0].to(torch.int32), c_lp[0], c_tail[0]
        hit = (c_ids[0] == cut_token) & (c_lp[0] > float("-inf"))
        sampled[p] = c_lp[0][hit][0] if bool(hit.any()) else UNREAD_LOGPROB
        sampled[p + 1:] = UNREAD_LOGPROB
        width[p] = 1
    return _with_chunks(TeacherScores(topk_ids=ids, topk_logprobs=logprobs, sampled_logprob=sampled,
                                      tail_logmass=tail, teacher=name), chunk, width)


def map_topk(ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor,
             vocab_map: VocabMap) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher top-K rows [n, K] -> student ids, log p (0 mass: -inf) and tail log-mass [n].

    Entries without a student id, or of probability 0, are dead (-inf) and carry the id of the row's
    first live entry, so the student's tail (the complement of the row's ids) is still everything the
    teacher's buckets do not name. Entries mapping to one student id are merged into the first.
    """
    student = vocab_map(ids)
    live = (student >= 0) & (logprobs > float("-inf"))
    same = (student[:, :, None] == student[:, None, :]) & live[:, :, None] & live[:, None, :]
    earlier = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril(-1)
    first = live & ~(same & earlier).any(dim=2)
    merged = torch.where(same, logprobs[:, None, :], float("-inf")).logsumexp(dim=2)
    out_lp = torch.where(first, merged, float("-inf"))
    fill = torch.where(live.any(dim=1), student.gather(1, live.float().argmax(dim=1, keepdim=True)).squeeze(1), 0)
    out_ids = torch.where(live, student, fill[:, None])
    unmapped = torch.where(~live, logprobs, float("-inf"))
    out_tail = torch.where((~live).any(dim=1),
                           torch.cat([tail[:, None], unmapped], dim=1).logsumexp(dim=1), tail)
    return out_ids, out_lp, out_tail


def _run_of(ids: list[int], start: int, text: str, table) -> list[int]:
    """The student tokens from ``start`` whose bytes make ``text``."""
    n, size, end = start, len(text.encode("utf-8")), 0
    while n < len(ids) and end < size:
        end += len(table.pieces[ids[n]])
        n += 1
    return ids[start:n]


def _with_chunks(scores: TeacherScores, chunk: torch.Tensor, width: torch.Tensor) -> TeacherScores:
    return TeacherScores(topk_ids=scores.topk_ids, topk_logprobs=scores.topk_logprobs.float(),
                         sampled_logprob=scores.sampled_logprob, tail_logmass=scores.tail_logmass,
                         teacher=scores.teacher, chunks=ChunkScores(chunk=chunk, teacher_tokens=width))
