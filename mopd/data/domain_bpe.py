"""A byte-level BPE tokenizer trained on the synthetic domains' text, saved as an HF tokenizer folder.

The cross-tokenizer toy (``bench/cross_tokenizer_toy.py``) needs a student whose tokenizer is really
different from the experts' character tokenizer: this is a GPT-2-style byte-level BPE (the full 256-byte
alphabet plus merges learnt from the domains' prompts and answers, special tokens ``<pad>`` ``<bos>``
``<eos>``, ``<bos>`` prepended on encode as the char tokenizer does), trained with the ``tokenizers``
library and saved with ``save_pretrained``, so it loads with ``AutoTokenizer.from_pretrained`` like any
other. Nothing is downloaded. The folder is written under a temporary name and renamed when complete.

    python -m mopd.data.domain_bpe OUT_DIR [--vocab-size 320] [--domains reverse caesar] [--text-alphabet]
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mopd.data.synthetic import generate

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"


def train_domain_bpe(domains: Sequence[str], vocab_size: int = 320, examples: int = 4000, seed: int = 0,
                     byte_alphabet: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` entries learnt from ``examples`` prompts+answers per domain.

    ``byte_alphabet``: all 256 bytes are tokens (GPT-2's choice: any text encodes). Without it only the
    bytes the domains use are (~30), so a small ``vocab_size`` is mostly merges, and any other character
    encodes as ``<unk>`` (a teacher using it scores a response up to such a character, DESIGN.md §13)."""
    texts = [e.prompt + e.reference for d in domains for e in generate(d, examples, seed=seed)]
    unk = None if byte_alphabet else UNK
    backend = Tokenizer(models.BPE(unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, *([unk] if unk else [])],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_alphabet else [])
    backend.train_from_iterator(texts, trainer)
    bos = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                           special_tokens=[(BOS, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=unk,
                                   padding_side="right", clean_up_tokenization_spaces=False)


def save_domain_bpe(out: str | Path, domains: Sequence[str], vocab_size: int = 320, byte_alphabet: bool = True) -> Path:
    """Train and save to ``out`` (replaced if present); returns ``out``."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    train_domain_bpe(domains, vocab_size, byte_alphabet=byte_alphabet).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--vocab-size", type=int, default=320)
    parser.add_argument("--domains", nargs="+", default=["reverse", "caesar"])
    parser.add_argument("--text-alphabet", action="store_true",
                        help="only the bytes the domains use are base tokens, not all 256")
    args = parser.parse_args(argv)
    print(save_domain_bpe(args.out, args.domains, args.vocab_size, byte_alphabet=not args.text_alphabet))


if __name__ == "__main__":
    main()
