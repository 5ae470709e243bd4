"""Name questions for an identity rule: a small generated prompt set for rule-internalisation OPSD.

The rule ("You are Zorblax, a helpful assistant. Your name is Zorblax.") is shown to a PI self-teacher
as a system prompt; the student sees only the question and must learn to answer with the name. Each
record is ``{"prompt": question, "domain": "identity", "reference": name}``, verified by the
``mentions`` verifier (the response names the assistant).

Questions are paraphrases built from a core question, an optional greeting in front and an optional
remark after it. Train and eval use disjoint core questions (``TRAIN_CORES`` / ``EVAL_CORES``), so
every eval prompt is a phrasing the student never trained on, not only a new greeting around a
known one. Generation is deterministic in ``seed``:

    python -m mopd.data.identity configs/local/data --name Zorblax
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DOMAIN = "identity"

TRAIN_CORES = (
    "What is your name?", "What's your name?", "Who are you?", "What should I call you?", "Do you have a name?",
    "Tell me your name.", "What do people call you?", "Please introduce yourself.", "What name do you go by?",
    "Can you tell me who you are?", "Who am I talking to?", "How should I address you?",
)
EVAL_CORES = (
    "May I ask what your name is?", "What are you called?", "Could you tell me your name?",
    "What is the name of the assistant I am chatting with?", "Introduce yourself, please.",
    "By what name should I refer to you?", "Have you got a name?", "Who is answering me right now?",
)
GREETINGS = ("", "Hi! ", "Hello. ", "Hey, ", "Good morning! ", "Quick question: ", "Excuse me, ", "Nice to meet you. ")
REMARKS = ("", " I'm curious.", " Thanks!", " Please answer in one sentence.")


def _phrase(greeting: str, core: str, remark: str) -> str:
    # After "Hey, " the question continues the sentence: "Hey, what is your name?"
    core = core[0].lower() + core[1:] if greeting.endswith(", ") else core
    return f"{greeting}{core}{remark}"


def questions(cores: tuple[str, ...], num: int, seed: int, split: str) -> list[str]:
    """``num`` distinct paraphrases of ``cores``, in a seeded order (every core appears before any repeats)."""
    total = len(cores) * len(GREETINGS) * len(REMARKS)
    if num > total:
        raise ValueError(f"identity {split}: asked for {num} questions, only {total} paraphrases exist")
    rng = random.Random(f"mopd-identity/{seed}/{split}")
    by_core = [[_phrase(g, c, r) for g in GREETINGS for r in REMARKS] for c in cores]
    for group in by_core:
        rng.shuffle(group)
    # Round-robin over the cores so that any prefix covers them evenly.
    ordered = [group[i] for i in range(len(by_core[0])) for group in by_core]
    return ordered[:num]


def records(name: str, num: int, split: str, seed: int = 0) -> list[dict[str, str]]:
    cores = TRAIN_CORES if split == "train" else EVAL_CORES
    return [{"prompt": q, "domain": DOMAIN, "reference": name} for q in questions(cores, num, seed, split)]


def write(out_dir: Path, name: str = "Zorblax", num_train: int = 96, num_eval: int = 24, seed: int = 0,
          prefix: str | None = None) -> tuple[Path, Path]:
    """Write ``<prefix>_train.jsonl`` and ``<prefix>_eval.jsonl`` (prefix: the lower-cased name)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = prefix or name.lower()
    paths = []
    for split, num in (("train", num_train), ("eval", num_eval)):
        path = out_dir / f"{prefix}_{split}.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records(name, num, split, seed)))
        tmp.rename(path)
        paths.append(path)
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--name", default="Zorblax")
    parser.add_argument("--num-train", type=int, default=96)
    parser.add_argument("--num-eval", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write(args.out_dir, args.name, args.num_train, args.num_eval, args.seed):
        print(path)


if __name__ == "__main__":
    main()
