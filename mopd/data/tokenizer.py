"""The run's tokenizer: loaded from `data.tokenizer` and checked against the student model before any step
(`load_run_tokenizer`), or mopd's character-level tokenizer built offline for the synthetic demo and tests.

The start-up check (`check_tokenizer_fits_model`): every token id the tokenizer can produce has a row in
the model's vocabulary, eos and pad exist (eos ends responses, pad fills batches) and, like bos, lie inside
it; and the model's vocabulary is not many times larger than the tokenizer's -- the sign of a pretrained
model's config run with the 100-token character tokenizer (every real token id would be unreachable).

The character tokenizer:

One token per character of a fixed alphabet (digits, ASCII letters, ASCII punctuation, space and
newline) plus four special tokens, wrapped as a ``transformers.PreTrainedTokenizerFast`` so that it
saves with ``save_pretrained``, loads with ``AutoTokenizer.from_pretrained`` and ships with an HF
export like any other tokenizer. Nothing is downloaded.

Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then the alphabet in ``ALPHABET`` order, so
the vocabulary has ``len(SPECIAL_TOKENS) + len(ALPHABET)`` = 100 entries. Encoding with special
tokens prepends ``<bos>`` (as Llama tokenizers do); ``<eos>`` ends a response and is the stop token.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mopd.errors import ConfigError

if TYPE_CHECKING:
    from mopd.config import ModelConfig

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
ALPHABET: str = string.digits + string.ascii_lowercase + string.ascii_uppercase + string.punctuation + " \n"
VOCAB_SIZE: int = len(SPECIAL_TOKENS) + len(ALPHABET)
CHAR = "char"
# A model vocabulary this many times the tokenizer's leaves most rows unreachable: the wrong tokenizer.
MAX_UNUSED_VOCAB_FACTOR = 2


def _char_backend() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(ALPHABET)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # [\s\S] rather than ".", which skips newlines: every character becomes its own pre-token.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse joins decoded characters without the space WordLevel's default decoding inserts.
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def build_char_tokenizer(model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """The demo's character tokenizer: vocabulary of ``VOCAB_SIZE`` (100) tokens, no chat template.

    ``encode("ab")`` is ``[1, 14, 15]`` (``<bos>`` then one id per character); characters outside
    ``ALPHABET`` map to ``<unk>``.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=_char_backend(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def load_run_tokenizer(name: str, model: ModelConfig, *, key: str = "data.tokenizer") -> PreTrainedTokenizerBase:
    """`data.tokenizer` ("char" or an HF tokenizer folder) loaded and checked against the student `model`."""
    if name == CHAR:
        tokenizer = build_char_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as exc:  # a missing folder, no tokenizer files, a broken tokenizer.json
            raise ConfigError(f"{key}={name!r} cannot be loaded as a tokenizer ({type(exc).__name__}: {exc})") from None
    check_tokenizer_fits_model(tokenizer, model, name=name, key=key)
    return tokenizer


def check_tokenizer_fits_model(tokenizer: PreTrainedTokenizerBase, model: ModelConfig, *, name: str,
                               key: str = "data.tokenizer") -> None:
    """Raise ConfigError naming `key` when `tokenizer` and the model's vocabulary cannot work together."""
    vocab = model.vocab_size
    where = f"{key}={name!r}"
    ids = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    if ids > vocab:
        raise ConfigError(f"student.model.vocab_size={vocab} is smaller than the tokenizer's {ids} token ids "
                          f"({where}): the model has no row for the highest ids; use the model's own tokenizer")
    if vocab > MAX_UNUSED_VOCAB_FACTOR * ids:
        hint = (f"the character tokenizer has {VOCAB_SIZE} tokens; a pretrained model needs its own tokenizer: set "
                f"{key} to its HF folder (the folder `convert_hf.py import` writes holds the tokenizer files)"
                if name == CHAR else "is this the model's tokenizer?")
        raise ConfigError(f"{where} has {ids} token ids but student.model.vocab_size={vocab}: most of the model's "
                          f"vocabulary would be unreachable; {hint}")
    for role, required in (("eos", True), ("pad", True), ("bos", False)):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is None:
            if required:
                raise ConfigError(f"{where} has no {role} token (mopd {_ROLE_USE[role]}); use a tokenizer whose "
                                  f"tokenizer_config.json sets {role}_token")
            continue
        if not 0 <= token_id < vocab:
            raise ConfigError(f"{where}: its {role} token {getattr(tokenizer, f'{role}_token')!r} has id {token_id}, "
                              f"outside student.model.vocab_size={vocab}")


_ROLE_USE = {"eos": "ends every response with it", "pad": "fills batches with it", "bos": "starts prompts with it"}
