"""A deterministic, resumable sampler of prompt batches.

Epoch ``e`` visits every prompt once in the order of a permutation seeded by ``(seed, e)``; a batch
that runs past the end of an epoch continues with the next epoch's order, so every batch is full.
The state is two integers (epoch, position within the epoch's order): saved with a checkpoint and
loaded back, a resumed run draws exactly the prompts the uninterrupted run would have drawn.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

from mopd.errors import DataError
from mopd.types import Prompt


@dataclass(frozen=True, slots=True)
class SamplerState:
    epoch: int
    position: int
    """Prompts of this epoch's order already drawn."""
    seed: int
    num_prompts: int
    """Size of the source the state belongs to (checked on load)."""


class PromptSampler:
    """``next(sampler)`` -> the next ``batch_size`` prompts of ``source``, forever."""

    def __init__(self, source: Sequence[Prompt], batch_size: int, seed: int, shuffle: bool = True):
        if len(source) == 0:
            raise DataError("PromptSampler: the prompt source is empty")
        if batch_size <= 0:
            raise DataError(f"PromptSampler: batch_size must be positive, got {batch_size}")
        self.source, self.batch_size, self.seed, self.shuffle = source, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._order_of(0)

    def _order_of(self, epoch: int) -> list[int]:
        order = list(range(len(self.source)))
        if self.shuffle:
            # A string seed is hashed with SHA-512: the same order in every process and Python run.
            random.Random(f"mopd-sampler/{self.seed}/{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[list[Prompt]]:
        return self

    def __next__(self) -> list[Prompt]:
        batch: list[Prompt] = []
        while len(batch) < self.batch_size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._order_of(self.epoch)
            take = min(self.batch_size - len(batch), len(self._order) - self.position)
            batch.extend(self.source[i] for i in self._order[self.position:self.position + take])
            self.position += take
        return batch

    def state(self) -> SamplerState:
        return SamplerState(epoch=self.epoch, position=self.position, seed=self.seed, num_prompts=len(self.source))

    def state_dict(self) -> dict[str, int]:
        """Plain ints, for a checkpoint's common state."""
        return asdict(self.state())

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved state; refuses a state saved for another seed or source size."""
        missing = [k for k in SamplerState.__dataclass_fields__ if k not in state]
        if missing:
            raise DataError(f"sampler state is missing {missing}; got keys {sorted(state)}")
        saved = SamplerState(**{k: int(state[k]) for k in SamplerState.__dataclass_fields__})
        if (saved.seed, saved.num_prompts) != (self.seed, len(self.source)):
            raise DataError(
                f"sampler state was saved for {saved.num_prompts} prompts with seed {saved.seed}; this sampler has "
                f"{len(self.source)} prompts with seed {self.seed} (did the data or data seed change?)"
            )
        if not 0 <= saved.position <= saved.num_prompts or saved.epoch < 0:
            raise DataError(f"sampler state has epoch {saved.epoch}, position {saved.position}: out of range")
        self.epoch, self.position = saved.epoch, saved.position
        self._order = self._order_of(self.epoch)
