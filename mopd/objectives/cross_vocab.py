"""Objectives across vocabularies: a teacher of another tokenizer, read through alignment chunks (DESIGN.md §13).

A cross-tokenizer teacher's rows (``mopd.teachers.cross``) sit on the student's response tokens, grouped
into chunks: runs of student tokens and teacher tokens covering the same bytes. ``ChunkInputs`` says, for
each of a teacher's n tokens, its chunk (``segment``), whether the chunk is 1:1 (one token each side) and
whether it is the chunk's first token. Per chunk c with student tokens y_t, t in c:

    chunk reverse KL (``reverse_kl_sampled``)
        A_c = sg[ log p_t(text of c) - sum_{t in c} log p_s(y_t) ],  loss_t = -w_t A_c log p_s(y_t)
        log p_t(text of c) is the teacher's sum over ITS tokens of c (``sampled_logprob`` of the chunk's
        first token). Its gradient is the policy gradient of the chunk-level reverse KL with the chunk's
        log-ratio as every token's reward. w_t and the clamp of A_c: the same ``importance_ratio`` /
        ``ratio_cap`` / ``token_clip`` as the per-token objective (policy_gradient.py).
    top-K divergences on 1:1 chunks (``forward_kl_topk``, ``jsd``, ``skew_kl``)
        the teacher's top-K mapped to student ids (``VocabMap``: the same bytes, else the longest
        student token an entry begins with), unmapped mass in the tail bucket;
        exactly divergences.py on those tokens, 0 elsewhere.
    sorted-probability term (``uld``, Universal Logit Distillation) on the first token of every chunk
        that is NOT 1:1, where both models predict the chunk's text from the same text prefix but their
        vocabularies cannot be matched entry by entry:
        loss = sum_{i<K} |p_s^(i) - p_t^(i)| + |p_s(tail) - p_t(tail)|
        with p^(i) the i-th largest probability: the student's own top-K (exact, from its logits) and the
        teacher's top-K at ``teacher_temperature``; each tail is the mass outside its own top-K. Other
        tokens: 0. With the full vocabulary as K this is ULD's L1 of sorted distributions.

Tokens after the text the teacher read (``read`` False: after an invalid UTF-8 cut, unspellable text or
a special token the teacher lacks) are chunks of one token whose teacher log-probability is
``UNREAD_LOGPROB`` (mopd/teachers/cross.py): the chunk reverse KL applies, the top-K and sorted terms skip them. Tokens with chunk -1 (none
from CrossTokenizerTeacher; placeholders) get 0 from every term.

When every chunk is 1:1 (both tokenizers the same) each term equals its
same-tokenizer objective: A_c is the per-token log-ratio, the map is the identity, and ``uld`` has no
tokens. Multi-token chunks need ``teacher_temperature`` 1 in the chunk reverse KL: the teacher's chunk
log-probability is a sum over its own positions, whose normalisers at another temperature were not sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mopd.errors import ObjectiveError
from mopd.objectives import policy_gradient as pg
from mopd.objectives.divergences import Buckets, TermOutput, bucket_divergence, teacher_at_temperature
from mopd.objectives.vocab_parallel import global_topk_ids, select_logprobs


@dataclass(frozen=True, slots=True)
class ChunkInputs:
    """The alignment chunks of one teacher's n tokens (in the loss's row order)."""

    segment: torch.Tensor
    """[n] int64 chunk of each token, 0..num_segments-1 (chunks never span sequences)."""
    num_segments: int
    first: torch.Tensor
    """[n] bool: the token is its chunk's first."""
    one_to_one: torch.Tensor
    """[n] bool: its chunk is one student and one teacher token."""
    scored: torch.Tensor
    """[n] bool: the teacher scored the token's text (chunk index >= 0)."""
    student_tokens: torch.Tensor
    """[n] int64 student tokens in the token's chunk."""
    read: torch.Tensor
    """[n] bool: the teacher read the token's text (its chunk has teacher tokens); False after a cut, where
    ``sampled_logprob`` holds ``UNREAD_LOGPROB`` (mopd/teachers/cross.py)."""

    @staticmethod
    def build(chunk: torch.Tensor | None, teacher_tokens: torch.Tensor | None, seq: torch.Tensor) -> ChunkInputs:
        """From [n] chunk indices, teacher widths and sequence ids of rows in order (None: one token per chunk)."""
        n = seq.shape[0]
        if chunk is None:
            chunk = torch.arange(n, device=seq.device)
            teacher_tokens = torch.ones(n, dtype=torch.int32, device=seq.device)
        new = torch.ones(n, dtype=torch.bool, device=seq.device)
        new[1:] = (chunk[1:] != chunk[:-1]) | (seq[1:] != seq[:-1])
        segment = new.long().cumsum(0) - 1
        num = int(segment[-1]) + 1 if n else 0
        sizes = torch.bincount(segment, minlength=num)
        student_tokens = sizes[segment]
        scored = chunk >= 0
        one = scored & (student_tokens == 1) & (teacher_tokens == 1)
        return ChunkInputs(segment, num, new, one, scored, student_tokens, scored & (teacher_tokens > 0))

    def segment_sum(self, values: torch.Tensor) -> torch.Tensor:
        """[num_segments] sums of [n] ``values`` per chunk."""
        return values.new_zeros(self.num_segments).index_add(0, self.segment, values)

    @property
    def uld_tokens(self) -> torch.Tensor:
        """[n] bool: first tokens of scored chunks that are not 1:1 (where ``uld`` applies)."""
        return self.first & ~self.one_to_one & self.read


def chunk_teacher_logprob(x, temperature: float) -> torch.Tensor:
    """[n] the teacher's log-probability carried by each token: at 1:1 tokens log p_t(y) at ``temperature``
    (exactly what the per-token objectives use), on a wider chunk's first token log p_t(chunk text), else 0."""
    ch: ChunkInputs = x.chunks
    _, teacher_y = x.teacher(temperature)
    wide = ch.scored & ~ch.one_to_one
    if temperature != 1.0 and bool(wide.any()):
        raise ObjectiveError("reverse_kl_sampled over multi-token chunks of a cross-tokenizer teacher needs "
                             f"teacher_temperature=1 (got {temperature}): the teacher's per-token normalisers "
                             "at another temperature are not sent")
    raw = torch.where(wide, x.sampled_logprob.float(), 0.0)
    return torch.where(ch.one_to_one, teacher_y, raw)


def chunk_reverse_kl(x, cfg) -> TermOutput:
    """The chunk-level sampled reverse KL of the module docstring."""
    ch: ChunkInputs = x.chunks
    teacher = ch.segment_sum(chunk_teacher_logprob(x, cfg.teacher_temperature))
    student = ch.segment_sum(x.student_sampled.detach())
    advantage = (teacher - student)[ch.segment]
    behaviour = x.behaviour_logprobs if cfg.importance_ratio else None
    out = pg.policy_gradient(x.student_sampled, torch.where(ch.scored, advantage, 0.0), behaviour_logp=behaviour,
                             ratio_cap=cfg.ratio_cap, token_clip=cfg.token_clip)
    return TermOutput(loss=torch.where(ch.scored, out.loss, 0.0), clipped=out.clipped & ch.scored)


def one_to_one_divergence(kind: str, x, cfg) -> TermOutput:
    """A top-K + tail divergence at the 1:1 tokens only (0 elsewhere)."""
    teacher, _ = x.teacher(cfg.teacher_temperature)
    out = bucket_divergence(kind, teacher, x.student, tail=cfg.tail_bucket, beta=cfg.beta,
                            entry_clip=cfg.entry_clip, token_clip=cfg.token_clip)
    keep = x.chunks.one_to_one
    return TermOutput(loss=torch.where(keep, out.loss, 0.0), clipped=out.clipped & keep)


def sorted_probability_l1(student: Buckets, teacher: Buckets) -> torch.Tensor:
    """[m] ULD distance: L1 between the two rows' probabilities sorted descending, plus the tails'.

    Rows of different widths are compared as if the shorter were padded with zeros (ULD's convention for
    two vocabularies of different sizes)."""
    s = student.logp.exp().sort(dim=1, descending=True).values
    t = teacher.logp.exp().sort(dim=1, descending=True).values
    width = max(s.shape[1], t.shape[1])
    s, t = F.pad(s, (0, width - s.shape[1])), F.pad(t, (0, width - t.shape[1]))
    return (s - t).abs().sum(dim=1) + (student.log_tail.exp() - teacher.log_tail.exp()).abs()


def uld(x, cfg) -> TermOutput:
    """The sorted-probability term at ``ChunkInputs.uld_tokens`` (module docstring)."""
    zeros = x.student_sampled.new_zeros(x.student_sampled.shape[0])
    none = TermOutput(loss=zeros, clipped=zeros.bool())
    if x.chunks is None:
        return none
    at = x.chunks.uld_tokens.nonzero().squeeze(1)
    if at.numel() == 0:
        return none
    if x.in_trainer is None:
        raise ObjectiveError("uld needs the student's logits (ObjectiveInputs.in_trainer) to read its own top-K")
    it = x.in_trainer
    k = x.topk_logprobs.shape[1]
    rows = it.rows[at]
    ids = global_topk_ids(it.student_logits, rows, k, it.shard, chunk_tokens=it.chunk_tokens)
    sel = select_logprobs(it.student_logits, rows, ids, it.shard, tail_cols=ids.shape[1], chunk_tokens=it.chunk_tokens)
    teacher, _ = teacher_at_temperature(x.topk_logprobs[at], x.tail_logmass[at], cfg.teacher_temperature)
    dist = sorted_probability_l1(Buckets(sel.logp, sel.log_tail), teacher)
    if cfg.token_clip > 0:
        clipped_at = dist > cfg.token_clip
        dist = dist.clamp(max=cfg.token_clip)
    else:
        clipped_at = torch.zeros_like(dist, dtype=torch.bool)
    loss = zeros.index_put((at,), dist)
    return TermOutput(loss=loss, clipped=zeros.bool().index_put((at,), clipped_at))
