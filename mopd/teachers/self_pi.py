"""PI self-teacher: the student's own initial (or EMA) weights, shown privileged information.

PI text. ``TeacherConfig.shared_pi`` when set (one rule for every prompt, e.g. a system prompt the
student should internalise), otherwise the rollout's own ``pi`` (instance PI such as the reference
answer, from ``data.pi_field``). A prompt without either is a TeacherError naming it;
``check_pi_coverage`` (in ``mopd.teachers.build``) finds such prompts before the first step.

Context with a chat template (the rollout carries its conversation, ``Rollout.messages``): the
conversation is re-rendered by the tokenizer's own template with the PI placed inside it
(``pi_placement``: the system message, appended to it, or the user's turn through ``pi_template``;
``mopd.data.chat.place_pi``) and ``add_generation_prompt=True``. First the teacher re-renders the
conversation without PI and checks that it gives the student's prompt ids exactly, so a mismatch
(another ``enable_thinking``, ids edited without their messages) is an error, never a silently
different context.

Context of a plain-text prompt (no chat template): ``pi_template`` (default ``"{pi}\n\n{prompt}"``) is
split at ``{prompt}``; the text pieces around it are formatted with the PI and tokenised with the
student tokenizer (no special tokens), and the student's prompt ids are spliced in unchanged:

    [bos] + tok(before) + prompt_ids (minus its bos) + tok(after)

Splicing ids rather than re-tokenising the joined text keeps the student's exact prompt tokens (a
BPE merge across the PI/prompt boundary would otherwise change them).

Either way the student's response ids follow the context unchanged: only the response tokens must be
identical to the student's, and ``Teacher._check_request`` verifies that token by token before
sending, so the engine's scores for ids[response_start:] are the student's response positions.

Weights. ``ema_decay == 0``: the engine holds the student's initial weights and never changes.
``ema_decay > 0``: the teacher keeps an fp32 shadow of every HF-named tensor and, on each student
sync, streams ``shadow = decay * shadow + (1 - decay) * student`` into its engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from mopd.config import PIPlacement, TeacherConfig, TeacherKind
from mopd.data.chat import check_takes_system_message, has_chat_template, place_pi, render_chat
from mopd.errors import DataError, TeacherError
from mopd.rollout.engine import Engine, ScoreRequest
from mopd.teachers.base import Teacher, _first_difference
from mopd.types import Rollout

if TYPE_CHECKING:  # transformers is heavy to import; only its type is needed here
    from transformers import PreTrainedTokenizerBase

class SelfPITeacher(Teacher):
    """The student's initial/EMA weights conditioned on privileged information.

    ``initial_weights``: the HF-named tensors the engine starts from; the EMA shadow starts there.
    Without them the shadow starts at the first streamed student weights (documented drift: the
    first sync happens after one optimizer step). ``enable_thinking`` must be what the student's
    prompts were rendered with (``data.enable_thinking``).
    """

    def __init__(
        self,
        config: TeacherConfig,
        engine: Engine,
        tokenizer: PreTrainedTokenizerBase,
        initial_weights: Iterable[tuple[str, torch.Tensor]] | None = None,
        enable_thinking: bool | None = None,
    ) -> None:
        if config.kind != TeacherKind.self_pi:
            raise TeacherError(f"teacher {config.name!r}: SelfPITeacher needs kind=self_pi, got {config.kind.value}")
        if "{pi}" not in config.pi_template or config.pi_template.count("{prompt}") != 1:
            raise TeacherError(
                f"teacher {config.name!r}: pi_template {config.pi_template!r} must contain {{pi}} and exactly one {{prompt}}"
            )
        _check_placement(config, tokenizer)
        super().__init__(config, engine, len(tokenizer))
        self.tokenizer = tokenizer
        self.enable_thinking = enable_thinking
        self._before, self._after = config.pi_template.split("{prompt}")
        self._shadow: dict[str, torch.Tensor] = {}
        if config.ema_decay > 0 and initial_weights is not None:
            self._shadow = {n: t.detach().to(torch.float32, copy=True) for n, t in initial_weights}

    @property
    def tracks_student(self) -> bool:
        return self.config.ema_decay > 0

    def pi_of(self, index: int, domain: str, pi: str | None) -> str:
        """The PI shown with prompt ``index``: the shared rule, else the prompt's own PI."""
        if self.config.shared_pi is not None:
            return self.config.shared_pi
        if pi is None:
            raise TeacherError(
                f"teacher {self.name!r}: prompt {index} (domain {domain!r}) has no PI text; route it to another "
                f"teacher, give the prompt a PI field (data.pi_field), or set distill.teachers[{self.name}].shared_pi"
            )
        return pi

    def context(self, rollout: Rollout) -> torch.Tensor:
        """[P'] int64 privileged context for one rollout (everything before its response)."""
        pi = self.pi_of(rollout.prompt_index, rollout.domain, rollout.pi)
        if rollout.messages is not None:
            return torch.tensor(self._chat_context(rollout, pi), dtype=torch.int64)
        if has_chat_template(self.tokenizer):
            raise TeacherError(
                f"teacher {self.name!r}: prompt {rollout.prompt_index} carries no conversation (Rollout.messages), "
                "but the tokenizer has a chat template: the teacher cannot re-render it with the PI inside"
            )
        prompt = rollout.prompt_ids.to(torch.int64)
        bos = self.tokenizer.bos_token_id
        head: list[int] = []
        if bos is not None and prompt.numel() and int(prompt[0]) == bos:
            head, prompt = [bos], prompt[1:]
        before = self._encode(self._before.replace("{pi}", pi))
        after = self._encode(self._after.replace("{pi}", pi))
        return torch.cat([torch.tensor(head + before, dtype=torch.int64), prompt, torch.tensor(after, dtype=torch.int64)])

    def context_messages(self, rollout: Rollout) -> tuple[dict[str, str], ...]:
        """The conversation the teacher reads: the rollout's, with the PI placed inside."""
        if rollout.messages is None:
            raise TeacherError(f"teacher {self.name!r}: prompt {rollout.prompt_index} has no conversation")
        pi = self.pi_of(rollout.prompt_index, rollout.domain, rollout.pi)
        return place_pi(rollout.messages, pi, self.config.pi_placement, self.config.pi_template)

    def _chat_context(self, rollout: Rollout, pi: str) -> list[int]:
        student = render_chat(self.tokenizer, rollout.messages, enable_thinking=self.enable_thinking)
        if student != rollout.prompt_ids.tolist():
            bad = _first_difference(torch.tensor(student), rollout.prompt_ids)
            raise TeacherError(
                f"teacher {self.name!r}: prompt {rollout.prompt_index}'s conversation re-rendered by the chat template "
                f"does not give the student's prompt ids (first difference at token {bad}); the student's prompt "
                f"must be rendered from Rollout.messages with the same enable_thinking (data.enable_thinking)"
            )
        placed = place_pi(rollout.messages, pi, self.config.pi_placement, self.config.pi_template)
        return render_chat(self.tokenizer, placed, add_generation_prompt=True, enable_thinking=self.enable_thinking)

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


def _check_placement(config: TeacherConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """A system placement needs a chat template that shows system messages."""
    if config.pi_placement == PIPlacement.user:
        return
    key = f"distill.teachers[{config.name}].pi_placement={config.pi_placement.value}"
    if not has_chat_template(tokenizer):
        raise TeacherError(f"{key} needs a chat template, and the tokenizer has none; plain-text prompts take "
                           "pi_placement=user (pi_template around the prompt)")
    try:
        check_takes_system_message(tokenizer, key)
    except DataError as e:
        raise TeacherError(str(e)) from None
