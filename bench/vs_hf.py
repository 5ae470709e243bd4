"""mopd's opd step phases against plain transformers on the real SmolLM2-135M-Instruct, CPU, one process.

Same model, same tokens, side by side, steps interleaved (A B A B ...) so machine load hits both alike;
medians are reported and only the RATIOS are meant to be compared (absolute times follow the load):

* train: ``mopd.student.train_step`` (Megatron-Core GPTModel from ``smollm2_megatron_dir(1)``, DDP,
  distributed optimizer, gloo, one rank) with ``forward_kl_topk`` on a top-16 teacher, 4 sequences in
  2 micro-batches of 2 — vs transformers' LlamaForCausalLM fp32, forward + backward of the same
  micro-batches with full-vocabulary cross-entropy, grad-norm clip 1.0, ``torch.optim.AdamW``;
* generate: ``EmbeddedEngine.generate`` (its KV-cached decode loop, sampled, raw behaviour logprobs)
  vs ``model.generate(do_sample=True)`` — same model object, same 4 prompts, 16 new tokens each
  (EOS ignored on both sides so both always make 16);
* score: ``EmbeddedEngine.score`` (top-16 + sampled logprob + tail mass per response row) vs one
  no-grad prefill of the same right-padded batch.

``--profile`` instead runs torch.profiler over one call of each (after a warm-up) and prints the top
entries by self CPU time: mopd's train step as it is and as it was before (unfused Adam), transformers'
step; the engine's generate as it is and before (all-position logits), transformers' generate.

    nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python bench/vs_hf.py [--iters 5] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS, MICRO, SEQ, PROMPT, NEW, TOPK = 4, 2, 61, 44, 16, 16
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a screw press adapted from wine making. Within decades presses "
        "spread across Europe, books became cheaper, literacy rose and scholars could compare identical copies "
        "of a text for the first time. Newspapers, pamphlets and scientific journals followed, and the speed "
        "at which ideas travelled changed the politics, religion and science of the continent for good.")


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _token_rows(tokenizer) -> torch.Tensor:
    """[ROWS, SEQ] real-text ids, each row a different window of the passage."""
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    if len(ids) < SEQ + 3 * (ROWS - 1):
        raise RuntimeError(f"passage has {len(ids)} tokens, needs {SEQ + 3 * (ROWS - 1)}")
    return torch.tensor([ids[3 * r : 3 * r + SEQ] for r in range(ROWS)])


def _teacher_batch(hf_model, tokens: torch.Tensor):
    """The TrainBatch mopd's step receives: the rows plus a top-16 teacher (the model itself at T=0.7)."""
    from mopd.types import TrainBatch

    with torch.no_grad():
        logp = torch.log_softmax(hf_model(input_ids=tokens).logits[:, :-1].float() / 0.7, dim=-1)
    b, s = tokens.shape[0], tokens.shape[1] - 1
    top_lp, top_ids = logp.topk(TOPK, dim=-1)
    targets = tokens[:, 1:].contiguous()
    tail = torch.log1p(-torch.logsumexp(top_lp, dim=-1).exp().clamp(max=1 - 1e-7))
    zeros = torch.zeros(b, s)
    return TrainBatch(tokens=tokens[:, :-1].contiguous(), position_ids=torch.arange(s).expand(b, s).contiguous(),
                      targets=targets, loss_mask=torch.ones(b, s), topk_ids=top_ids.to(torch.int32),
                      topk_logprobs=top_lp, sampled_logprob=logp.gather(-1, targets[..., None])[..., 0],
                      tail_logmass=tail, behaviour_logprobs=zeros, teacher_index=torch.zeros(b, s, dtype=torch.long),
                      reward=torch.zeros(b))


def _micro(batch, lo: int, hi: int):
    from dataclasses import fields, replace

    return replace(batch, **{f.name: getattr(batch, f.name)[lo:hi] for f in fields(batch)
                             if getattr(batch, f.name) is not None})


def _mopd_student(megatron_dir: Path, lr: float):
    from mopd.config import ObjectiveConfig, ObjectiveName, OptimizerConfig, StudentConfig, TrainConfig
    from mopd.hf.convert import read_model_yaml
    from mopd.parallel import init_parallel
    from mopd.stages.batches import loss_fn_for
    from mopd.student import build_model, build_optimizer, load_model_weights

    cfg = StudentConfig(model=read_model_yaml(megatron_dir / "mopd_model.yaml"),
                        optimizer=OptimizerConfig(lr=lr, clip_grad=1.0, use_distributed_optimizer=True),
                        train=TrainConfig(steps=1000, global_batch_size=ROWS, micro_batch_size=MICRO,
                                          max_seq_len=SEQ - 1))
    layout = init_parallel(cfg.parallel, seed=0)
    chunks = build_model(cfg, layout)
    load_model_weights(megatron_dir, chunks)
    optimizer, scheduler = build_optimizer(cfg, chunks)
    loss_fn = loss_fn_for(cfg, layout, {0: [ObjectiveConfig(name=ObjectiveName.forward_kl_topk)]}, ("teacher",))
    return chunks, optimizer, scheduler, loss_fn, layout


class _HFTrainer:
    """transformers fp32 forward + backward, full-vocab cross-entropy, clip 1.0, torch AdamW."""

    def __init__(self, model, lr: float, tokens: torch.Tensor):
        self.model = model.train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.micro = [tokens[lo : lo + MICRO] for lo in range(0, ROWS, MICRO)]

    def step(self) -> float:
        total = 0.0
        for ids in self.micro:
            logits = self.model(input_ids=ids[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                     reduction="sum") / (ROWS * (SEQ - 1))
            loss.backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total


def _prompts(tokens: torch.Tensor):
    from mopd.types import Prompt

    return [Prompt(index=i, ids=tokens[i, :PROMPT].clone(), text="", domain="bench") for i in range(ROWS)]


def _hf_generate(model, prompts, pad: int) -> torch.Tensor:
    from mopd.rollout.embedded import _left_pad

    ids, mask = _left_pad([p.ids for p in prompts], pad, torch.device("cpu"))
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=pad)


def _score_requests(tokens: torch.Tensor):
    from mopd.rollout.engine import ScoreRequest

    return [ScoreRequest(ids=tokens[i], response_start=PROMPT) for i in range(ROWS)]


def _prefill(model, tokens: torch.Tensor):
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=5, help="interleaved rounds after the warm-up")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--profile", action="store_true", help="profile one call of each side, before and after, instead")
    p.add_argument("--phases", default="train,generate,score",
                   help="also: train-before (Adam unfused; the one-rank collective skip stays), "
                        "generate-before (all-position logits), each in the same process")
    return p.parse_args()


def main() -> None:
    args = _parse()
    threads = int(os.environ.setdefault("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29683"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mopd.rollout.embedded import EmbeddedEngine
    from mopd.student import train_step
    from tests.real_models import smollm2_hf_dir, smollm2_megatron_dir

    hf_dir, megatron_dir = smollm2_hf_dir(), smollm2_megatron_dir(1)
    print(f"start: {_uptime()}")
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    tokens = _token_rows(tokenizer)
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    batch = _teacher_batch(hf_model, tokens)
    micro = [_micro(batch, lo, lo + MICRO) for lo in range(0, ROWS, MICRO)]
    chunks, optimizer, scheduler, loss_fn, layout = _mopd_student(megatron_dir, args.lr)
    hf_train = _HFTrainer(hf_model, args.lr, tokens)
    step = iter(range(10**6))

    def mopd_train():
        train_step(chunks, optimizer, scheduler, micro, loss_fn, layout, step=next(step))

    # Rollout side: a separate eval copy (the trained model keeps changing), shared by both generators.
    rollout_model = copy.deepcopy(hf_model).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    engine = EmbeddedEngine(rollout_model, eos_token_ids=(), pad_token_id=pad, name="bench")
    from mopd.config import SamplingConfig

    sampling = SamplingConfig(temperature=1.0, max_new_tokens=NEW, seed=3)
    prompts, requests = _prompts(tokens), _score_requests(tokens)
    score_ids = tokens  # every request has the same length: the prefill batch needs no padding
    def mopd_train_unfused():  # the step as it was before cpu_compat switched Adam to the fused kernel
        groups = [g for opt in getattr(optimizer, "chained_optimizers", [optimizer]) for g in opt.optimizer.param_groups]
        saved = [(g["fused"], g["foreach"]) for g in groups]
        for g in groups:
            g["fused"], g["foreach"] = None, None
        try:
            mopd_train()
        finally:
            for g, (fused, foreach) in zip(groups, saved):
                g["fused"], g["foreach"] = fused, foreach

    def generate_all_logits():  # the engine as it was before it asked for the last position's logits only
        saved, engine._last_logits_only = engine._last_logits_only, {}
        try:
            engine.generate(prompts, sampling)
        finally:
            engine._last_logits_only = saved

    if args.profile:
        _profile({"mopd train_step (after)": mopd_train, "mopd train_step, unfused Adam (before)": mopd_train_unfused,
                  "transformers fwd+bwd+clip+AdamW": hf_train.step,
                  "EmbeddedEngine.generate (after)": lambda: engine.generate(prompts, sampling),
                  "EmbeddedEngine.generate, all-position logits (before)": generate_all_logits,
                  "transformers generate": lambda: _hf_generate(rollout_model, prompts, pad)})
        print(f"end: {_uptime()}")
        return
    pairs = {
        "train": (mopd_train, hf_train.step, "mopd train_step", "transformers fwd+bwd+clip+AdamW"),
        "generate": (lambda: engine.generate(prompts, sampling), lambda: _hf_generate(rollout_model, prompts, pad),
                     "EmbeddedEngine.generate", "transformers generate"),
        "score": (lambda: engine.score(requests, TOPK), lambda: _prefill(rollout_model, score_ids),
                  "EmbeddedEngine.score", "one prefill"),
        "train-before": (mopd_train_unfused, hf_train.step, "mopd, unfused Adam", "transformers fwd+bwd+clip+AdamW"),
        "generate-before": (generate_all_logits, lambda: _hf_generate(rollout_model, prompts, pad),
                            "Engine, all-position logits", "transformers generate"),
    }
    phases = [p for p in args.phases.split(",") if p]
    times = {p: ([], []) for p in phases}
    for i in range(args.warmup + args.iters):
        for phase in phases:
            mopd_fn, hf_fn, _, _ = pairs[phase]
            order = (0, 1) if i % 2 == 0 else (1, 0)  # alternate which side runs first
            for side in order:
                dt = _timed(mopd_fn if side == 0 else hf_fn)
                if i >= args.warmup:
                    times[phase][side].append(dt)
    print(f"SmolLM2-135M-Instruct, fp32 CPU, {threads} thread(s); {ROWS} rows x {SEQ - 1} tokens, micro-batches of "
          f"{MICRO}; generate {ROWS} x {NEW} new tokens from {PROMPT}-token prompts; score {ROWS} x {SEQ} "
          f"(top-{TOPK}); median of {args.iters} interleaved rounds after {args.warmup} warm-up")
    for phase in phases:
        _, _, mopd_name, hf_name = pairs[phase]
        m, h = (statistics.median(x) for x in times[phase])
        print(f"  {phase:15s} {mopd_name:27s} {m * 1e3:8.0f} ms   {hf_name:32s} {h * 1e3:8.0f} ms   "
              f"ratio mopd/transformers {m / h:.2f}x")
    print(f"end: {_uptime()}")


def _profile(fns: dict) -> None:
    from torch.profiler import ProfilerActivity, profile

    for fn in fns.values():
        fn()  # warm-up (first steps allocate optimizer state)
    for name, fn in fns.items():
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        print(f"--- {name}: top entries by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
        print(f"--- {name}: top (op, input shapes) by self CPU time")
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12,
                                                                  max_name_column_width=30, max_shapes_column_width=70))


if __name__ == "__main__":
    main()
