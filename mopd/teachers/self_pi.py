"""PI self-teacher: the student's own initial (or EMA) weights, shown privileged information.

Context. ``TeacherConfig.pi_template`` (default ``"{pi}\\n\\n{prompt}"``) is split at ``{prompt}``; the
text pieces around it are formatted with the rollout's PI and tokenised with the student tokenizer
(no special tokens), and the student's prompt ids are spliced in unchanged:

    [bos] + tok(before) + prompt_ids (minus its bos) + tok(after) + response_ids

Splicing ids rather than re-tokenising the joined text keeps the student's exact prompt tokens (a
BPE merge across the PI/prompt boundary would otherwise change them) and needs no prompt text, which
``Rollout`` does not carry. With a chat-templated prompt the PI text therefore lands in front of the
rendered conversation (the student's prompt tokens are never re-rendered). The response tokens are
identical to the student's; only the prefix differs, so the engine's scores for ids[response_start:]
are already the student's response positions (``Teacher._check_request`` verifies that token by
token before sending).

Weights. ``ema_decay == 0``: the engine holds the student's initial weights and never changes.
``ema_decay > 0``: the teacher keeps an fp32 shadow of every HF-named tensor and, on each student
sync, streams ``shadow = decay * shadow + (1 - decay) * student`` into its engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from mopd.config import TeacherConfig, TeacherKind
from mopd.errors import TeacherError
from mopd.rollout.engine import Engine, ScoreRequest
from mopd.teachers.base import Teacher
from mopd.types import Rollout

if TYPE_CHECKING:  # transformers is heavy to import; only its type is needed here
    from transformers import PreTrainedTokenizerBase

class SelfPITeacher(Teacher):
    """The student's initial/EMA weights conditioned on ``pi_template``.

    ``initial_weights``: the HF-named tensors the engine starts from; the EMA shadow starts there.
    Without them the shadow starts at the first streamed student weights (documented drift: the
    first sync happens after one optimizer step).
    """

    def __init__(
        self,
        config: TeacherConfig,
        engine: Engine,
        tokenizer: PreTrainedTokenizerBase,
        initial_weights: Iterable[tuple[str, torch.Tensor]] | None = None,
    ) -> None:
        if config.kind != TeacherKind.self_pi:
            raise TeacherError(f"teacher {config.name!r}: SelfPITeacher needs kind=self_pi, got {config.kind.value}")
        if "{pi}" not in config.pi_template or config.pi_template.count("{prompt}") != 1:
            raise TeacherError(
                f"teacher {config.name!r}: pi_template {config.pi_template!r} must contain {{pi}} and exactly one {{prompt}}"
            )
        super().__init__(config, engine, len(tokenizer))
        self.tokenizer = tokenizer
        self._before, self._after = config.pi_template.split("{prompt}")
        self._shadow: dict[str, torch.Tensor] = {}
        if config.ema_decay > 0 and initial_weights is not None:
            self._shadow = {n: t.detach().to(torch.float32, copy=True) for n, t in initial_weights}

    @property
    def tracks_student(self) -> bool:
        return self.config.ema_decay > 0

    def context(self, rollout: Rollout) -> torch.Tensor:
        """[P'] int64 privileged context for one rollout (everything before its response)."""
        if rollout.pi is None:
            raise TeacherError(
                f"teacher {self.name!r}: prompt {rollout.prompt_index} (domain {rollout.domain!r}) has no PI text; "
                f"route it to another teacher or give the prompt a `pi` field"
            )
        prompt = rollout.prompt_ids.to(torch.int64)
        bos = self.tokenizer.bos_token_id
        head: list[int] = []
        if bos is not None and prompt.numel() and int(prompt[0]) == bos:
            head, prompt = [bos], prompt[1:]
        before = self._encode(self._before.replace("{pi}", rollout.pi))
        after = self._encode(self._after.replace("{pi}", rollout.pi))
        return torch.cat([torch.tensor(head + before, dtype=torch.int64), prompt, torch.tensor(after, dtype=torch.int64)])

    def requests(self, rollouts: Sequence[Rollout]) -> list[ScoreRequest]:
        out = []
        for r in rollouts:
            ctx = self.context(r)
            out.append(ScoreRequest(ids=torch.cat([ctx, r.response_ids.to(torch.int64)]), response_start=int(ctx.numel())))
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Fold the student's streamed weights into the EMA shadow and stream the shadow to the engine."""
        if not self.tracks_student:
            raise TeacherError(f"teacher {self.name!r}: ema_decay=0 keeps the initial weights frozen; nothing to update")
        self.engine.update_weights(self._ema_stream(named_tensors), version)

    def _ema_stream(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        decay = self.config.ema_decay
        fresh = not self._shadow
        for name, tensor in named_tensors:
            new = tensor.detach().to(torch.float32)
            old = self._shadow.get(name)
            if old is None:
                if not fresh:
                    raise TeacherError(f"teacher {self.name!r}: streamed tensor {name!r} is not in the EMA shadow")
                self._shadow[name] = new.clone()
            elif old.shape != new.shape:
                raise TeacherError(
                    f"teacher {self.name!r}: streamed tensor {name!r} has shape {tuple(new.shape)}, "
                    f"EMA shadow has {tuple(old.shape)}"
                )
            else:
                old.mul_(decay).add_(new, alpha=1.0 - decay)
            yield name, self._shadow[name].to(tensor.dtype)

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The fp32 EMA shadow by HF name, to save with a checkpoint (a resumed run keeps its teacher)."""
        return dict(self._shadow)

    def load_ema_state(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        """Restore a saved shadow and load it into the engine."""
        if not self.tracks_student:
            raise TeacherError(f"teacher {self.name!r}: ema_decay=0 keeps no EMA state")
        self._shadow = {n: t.detach().to(torch.float32, copy=True) for n, t in state.items()}
        self.engine.update_weights(iter(self._shadow.items()), version)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []
