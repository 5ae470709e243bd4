"""The Teacher interface: a frozen config plus an engine that scores the student's response tokens.

A teacher turns rollouts into ``ScoreRequest``s (its own context followed by the student's exact
response tokens), sends them to its engine in ONE call, and checks that what comes back is aligned to
each rollout's response: ``T`` rows, ``K`` columns, ids inside the vocabulary, finite logprobs.
Subclasses only decide the context (``requests``); validation lives here once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import torch

from mopd.config import TeacherConfig
from mopd.errors import ObjectiveError, TeacherError
from mopd.rollout.engine import Engine, ScoreRequest
from mopd.types import Rollout, TeacherScores


class Teacher(ABC):
    """One configured teacher. ``vocab_size`` is the (student) tokenizer's vocabulary, which every
    returned top-K id must fall inside."""

    def __init__(self, config: TeacherConfig, engine: Engine, vocab_size: int) -> None:
        self.config = config
        self.engine = engine
        self.vocab_size = int(vocab_size)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def tracks_student(self) -> bool:
        """Whether the training loop must stream the student's weights into this teacher."""
        return False

    @abstractmethod
    def requests(self, rollouts: Sequence[Rollout]) -> list[ScoreRequest]:
        """One ScoreRequest per rollout: this teacher's context followed by the rollout's response_ids."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        raise TeacherError(f"teacher {self.name!r} ({self.config.kind.value}) does not track the student's weights")

    def score(self, rollouts: Sequence[Rollout], top_k: int) -> list[TeacherScores]:
        """Per rollout, TeacherScores with ``T`` rows (one per response token) and ``top_k`` columns.

        Rollouts with an empty response get empty scores without a round trip to the engine.
        """
        live = [i for i, r in enumerate(rollouts) if r.response_ids.numel() > 0]
        out = [self._empty(top_k) for _ in rollouts]
        if not live:
            return out
        reqs = self.requests([rollouts[i] for i in live])
        for i, req in zip(live, reqs):
            self._check_request(req, rollouts[i])
        for i, scores in zip(live, self._engine_score(reqs, top_k)):
            out[i] = self._checked(scores, rollouts[i], top_k)
        return out

    def _engine_score(self, reqs: list[ScoreRequest], top_k: int) -> list[TeacherScores]:
        """The engine's scores for ``reqs``, one per request; any engine failure names this teacher."""
        try:
            got = self.engine.score(reqs, top_k)
        except TeacherError:
            raise
        except Exception as exc:  # engines raise EngineError, httpx errors, CUDA OOM...: name the teacher
            raise TeacherError(f"teacher {self.name!r}: scoring {len(reqs)} rollouts failed: {exc}") from exc
        if len(got) != len(reqs):
            raise TeacherError(f"teacher {self.name!r}: engine returned {len(got)} scores for {len(reqs)} requests")
        return got

    def _check_request(self, req: ScoreRequest, rollout: Rollout) -> None:
        """The request's scored span must be the student's response, token for token."""
        scored = req.ids[req.response_start:]
        resp = rollout.response_ids
        if scored.shape != resp.shape or not torch.equal(scored.to(resp.dtype), resp):
            bad = _first_difference(scored, resp)
            raise TeacherError(
                f"teacher {self.name!r}: request for prompt {rollout.prompt_index} does not end with the student's "
                f"response tokens (first difference at response position {bad})"
            )

    def _checked(self, scores: TeacherScores, rollout: Rollout, top_k: int) -> TeacherScores:
        n = rollout.response_ids.numel()
        if scores.k != top_k:
            raise TeacherError(f"teacher {self.name!r}: engine returned K={scores.k}, asked for K={top_k}")
        try:
            scores.check(self.vocab_size, num_tokens=n)
        except ObjectiveError as exc:
            raise TeacherError(f"teacher {self.name!r}, prompt {rollout.prompt_index}: {exc}") from None
        return TeacherScores(
            topk_ids=scores.topk_ids.to(torch.int32),
            topk_logprobs=scores.topk_logprobs,
            sampled_logprob=scores.sampled_logprob.float(),
            tail_logmass=scores.tail_logmass.float(),
            teacher=self.name,
        )

    def _empty(self, top_k: int) -> TeacherScores:
        return TeacherScores(
            topk_ids=torch.zeros(0, top_k, dtype=torch.int32),
            topk_logprobs=torch.zeros(0, top_k, dtype=torch.float32),
            sampled_logprob=torch.zeros(0),
            tail_logmass=torch.zeros(0),
            teacher=self.name,
        )


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    diff = (a[:n].to(torch.int64) != b[:n].to(torch.int64)).nonzero()
    return int(diff[0]) if diff.numel() else n
