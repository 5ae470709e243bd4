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


# --- the start-up check: data.tokenizer against student.model, on real tokenizers --------------------------

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from mopd.config import ModelConfig  # noqa: E402
from mopd.errors import ConfigError, TeacherError  # noqa: E402


def _smollm2_model(hf_dir: Path, **changes) -> ModelConfig:
    import json

    from mopd.hf.families import model_config_from_hf

    return dataclasses.replace(model_config_from_hf(json.loads((hf_dir / "config.json").read_text())), **changes)


def test_smollm2_tokenizer_fits_its_model_and_the_run_loads_it(smollm2_hf: Path):
    from mopd.config import load_config
    from mopd.data.tokenizer import load_run_tokenizer
    from mopd.pipeline import load_tokenizer

    tok = load_run_tokenizer(str(smollm2_hf), _smollm2_model(smollm2_hf))
    assert (len(tok), tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (49152, 2, 2, 1)
    config = load_config("tests/assets/tiny_run.yaml", ["student.model.vocab_size=49152",
                                                        f"data.tokenizer={smollm2_hf}"])
    assert len(load_tokenizer(config)) == 49152


def test_char_tokenizer_with_a_pretrained_models_vocabulary_is_refused_naming_data_tokenizer(smollm2_hf: Path):
    from mopd.config import load_config
    from mopd.pipeline import load_tokenizer

    config = load_config("tests/assets/tiny_run.yaml", ["student.model.vocab_size=49152", "data.tokenizer=char"])
    with pytest.raises(ConfigError, match=r"data.tokenizer='char' has 100 token ids but student.model.vocab_size="
                                          r"49152.*set data.tokenizer to its HF folder"):
        load_tokenizer(config)


def test_tokenizer_with_more_ids_than_the_model_has_rows_is_refused(smollm2_hf: Path):
    from mopd.data.tokenizer import load_run_tokenizer

    with pytest.raises(ConfigError, match=r"student.model.vocab_size=49151 is smaller than the tokenizer's 49152"):
        load_run_tokenizer(str(smollm2_hf), _smollm2_model(smollm2_hf, vocab_size=49151))


def test_tokenizer_without_a_pad_token_is_refused_naming_it(smollm2_hf: Path):
    from transformers import AutoTokenizer

    from mopd.data.tokenizer import check_tokenizer_fits_model

    tok = AutoTokenizer.from_pretrained(str(smollm2_hf))
    tok.pad_token = None
    with pytest.raises(ConfigError, match=r"data.tokenizer='smollm2' has no pad token"):
        check_tokenizer_fits_model(tok, _smollm2_model(smollm2_hf), name="smollm2")


def test_a_folder_without_a_tokenizer_is_refused_naming_data_tokenizer(tmp_path: Path):
    from mopd.data.tokenizer import load_run_tokenizer

    with pytest.raises(ConfigError, match=rf"data.tokenizer='{tmp_path}' cannot be loaded as a tokenizer"):
        load_run_tokenizer(str(tmp_path), ModelConfig())


def test_teacher_check_refuses_another_family_tokenizer_naming_the_teacher(smollm2_hf: Path, r1_qwen_tokenizer: Path):
    from transformers import AutoTokenizer

    from mopd.teachers.vocab import check_vocab, vocab_differences

    smol = AutoTokenizer.from_pretrained(str(smollm2_hf))
    r1 = AutoTokenizer.from_pretrained(str(r1_qwen_tokenizer))
    assert vocab_differences(smol, AutoTokenizer.from_pretrained(str(smollm2_hf))) == []
    with pytest.raises(TeacherError, match=r"(?s)teacher 'r1_distill': tokenizer does not match the student's.*"
                                           r"vocab size: student 49152, teacher 152067") as info:
        check_vocab("r1_distill", smol, r1)
    assert "eos_token" in str(info.value)


def test_the_domain_bpe_alphabet_is_all_bytes_or_only_the_domains_bytes():
    from mopd.data.domain_bpe import train_domain_bpe
    from mopd.data.synthetic import generate

    full, text = (train_domain_bpe(["reverse", "caesar"], size, byte_alphabet=full_bytes)
                  for size, full_bytes in ((320, True), (64, False)))
    assert (len(full), len(text)) == (320, 64)
    assert full.tokenize("rev:dtey=") == ["rev", ":", "dt", "ey", "="]  # merges learnt from the domains
    # The compact one: the ~30 characters the domains use (lower-case letters, ":", "=") and 4 specials;
    # the rest is merges; a character outside it is <unk> (never silently dropped).
    used = {c for d in ("reverse", "caesar") for e in generate(d, 4000, seed=0) for c in e.prompt + e.reference}
    singles = {t for t in text.get_vocab() if len(t) == 1}
    assert singles == used and {"rev", "rot"} <= set(text.get_vocab())
    for e in generate("reverse", 20, seed=5):
        ids = text(e.prompt)["input_ids"]
        assert ids[0] == text.bos_token_id and text.decode(ids[1:]) == e.prompt
    assert text("aAb")["input_ids"][1:] == [text.convert_tokens_to_ids(c) for c in ("a", "<unk>", "b")]
    assert full.decode(full("aAb")["input_ids"][1:]) == "aAb" and full.unk_token is None
