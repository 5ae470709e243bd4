"""The calibration tool's batches mask everything but the answer, and a short run reports accuracy."""

import argparse
import math
import re

import torch

from mopd.data.calibrate import calibrate, sft_batch
from mopd.data.synthetic import Example
from mopd.data.tokenizer import build_char_tokenizer


def test_sft_batch_trains_only_on_answer_and_eos_tokens():
    tok = build_char_tokenizer()
    ids, labels = sft_batch(tok, [Example("reverse", "rev:ab=", "ba"), Example("reverse", "rev:abc=", "cba")])
    assert ids.tolist() == [tok.encode("rev:ab=ba<eos>") + [0, 0], tok.encode("rev:abc=cba<eos>")]
    assert labels.tolist() == [[-100] * 8 + tok.encode("ba<eos>", add_special_tokens=False) + [-100, -100],
                               [-100] * 9 + tok.encode("cba<eos>", add_special_tokens=False)]


def _run(capsys, lr: float) -> tuple[float, float]:
    args = argparse.Namespace(lr=lr, batch=8, train_prompts=50, max_steps=2, max_cpu_s=60.0, eval_every=2,
                              target=0.95)
    calibrate("reverse", args)
    line = capsys.readouterr().out.strip()
    match = re.fullmatch(r"reverse\s+step\s+2 loss (\d+\.\d+) greedy (\d\.\d+) train_cpu_s \d+", line)
    assert match, line
    return float(match.group(1)), float(match.group(2))


def test_a_short_calibration_run_prints_loss_and_greedy_accuracy(capsys):
    torch.set_num_threads(1)
    frozen, accuracy = _run(capsys, lr=0.0)
    # lr 0 keeps the random init (std 0.02): its logits are nearly flat, so the loss is log(vocab size)
    assert abs(frozen - math.log(len(build_char_tokenizer()))) < 0.05
    assert accuracy == 0.0
    trained, _ = _run(capsys, lr=3e-3)
    assert trained < frozen - 0.1  # two AdamW steps on the answer tokens already move the loss
