"""The offline character tokenizer: ids, round trips, and save/load through AutoTokenizer."""

import string

from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mopd.data.tokenizer import ALPHABET, SPECIAL_TOKENS, VOCAB_SIZE, build_char_tokenizer

SAMPLE = "rev:abc=cba\nadd:47+85=231\nHello, World! {x_y} ~`|\\"


def expected_ids(text: str) -> list[int]:
    """Independent reference: <bos> then 4 + the character's position in the alphabet."""
    return [SPECIAL_TOKENS.index("<bos>")] + [len(SPECIAL_TOKENS) + ALPHABET.index(c) for c in text]


def test_vocabulary_is_small_and_covers_digits_letters_punctuation_space_and_newline():
    tok = build_char_tokenizer()
    assert len(tok) == VOCAB_SIZE == 100 <= 128
    for ch in string.digits + string.ascii_letters + string.punctuation + " \n":
        assert len(tok.encode(ch, add_special_tokens=False)) == 1, repr(ch)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)


def test_encoding_is_one_id_per_character_after_bos_and_decoding_round_trips():
    tok = build_char_tokenizer()
    ids = tok.encode(SAMPLE)
    assert ids == expected_ids(SAMPLE)
    assert tok.decode(ids, skip_special_tokens=True) == SAMPLE
    assert tok.decode(ids) == "<bos>" + SAMPLE
    every_char = "".join(ALPHABET)
    assert tok.decode(tok.encode(every_char, add_special_tokens=False)) == every_char


def test_characters_outside_the_alphabet_become_unk_and_special_tokens_are_atomic():
    tok = build_char_tokenizer()
    assert tok.encode("aé\tb", add_special_tokens=False) == [14, 3, 3, 15]
    assert tok.encode("ab<eos>", add_special_tokens=False) == [14, 15, tok.eos_token_id]


def test_saved_tokenizer_loads_with_autotokenizer_and_encodes_identically(tmp_path):
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert loaded.encode(SAMPLE) == expected_ids(SAMPLE)
    assert loaded.decode(loaded.encode(SAMPLE), skip_special_tokens=True) == SAMPLE
    assert loaded.get_vocab() == tok.get_vocab()
    specials = (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token)
    assert specials == ("<bos>", "<eos>", "<pad>", "<unk>")
    # An HF export copies tokenizer.json; the bare `tokenizers` library must read it the same way.
    bare = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert bare.encode(SAMPLE).ids == expected_ids(SAMPLE)
    assert bare.decode(bare.encode(SAMPLE).ids) == SAMPLE


def test_padding_a_batch_pads_right_with_the_pad_id():
    tok = build_char_tokenizer()
    batch = tok(["ab", "abcd"], padding=True)
    assert batch["input_ids"] == [[1, 14, 15, 0, 0], [1, 14, 15, 16, 17]]
    assert batch["attention_mask"] == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
