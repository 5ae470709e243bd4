"""The one interface every generation/scoring engine implements (embedded HF model, SGLang client)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mopd.config import SamplingConfig
from mopd.types import Prompt, Rollout, TeacherScores


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    """One sequence to score: the teacher's context followed by the student's response tokens."""

    ids: torch.Tensor
    """[L] int64 full sequence (context + response)."""
    response_start: int
    """Index in ``ids`` of the first response token; scores cover ids[response_start:]."""
    sampled_ids: torch.Tensor | None = None
    """[T] the student's response tokens (defaults to ids[response_start:]); their logprobs fill sampled_logprob."""


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    detail: str
    weight_version: int


class Engine(ABC):
    """Generation, scoring and weight updates for one model (possibly behind many servers)."""

    name: str

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[Rollout]:
        """``sampling.n`` rollouts per prompt, prompt-major, with behaviour logprobs of each sampled token."""

    @abstractmethod
    def score(self, requests: Sequence[ScoreRequest], top_k: int) -> list[TeacherScores]:
        """Prefill-only scoring: per request, top-K logprobs (full-vocab normalised) at each response position."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load HF-named, unsharded tensors (a stream; may be a subset of the model) and set the weight version."""

    @abstractmethod
    def health(self) -> Health:
        """Whether the engine answers, and the weight version it holds."""

    def close(self) -> None:
        """Release servers, threads and memory. Idempotent."""
