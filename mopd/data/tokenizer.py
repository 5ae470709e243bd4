"""A character-level tokenizer built offline, for the synthetic demo and the tests.

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

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
ALPHABET: str = string.digits + string.ascii_lowercase + string.ascii_uppercase + string.punctuation + " \n"
VOCAB_SIZE: int = len(SPECIAL_TOKENS) + len(ALPHABET)


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
