"""How often two real tokenizers agree on token boundaries: what a cross-tokenizer teacher can score 1:1.

For each ordered pair (student, teacher) of SmolLM2-135M-Instruct's BPE, DeepSeek-R1-Distill-Qwen's BPE
and mopd's char tokenizer, on English prose (the Zen of Python and the GPL-3 text), numerics (arithmetic,
decimals, dates, amounts) and Python code, it tokenises the text with each (canonically) and aligns the
two as byte spans with mopd's own alignment (``mopd.teachers.alignment.align_pieces``). Printed per row:

    boundary   student token ends that are also teacher token ends (the shared boundaries)
    1:1        student tokens whose chunk is one token on each side (what top-K divergences can use)
    chunk      student tokens per chunk (the granularity of the chunk-level reverse KL)

The texts are restricted to the char tokenizer's alphabet (ASCII letters, digits, punctuation, space,
newline) so that all three pairs read the same bytes.

    .venv/bin/python bench/tokenizer_boundaries.py
"""

from __future__ import annotations

import codecs
import contextlib
import datetime
import inspect
import io
import random
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

GPL = Path("/usr/share/common-licenses/GPL-3")


def prose() -> str:
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # noqa: F401 - the Zen, rot13-encoded in the module (importing it prints it)
    zen = codecs.decode(sys.modules["this"].s, "rot13")
    gpl = GPL.read_text()[:6000] if GPL.is_file() else ""
    return zen + "\n" + gpl


def numerics(lines: int = 300, seed: int = 0) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 99999), rng.randint(0, 9999)
        day = datetime.date(2000, 1, 1) + datetime.timedelta(days=rng.randint(0, 9000))
        out.append(rng.choice([f"{a} + {b} = {a + b}.", f"{a / 7:.4f} * {b} = {a / 7 * b:.2f}",
                               f"On {day.isoformat()} the total was ${a:,}.{b % 100:02d}",
                               f"x_{b % 10} = {a} - {b} = {a - b};"]))
    return "\n".join(out)


def code() -> str:
    import json.decoder
    import textwrap as tw

    return inspect.getsource(json.decoder) + inspect.getsource(tw)[:6000]


def restrict(text: str) -> str:
    from mopd.data.tokenizer import ALPHABET

    allowed = set(ALPHABET)
    return "".join(c if c in allowed else " " for c in text)


def agreement(student, teacher, text: str) -> tuple[float, float, float, int, int]:
    from mopd.teachers.alignment import align_pieces
    from mopd.teachers.token_bytes import token_bytes

    sb, tb = token_bytes(student, "student"), token_bytes(teacher, "teacher")
    s = [sb.pieces[i] for i in student(text, add_special_tokens=False)["input_ids"]]
    t = [tb.pieces[i] for i in teacher(text, add_special_tokens=False)["input_ids"]]
    assert b"".join(s) == b"".join(t) == text.encode(), "a tokenizer does not reproduce the text's bytes"
    ends_s, ends_t, pos = set(), set(), 0
    for p in s:
        pos += len(p)
        ends_s.add(pos)
    pos = 0
    for p in t:
        pos += len(p)
        ends_t.add(pos)
    chunks = align_pieces(s, t)
    one = sum(1 for s0, s1, t0, t1 in chunks if s1 - s0 == 1 and t1 - t0 == 1)
    return len(ends_s & ends_t) / len(ends_s), one / len(s), len(s) / len(chunks), len(s), len(t)


def main() -> None:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    from real_models import r1_qwen_tokenizer_dir, smollm2_hf_dir

    from mopd.data.tokenizer import build_char_tokenizer

    hf_logging.set_verbosity_error()  # whole texts exceed model_max_length; nothing is run through a model
    toks = {"smollm2": AutoTokenizer.from_pretrained(smollm2_hf_dir()),
            "r1_qwen": AutoTokenizer.from_pretrained(r1_qwen_tokenizer_dir()),
            "char": build_char_tokenizer()}
    texts = {"prose": restrict(prose()), "numerics": restrict(numerics()), "code": restrict(code())}
    print("texts: " + ", ".join(f"{k} {len(v):,} chars" for k, v in texts.items()))
    print(f"{'student':>8} -> {'teacher':<8} {'text':<9} {'boundary':>8} {'1:1':>6} {'chunk':>6} "
          f"{'tokens (student/teacher)':>25}")
    for a, b in [("smollm2", "r1_qwen"), ("r1_qwen", "smollm2"), ("smollm2", "char"), ("char", "smollm2"),
                 ("r1_qwen", "char"), ("char", "r1_qwen")]:
        for name, text in texts.items():
            bound, one, chunk, ns, nt = agreement(toks[a], toks[b], text)
            print(f"{a:>8} -> {b:<8} {name:<9} {bound:8.3f} {one:6.3f} {chunk:6.2f} {ns:>12,} / {nt:<,}")
    print(textwrap.dedent("""
        boundary: student token ends that are teacher token ends; 1:1: student tokens in one-token-each-side
        chunks; chunk: student tokens per chunk (mopd.teachers.alignment, canonical tokenisations)."""))


if __name__ == "__main__":
    main()
