"""Chat rendering, in one place: a conversation -> the token ids a model of that tokenizer reads.

Every user of a chat template goes through here: prompt sources (the student's prompts), the PI
self-teacher (the same conversation with privileged information placed inside it), the sft stage's
``pi_in_prompt`` and a cross-tokenizer teacher (the conversation in the teacher's own template).

A conversation is a sequence of ``{"role": ..., "content": ...}`` dicts (``Messages``). Rendering is
``apply_chat_template(..., tokenize=False)`` followed by tokenising the text without adding special
tokens: the template writes its own ``<bos>`` (or not), so adding special tokens again would double
it. ``enable_thinking`` is passed to the template only when it is not None (Qwen3-style templates
read it; others ignore unknown variables).

PI placement (``PIPlacement``) rewrites a conversation so that a model sees privileged information
where instruct models are trained to read instructions: the system message, or the user's turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mopd.config.distill import PIPlacement
from mopd.errors import DataError

if TYPE_CHECKING:  # transformers is heavy to import; only its type is needed here
    from transformers import PreTrainedTokenizerBase

Message = Mapping[str, str]
"""One chat message: ``{"role": "system" | "user" | "assistant" | ..., "content": str}``."""
Messages = Sequence[Message]

SYSTEM_PROBE = "mopd-system-probe-7f3a"
"""Text rendered as a system message to find out whether a template shows system messages."""


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer`` carries a chat template (then prompts are conversations)."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat_text(tokenizer: PreTrainedTokenizerBase, messages: Messages, *, add_generation_prompt: bool = True,
                     enable_thinking: bool | None = None) -> str:
    """The template's text for ``messages`` (what ``render_chat`` tokenises)."""
    if not has_chat_template(tokenizer):
        raise DataError("a conversation needs a chat template, and the tokenizer has none; set one or give "
                        "plain-text prompts")
    kwargs: dict[str, Any] = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Messages, *, add_generation_prompt: bool = True,
                enable_thinking: bool | None = None) -> list[int]:
    """Token ids of ``messages`` rendered by ``tokenizer``'s own chat template.

    ``add_generation_prompt=True`` ends with the assistant header, so the ids are a prompt a response
    continues. ``enable_thinking`` (None: not passed) switches Qwen3-style thinking. This interface is
    stable: prompt sources, the PI self-teacher and cross-tokenizer teachers all call it.
    """
    text = render_chat_text(tokenizer, messages, add_generation_prompt=add_generation_prompt,
                            enable_thinking=enable_thinking)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_takes_system_message(tokenizer: PreTrainedTokenizerBase, what: str) -> None:
    """Raise DataError naming ``what`` (the config key that needs it) unless the chat template shows a
    system message's text: some templates refuse the role, others drop it silently."""
    probe = [{"role": "system", "content": SYSTEM_PROBE}, {"role": "user", "content": "hello"}]
    try:
        text = render_chat_text(tokenizer, probe)
    except DataError as e:
        raise DataError(f"{what}: {e}") from None
    except Exception as e:  # jinja's raise_exception, TemplateError, ...: the template refused the role
        raise DataError(f"{what} puts text in a system message, but the tokenizer's chat template refuses a "
                        f"system message ({type(e).__name__}: {e}); place it in the user's turn instead") from None
    if SYSTEM_PROBE not in text:
        raise DataError(f"{what} puts text in a system message, but the tokenizer's chat template drops system "
                        "messages (a probe system message did not appear in its rendering); place it in the "
                        "user's turn instead")


def conversation(prompt: str, system_prompt: str | None = None) -> tuple[dict[str, str], ...]:
    """The conversation of a plain prompt string: ``[system (when given), user]``."""
    user = {"role": "user", "content": prompt}
    return ({"role": "system", "content": system_prompt}, user) if system_prompt is not None else (user,)


def join_pi(template: str, pi: str, text: str) -> str:
    """``template`` with ``{pi}`` and its one ``{prompt}`` filled in (no ``str.format``: braces in the
    texts stay as they are)."""
    before, after = template.split("{prompt}")
    return before.replace("{pi}", pi) + text + after.replace("{pi}", pi)


def place_pi(messages: Messages, pi: str, placement: PIPlacement, template: str) -> tuple[dict[str, str], ...]:
    """``messages`` with ``pi`` placed inside: a new conversation, ``messages`` is not changed.

    - ``system``: ``pi`` is the system message (it replaces the first system message, or is inserted
      first). A template's default system message (written only when there is none) is not kept.
    - ``system_append``: ``pi`` is appended to the first system message after a blank line, or is
      inserted first when there is none.
    - ``user``: the last user message's content becomes ``template`` with ``{prompt}`` = that content
      and ``{pi}`` = ``pi`` (``"{pi}\\n\\n{prompt}"`` puts the PI before the user's text,
      ``"{prompt}\\n\\n{pi}"`` after it).
    """
    out = [dict(m) for m in messages]
    if placement == PIPlacement.user:
        last_user = max((i for i, m in enumerate(out) if m.get("role") == "user"), default=None)
        if last_user is None:
            raise DataError("pi_placement=user: the conversation has no user message to put the PI in")
        out[last_user]["content"] = join_pi(template, pi, out[last_user]["content"])
        return tuple(out)
    system = next((i for i, m in enumerate(out) if m.get("role") == "system"), None)
    if system is None:
        return ({"role": "system", "content": pi}, *out)
    if placement == PIPlacement.system:
        out[system]["content"] = pi
    else:
        out[system]["content"] = f"{out[system]['content']}\n\n{pi}"
    return tuple(out)
