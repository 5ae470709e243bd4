"""mopd's cross-tokenizer pieces against TRL's GOLD trainer (``trl.experimental.gold.ULDLoss``), on the same
inputs, where the two definitions coincide.

1. Alignment. GOLD groups tokens with ``ULDLoss._align_by_byte_offsets`` (byte offsets of each side's tokens);
   mopd with ``mopd.teachers.alignment.align_pieces`` (the tokens' own bytes). On SmolLM2 -> R1-Distill-Qwen
   tokenisations of prose, numerics and code the groups must be the same.
2. The sorted-probability (ULD) term. GOLD (``use_extended_uld=True``, ``uld_use_hybrid_loss=False``,
   temperature 1) sorts the FULL student and teacher distributions of each aligned group, pads the shorter
   vocabulary with zeros and takes the L1 distance, averaged over groups and then over sequences. mopd's
   ``cross_vocab.sorted_probability_l1`` with K = the whole vocabulary (tail buckets empty) is the same
   number on groups of one token each side. Random logits over the two real vocabularies (49,152 and
   152,067), one sequence of 1:1 groups.

Where they differ, and why (printed at the end): see ``DIFFERENCES``.

    .venv/bin/pip install --no-deps trl   # not a mopd dependency
    OMP_NUM_THREADS=1 .venv/bin/python bench/vs_trl_gold.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

DIFFERENCES = """\
Where mopd and GOLD differ, and why:
- ULD where: GOLD sorts at every aligned group; mopd uses the exact forward KL through a same-bytes vocabulary
  map on 1:1 chunks (entries compared by identity, not by rank) and the sorted term only on the first token of
  wider chunks, where no entry-by-entry match exists.
- Wider groups: GOLD ("observed") multiplies the first position's distribution by the probabilities of the
  group's later actual tokens (unnormalised); mopd compares the first positions' distributions (both predict
  the chunk from the same text prefix) and supervises the rest of the chunk through the chunk-level reverse KL
  (teacher log p(chunk text) - student log p(chunk text), a policy gradient on the student's own samples).
- Support: GOLD needs the teacher's full logits in the trainer's memory; mopd works from the top-K + tail a
  served teacher (SGLang) sends, with the vocabulary sharded over tensor-parallel ranks.
- Matching: GOLD's hybrid mode matches vocabulary entries by their strings (e.g. 'Ġthe' on both byte-level
  sides); mopd maps by the bytes a token stands for, so byte-level, SentencePiece and character vocabularies
  meet, and special tokens map only to the same symbol or EOS to EOS.
- Byte spans: GOLD re-tokenises decoded text and reads offsets; mopd reads the bytes of the ids the student
  actually sampled (often not the canonical tokenisation of its text).
- Reduction: GOLD averages over groups, then sequences; mopd sums over tokens and divides by the valid tokens
  of the global batch (gradient scale independent of the micro-batch split)."""


def alignment_agreement(student, teacher, text: str) -> tuple[int, int]:
    """(groups, groups that differ) between GOLD's byte-offset alignment and mopd's."""
    from trl.experimental.gold.gold_trainer import ULDLoss

    from mopd.teachers.alignment import align_pieces
    from mopd.teachers.token_bytes import token_bytes

    s_ids = student(text, add_special_tokens=False)["input_ids"]
    t_ids = teacher(text, add_special_tokens=False)["input_ids"]
    s_pieces = [token_bytes(student, "s").pieces[i] for i in s_ids]
    t_pieces = [token_bytes(teacher, "t").pieces[i] for i in t_ids]
    gold_s, gold_t = ULDLoss._align_by_byte_offsets(_offsets(s_pieces), _offsets(t_pieces))
    ours = align_pieces(s_pieces, t_pieces)
    theirs = [(g[0], g[-1] + 1, h[0], h[-1] + 1) for g, h in zip(gold_s, gold_t)]
    differ = sum(1 for a, b in zip(ours, theirs) if a != b) + abs(len(ours) - len(theirs))
    return len(ours), differ


def _offsets(pieces: list[bytes]) -> list[tuple[int, int]]:
    out, pos = [], 0
    for p in pieces:
        out.append((pos, pos + len(p)))
        pos += len(p)
    return out


def uld_values(student_vocab: int, teacher_vocab: int, groups: int, seed: int = 0) -> tuple[float, float]:
    """(GOLD's ULD distillation loss, mopd's sorted_probability_l1 mean) on one sequence of 1:1 groups."""
    import torch
    from trl.experimental.gold.gold_trainer import ULDLoss

    from mopd.objectives.cross_vocab import sorted_probability_l1
    from mopd.objectives.divergences import Buckets

    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(1, groups, student_vocab, generator=g, dtype=torch.float64) * 3
    t_logits = torch.randn(1, groups, teacher_vocab, generator=g, dtype=torch.float64) * 3
    cfg = type("Cfg", (), dict(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                               uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                               use_extended_uld=True, uld_token_merge_strategy="observed", beta=0.5))()
    loss = ULDLoss(cfg)
    labels = torch.arange(groups)[None]  # every position is an answer token (no -100)
    offsets = torch.tensor([[(i, i + 1) for i in range(groups)]])
    gold = loss(s_logits, t_logits, labels, labels, labels, labels, student_byte_offsets=offsets,
                teacher_byte_offsets=offsets)
    s_lp, t_lp = torch.log_softmax(s_logits[0], -1), torch.log_softmax(t_logits[0], -1)
    empty = torch.full((groups,), float("-inf"), dtype=torch.float64)
    ours = sorted_probability_l1(Buckets(s_lp, empty), Buckets(t_lp, empty)).mean()
    return float(gold), float(ours)


def main() -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GOLD lives in trl.experimental: that is known
    try:
        import trl
    except ImportError:
        sys.exit("TRL is not installed: .venv/bin/pip install --no-deps trl (not a mopd dependency)")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    from real_models import r1_qwen_tokenizer_dir, smollm2_hf_dir
    from tokenizer_boundaries import code, numerics, prose

    hf_logging.set_verbosity_error()
    print(f"TRL {trl.__version__}")
    smol = AutoTokenizer.from_pretrained(smollm2_hf_dir())
    qwen = AutoTokenizer.from_pretrained(r1_qwen_tokenizer_dir())
    for name, text in (("prose", prose()), ("numerics", numerics()), ("code", code())):
        n, differ = alignment_agreement(smol, qwen, text)
        print(f"alignment smollm2 -> r1_qwen, {name:<8}: {n:,} groups, {differ} differ between GOLD and mopd")
    gold, ours = uld_values(len(smol), len(qwen), groups=24)
    print(f"ULD on 24 one-token groups, full vocabularies {len(smol):,} / {len(qwen):,}: GOLD {gold:.9f}, "
          f"mopd {ours:.9f}, relative difference {abs(gold - ours) / abs(gold):.2e}")
    print(DIFFERENCES)


if __name__ == "__main__":
    main()
