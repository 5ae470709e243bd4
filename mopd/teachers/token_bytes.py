"""The bytes each token id stands for: what lets two tokenizers be compared on the same text.

A cross-tokenizer teacher aligns the student's tokens and its own as byte spans of one response
(``mopd.teachers.alignment``). The spans must come from the ids themselves: an on-policy student can
sample a tokenisation that is not the canonical encoding of its text, so re-encoding the text and reading
offsets would describe other tokens. ``TokenBytes`` is a per-id table built once per tokenizer from its
vocabulary and its decoder:

- byte-level BPE (GPT-2, Llama-3, Qwen2, SmolLM2; decoder ``ByteLevel``): each token string is written
  in GPT-2's printable stand-ins for the 256 bytes; a piece may be part of a UTF-8 character;
- character / word vocabularies joined without separators (decoder ``Fuse``, mopd's char tokenizer):
  the token string's UTF-8;
- SentencePiece-style (decoder ``Sequence`` of ``Replace("▁", " ")``, ``ByteFallback``, ``Fuse``, with
  no ``Strip``): ``▁`` is a space and ``<0xNN>`` is the byte NN.

Added tokens are their content. Special tokens (``all_special_ids`` and added tokens marked special) are
listed apart: their content never crosses to another tokenizer as text. A decoder outside these forms is
refused at start-up with the decoder named, rather than guessed at.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from mopd.errors import TeacherError

if TYPE_CHECKING:  # transformers is heavy to import; only its type is needed here
    from transformers import PreTrainedTokenizerBase

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable character -> byte table (the inverse of ``bytes_to_unicode``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


@dataclass(frozen=True)
class TokenBytes:
    """Per-id bytes of one tokenizer, and which ids are special."""

    pieces: tuple[bytes, ...]
    """Bytes of every id in ``[0, len(tokenizer))`` (special tokens: their content's UTF-8)."""
    special: frozenset[int]
    """Ids whose text must not cross to another tokenizer (bos, eos, pad, chat markers, ...)."""
    eos_id: int | None
    """The tokenizer's end-of-sequence id, which a cross-tokenizer teacher maps to its own."""
    kind: str
    """The decoder form the table was built for (byte_level, fuse, sentencepiece)."""

    def __len__(self) -> int:
        return len(self.pieces)

    def join(self, ids) -> bytes:
        return b"".join(self.pieces[int(i)] for i in ids)


_TABLES: dict[int, tuple[object, TokenBytes]] = {}


def token_bytes(tokenizer: PreTrainedTokenizerBase, who: str) -> TokenBytes:
    """The table of ``tokenizer``; ``who`` ("teacher 'x'", "the student") names it in errors.

    Built once per tokenizer object (a 152k vocabulary takes about a second), so several teachers
    sharing the student's tokenizer share its table.
    """
    cached = _TABLES.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    table = _build(tokenizer, who)
    _TABLES[id(tokenizer)] = (tokenizer, table)
    return table


def _build(tokenizer: PreTrainedTokenizerBase, who: str) -> TokenBytes:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TeacherError(f"{who}: tokenizer {type(tokenizer).__name__} is not a fast (tokenizers-backed) "
                           "tokenizer, so its tokens' bytes cannot be read; save it as tokenizer.json")
    decoder = json.loads(backend.to_str()).get("decoder")
    kind = _decoder_kind(decoder, who)
    vocab = tokenizer.get_vocab()
    size = len(tokenizer)
    pieces: list[bytes | None] = [None] * size
    added = {i: a for i, a in tokenizer.added_tokens_decoder.items()}
    for token, i in vocab.items():
        if i >= size:
            continue
        if i in added:
            pieces[i] = added[i].content.encode("utf-8")
        else:
            pieces[i] = _piece(token, kind, who, i)
    missing = [i for i, p in enumerate(pieces) if p is None]
    if missing:
        raise TeacherError(f"{who}: ids {missing[:5]} of its {size} tokens have no vocabulary entry")
    special = {int(i) for i in tokenizer.all_special_ids} | {i for i, a in added.items() if a.special}
    eos = tokenizer.eos_token_id
    return TokenBytes(tuple(pieces), frozenset(special), None if eos is None else int(eos), kind)


def _decoder_kind(decoder: dict | None, who: str) -> str:
    kind = (decoder or {}).get("type")
    if kind == "ByteLevel":
        return "byte_level"
    if kind == "Fuse":
        return "fuse"
    if kind == "Sequence":
        steps = [d.get("type") for d in decoder.get("decoders", [])]
        replaces = [d for d in decoder.get("decoders", []) if d.get("type") == "Replace"]
        if "Strip" not in steps and set(steps) <= {"Replace", "ByteFallback", "Fuse"} and all(
                d.get("pattern", {}).get("String") == "▁" and d.get("content") == " " for d in replaces):
            return "sentencepiece"
    raise TeacherError(f"{who}: the tokenizer's decoder {json.dumps(decoder)[:200]} is not one whose token "
                       "bytes mopd can read (ByteLevel, Fuse, or SentencePiece's Replace/ByteFallback/Fuse without "
                       "Strip), so it cannot be aligned with another tokenizer")


def _piece(token: str, kind: str, who: str, i: int) -> bytes:
    if kind == "byte_level":
        table = byte_level_decoder()
        try:
            return bytes(table[c] for c in token)
        except KeyError:
            return token.encode("utf-8")  # not a byte-level piece (a plain added word): its own text
    if kind == "sentencepiece":
        m = _BYTE_TOKEN.match(token)
        return bytes([int(m.group(1), 16)]) if m else token.replace("▁", " ").encode("utf-8")
    return token.encode("utf-8")


def check_round_trip(tokenizer: PreTrainedTokenizerBase, table: TokenBytes, ids: list[int], what: str) -> None:
    """The bytes of ``ids`` decode to what the tokenizer itself decodes them to, else a TeacherError.

    ``what`` names the teacher and rollout. Invalid UTF-8 in the bytes (a byte-level piece cut from its
    character) is compared with the tokenizer's replacement character, as it decodes it.
    """
    mine = table.join(ids).decode("utf-8", errors="replace")
    theirs = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if mine != theirs:
        at = next((k for k, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        raise TeacherError(f"{what}: the response text does not round-trip through the student tokenizer: its "
                           f"tokens' bytes read {mine[max(0, at - 20):at + 20]!r} but the tokenizer decodes "
                           f"{theirs[max(0, at - 20):at + 20]!r} (first difference at character {at}); a "
                           "normaliser or decoder changes the text, so byte spans cannot be aligned")
