"""Typed records that cross component boundaries (DESIGN.md §3).

Shape letters: ``P`` prompt tokens, ``T`` response tokens of one rollout, ``N`` response tokens of a
packed batch (the sum of ``T``), ``K`` top-K entries, ``M`` teachers, ``B`` sequences of a micro-batch,
``S`` padded sequence length. Everything is a frozen dataclass of tensors; nothing is a string-keyed
dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from mopd.errors import ObjectiveError


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt as the rollout engine sees it."""

    index: int
    """Position of the prompt in its source (stable across resumes)."""
    ids: torch.Tensor
    """[P] int64 token ids, already rendered with the chat template when the model has one."""
    text: str
    """The prompt as text (for PI templates and logs)."""
    domain: str
    """Domain tag used by per-prompt routing and per-domain metrics."""
    pi: str | None = None
    """Privileged information a PI self-teacher sees (reference answer, hint, system prompt)."""
    reference: str | None = None
    """Reference answer for the domain's verifier."""
    metadata: dict[str, str] = field(default_factory=dict)
    """Free-form string metadata that routing rules can match on."""
    messages: tuple[dict[str, str], ...] | None = None
    """The conversation ``ids`` render (``{"role", "content"}`` dicts), set whenever the tokenizer has a
    chat template, so a teacher can re-render it (with PI inside, or in its own template); None for a
    plain-text prompt."""


@dataclass(frozen=True, slots=True)
class Rollout:
    """One sampled response to one prompt."""

    prompt_ids: torch.Tensor
    """[P] int64."""
    response_ids: torch.Tensor
    """[T] int64 sampled tokens (stop token included when generation stopped on one)."""
    behaviour_logprobs: torch.Tensor
    """[T] fp32 log-probability of each sampled token under the weights that sampled it."""
    finish: str
    """"stop" (stop token or string) or "length" (hit max_new_tokens)."""
    weight_version: int
    """Version of the student weights the engine held when it sampled."""
    domain: str
    prompt_index: int
    pi: str | None = None
    reference: str | None = None
    text: str = ""
    """The decoded response (for verifiers and logs)."""
    messages: tuple[dict[str, str], ...] | None = None
    """The prompt's conversation (``Prompt.messages``); None for a plain-text prompt."""


@dataclass(frozen=True, slots=True)
class ChunkScores:
    """Which chunk of a cross-tokenizer alignment each student response token belongs to (DESIGN.md §13).

    A chunk is a run of student tokens and teacher tokens covering the same bytes of the response
    (``mopd.teachers.alignment``); ``sampled_logprob`` of its first student token carries the teacher's
    log p(chunk text), its other tokens 0. A same-tokenizer teacher is the case where every token is its
    own 1:1 chunk.
    """

    chunk: torch.Tensor
    """[N] int64 chunk index within the token's rollout (0, 1, ... in order); -1: outside the scored text."""
    teacher_tokens: torch.Tensor
    """[N] int32 teacher tokens in the token's chunk (0 where ``chunk`` is -1)."""

    @staticmethod
    def one_per_token(lengths: list[int]) -> ChunkScores:
        """Every token its own 1:1 chunk (a same-tokenizer teacher's scores, packed with ``lengths``)."""
        chunk = torch.cat([torch.arange(t) for t in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
        return ChunkScores(chunk=chunk, teacher_tokens=torch.ones(sum(lengths), dtype=torch.int32))


@dataclass(frozen=True, slots=True)
class TeacherScores:
    """A teacher's view of the student's response tokens: the top-K transport unit.

    The first dimension is response tokens: ``T`` for one rollout or ``N`` for a packed batch.
    Per token this is ``6K + 8`` bytes with bf16 logprobs (int32 id + 2-byte logprob per entry,
    plus two fp32 scalars).
    """

    topk_ids: torch.Tensor
    """[N, K] int32 token ids, most probable first."""
    topk_logprobs: torch.Tensor
    """[N, K] bf16/fp16/fp32 log-probabilities normalised over the full vocabulary."""
    sampled_logprob: torch.Tensor
    """[N] fp32 teacher log-probability of the token the student sampled."""
    tail_logmass: torch.Tensor
    """[N] fp32 ``log(1 - sum(exp(topk_logprobs)))``: the mass outside the top-K (``-inf`` if none)."""
    teacher: str
    """Name of the teacher that produced these scores (errors and metrics use it)."""
    chunks: ChunkScores | None = None
    """Set by cross-tokenizer teachers: the alignment chunk of each row (None: each row is its own token)."""

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])

    def check(self, vocab_size: int, num_tokens: int | None = None) -> None:
        """Raise ObjectiveError naming the teacher and the first bad position, if any."""
        n, k = self.topk_ids.shape
        for name, t, shape in (
            ("topk_logprobs", self.topk_logprobs, (n, k)),
            ("sampled_logprob", self.sampled_logprob, (n,)),
            ("tail_logmass", self.tail_logmass, (n,)),
        ):
            if tuple(t.shape) != shape:
                raise ObjectiveError(
                    f"teacher {self.teacher!r}: {name} has shape {tuple(t.shape)}, expected {shape} "
                    f"to match topk_ids {tuple(self.topk_ids.shape)}"
                )
        if num_tokens is not None and n != num_tokens:
            raise ObjectiveError(
                f"teacher {self.teacher!r}: scores cover {n} tokens but the batch has {num_tokens} response tokens"
            )
        bad_id = (self.topk_ids < 0) | (self.topk_ids >= vocab_size)
        if bad_id.any():
            pos, j = (int(x) for x in bad_id.nonzero()[0])
            raise ObjectiveError(
                f"teacher {self.teacher!r}: top-K id {int(self.topk_ids[pos, j])} at position {pos} "
                f"(entry {j}) is outside the vocabulary [0, {vocab_size})"
            )
        for name, t in (("topk_logprobs", self.topk_logprobs), ("sampled_logprob", self.sampled_logprob)):
            bad = ~torch.isfinite(t.float())
            if bad.any():
                pos = int(bad.nonzero()[0][0])
                raise ObjectiveError(f"teacher {self.teacher!r}: non-finite {name} at response position {pos}")

    def select(self, index: torch.Tensor) -> TeacherScores:
        """Rows ``index`` (a [n] int64 index or [N] bool mask) of every field."""
        return replace(
            self,
            topk_ids=self.topk_ids[index],
            topk_logprobs=self.topk_logprobs[index],
            sampled_logprob=self.sampled_logprob[index],
            tail_logmass=self.tail_logmass[index],
            chunks=None if self.chunks is None else ChunkScores(self.chunks.chunk[index],
                                                                self.chunks.teacher_tokens[index]),
        )

    @staticmethod
    def concat(parts: list[TeacherScores]) -> TeacherScores:
        """Concatenate along tokens; all parts must share K and teacher."""
        if not parts:
            raise ObjectiveError("TeacherScores.concat: nothing to concatenate")
        names = {p.teacher for p in parts}
        ks = {p.k for p in parts}
        if len(names) != 1 or len(ks) != 1:
            raise ObjectiveError(f"TeacherScores.concat: mixed teachers {sorted(names)} or K {sorted(ks)}")
        return TeacherScores(
            topk_ids=torch.cat([p.topk_ids for p in parts]),
            topk_logprobs=torch.cat([p.topk_logprobs for p in parts]),
            sampled_logprob=torch.cat([p.sampled_logprob for p in parts]),
            tail_logmass=torch.cat([p.tail_logmass for p in parts]),
            teacher=parts[0].teacher,
            chunks=concat_chunks(parts),
        )


def concat_chunks(parts: list[TeacherScores]) -> ChunkScores | None:
    """The parts' chunks in order (None when no part has any; a part without is one token per chunk).

    Chunk indices stay per rollout: each part is one rollout's scores or already a packed run of them.
    """
    if all(p.chunks is None for p in parts):
        return None
    chunks = [p.chunks or ChunkScores.one_per_token([p.num_tokens]) for p in parts]
    return ChunkScores(chunk=torch.cat([c.chunk for c in chunks]),
                       teacher_tokens=torch.cat([c.teacher_tokens for c in chunks]))


@dataclass(frozen=True, slots=True)
class Routing:
    """Which teacher supervises which response token of a batch of rollouts.

    Per-prompt routing is stored expanded to tokens, so consumers only see the per-token form.
    """

    teachers: tuple[str, ...]
    """Names of the M teachers, in the order ``index`` refers to."""
    index: torch.Tensor
    """[N] int64 index into ``teachers`` of each response token's primary teacher."""
    weights: torch.Tensor | None = None
    """[N, M] fp32 mixture weights (rows sum to 1) when a token is supervised by several teachers."""
    granularity: str = "prompt"
    """"prompt" (one teacher per rollout) or "token"."""


@dataclass(frozen=True, slots=True)
class TrainBatch:
    """One micro-batch for one data-parallel rank, teacher tensors aligned to the student's positions.

    Sequences are right-padded to ``S``. Position ``s`` holds the logits that predict token ``s+1``:
    ``targets[b, s] = tokens[b, s+1]`` and ``loss_mask[b, s] = 1`` exactly when ``s+1`` is a response
    token. Teacher tensors are defined at every position and meaningful only where the mask is 1.
    """

    tokens: torch.Tensor
    """[B, S] int64 input ids (prompt + response, right-padded)."""
    position_ids: torch.Tensor
    """[B, S] int64."""
    targets: torch.Tensor
    """[B, S] int64 next token (the sampled token at response positions)."""
    loss_mask: torch.Tensor
    """[B, S] fp32, 1 at response positions."""
    topk_ids: torch.Tensor
    """[B, S, K] int32 teacher top-K ids."""
    topk_logprobs: torch.Tensor
    """[B, S, K] teacher top-K logprobs (bf16/fp16/fp32)."""
    sampled_logprob: torch.Tensor
    """[B, S] fp32 teacher logprob of the target token."""
    tail_logmass: torch.Tensor
    """[B, S] fp32 teacher tail log-mass."""
    behaviour_logprobs: torch.Tensor
    """[B, S] fp32 logprob of the target token under the sampling weights (importance ratios)."""
    teacher_index: torch.Tensor
    """[B, S] int64 teacher of each position (index into the run's teacher list; -1 if none)."""
    reward: torch.Tensor
    """[B] fp32 verifier reward of each sequence (RLSD sign; 0 when unused)."""
    chunk_index: torch.Tensor | None = None
    """[B, S] int64 cross-tokenizer chunk of each position within its sequence (``ChunkScores.chunk``;
    -1 outside the scored text). None when no teacher of the batch is cross-tokenizer."""
    chunk_teacher_tokens: torch.Tensor | None = None
    """[B, S] int32 teacher tokens of that chunk (``ChunkScores.teacher_tokens``); None with chunk_index."""
    teacher_logits: torch.Tensor | None = None
    """[B, S, V_local] logits of an in-trainer teacher (same vocab slice as the student's; None when every
    teacher is remote). Read by ``reverse_kl_student_topk`` at the positions routed to that teacher."""

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch(**{f: None if (v := getattr(self, f)) is None else v.to(device)
                             for f in self.__dataclass_fields__})


LossFn = Callable[[torch.Tensor, TrainBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``loss_fn(logits, batch) -> (loss_sum, metric_sums)``.

``logits`` is [B, S, V_local]: this tensor-parallel rank's contiguous slice of the (padded) vocabulary,
never gathered. ``loss_sum`` is the scalar SUM over valid response tokens of the weighted per-token loss
(not yet normalised); the train step divides by the number of valid tokens of the global batch.
``metric_sums`` are scalar sums over tokens (with matching token counts as metrics of their own) so
they can be summed across micro-batches and data-parallel ranks before dividing.
"""
