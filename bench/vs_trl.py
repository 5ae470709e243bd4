"""mopd's distillation train step against TRL's GKDTrainer step on the same tiny Llama, CPU, one thread.

Both sides start from the SAME student weights (mopd's Megatron GPTModel is exported through
``mopd.hf.megatron_to_hf`` into an HF ``LlamaForCausalLM``) and distil from the same HF teacher on
the same fixed batch (prompt + response tokens, loss on the response positions only):

* mopd: ``mopd.student.train_step`` (Megatron-Core schedule, DDP, distributed optimizer, gloo,
  one rank) with the ``forward_kl_topk`` objective on the teacher's top-K logprobs + tail bucket.
  The teacher is NOT run inside the step (in mopd the SGLang teachers score the rollout), so the
  HF teacher's forward on the same batch is timed separately and added ("mopd + teacher prefill").
* TRL: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (no on-policy generation: the dataset
  sequences are trained on, as in mopd's step) and ``beta=0`` (forward KL(teacher || student) over
  the full vocabulary); its step runs the teacher forward itself. The step is what
  ``Trainer._inner_training_loop`` does per optimizer step: ``training_step`` (forward, teacher
  forward, loss, backward), grad-norm clip at 1.0, AdamW step, scheduler step, zero_grad.
  TRL's ``DistillationTrainer`` is on-policy only (it generates with the student inside every
  step), so it is not the comparable trainer for a fixed-sequence step.

Both optimisers are Adam(W) with lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay, constant
LR, grad clip 1.0, fp32. Work differs slightly in TRL's disfavour: HF runs all S positions and
drops the last logits, mopd's student runs S-1 (the inputs that have a target). Steps are interleaved (mopd, TRL, mopd, TRL, ...) after a warm-up and
the median is reported; throughput counts the response (loss) tokens of the batch.

Sanity check of the objective: before any step, the loss of both on the same weights, batch and
teacher. mopd with K = vocab must equal TRL's full-vocab forward KL (up to fp32 rounding); with
K < vocab the tail bucket merges the teacher's non-top-K entries into one, and by the log-sum
inequality KL(top-K + tail) <= full KL, so mopd's loss is slightly LOWER.

    .venv/bin/pip install trl   # not a mopd dependency
    OMP_NUM_THREADS=1 .venv/bin/python bench/vs_trl.py [--batch 64 --prompt 8 --response 16 --topk 20 --iters 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial

import torch

VOCAB, LAYERS, HIDDEN, HEADS, KV_HEADS, FFN = 100, 4, 128, 4, 2, 384
TEACHER = "teacher"


def _require_trl():
    try:
        import trl
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as exc:
        sys.exit(f"bench/vs_trl.py needs TRL (not a mopd dependency): run `.venv/bin/pip install trl` ({exc})")
    return trl.__version__, GKDConfig, GKDTrainer


def _student_config(args):
    from mopd.config import ModelConfig, OptimizerConfig, StudentConfig, TrainConfig

    seq = args.prompt + args.response
    model = ModelConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=KV_HEADS,
                        ffn_hidden_size=FFN, vocab_size=VOCAB, max_position_embeddings=seq)
    return StudentConfig(model=model,
                         optimizer=OptimizerConfig(lr=1e-4, clip_grad=1.0, use_distributed_optimizer=True),
                         train=TrainConfig(steps=1000, global_batch_size=args.batch, micro_batch_size=args.batch,
                                           max_seq_len=seq))


def _hf_llama(cfg, state: dict | None, seed: int):
    """An HF LlamaForCausalLM of the student's shape: ``state`` (HF names) or a fresh seeded init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mopd.hf import hf_config_from_model

    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(**hf_config_from_model(cfg.model, dtype="float32"), pad_token_id=0)
    model = LlamaForCausalLM(hf_cfg).float()
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"student export does not match LlamaForCausalLM: missing {missing}, extra {unexpected}")
    return model


def _teacher(cfg, sharpen: float):
    """A second tiny Llama; its head is scaled so its next-token distribution is peaked (top-K matters)."""
    teacher = _hf_llama(cfg, None, seed=1234).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(sharpen)
    return teacher


def _teacher_logprobs(teacher, tokens: torch.Tensor) -> torch.Tensor:
    """[B, S] ids -> [B, S-1, V] fp32 teacher logprobs at the positions that predict tokens[:, 1:]."""
    with torch.no_grad():
        return torch.log_softmax(teacher(input_ids=tokens).logits[:, :-1].float(), dim=-1)


def _mopd_batch(tokens: torch.Tensor, logp: torch.Tensor, prompt: int, topk: int):
    """The TrainBatch mopd's step receives: sequences plus the teacher's top-K scores per position.

    tokens [B, S]; logp [B, S-1, V] teacher logprobs. Position s predicts tokens[:, s+1]; it is a
    response position (loss_mask 1) when s+1 >= prompt.
    """
    from mopd.types import TrainBatch

    b, s = tokens.shape[0], tokens.shape[1] - 1
    top_lp, top_ids = logp.topk(topk, dim=-1)
    targets = tokens[:, 1:]
    mask = (torch.arange(s) + 1 >= prompt).float().expand(b, s).contiguous()
    # log(1 - sum p_topk), computed as log1p(-exp(logsumexp)) so a near-1 top-K mass stays finite
    tail = torch.log1p(-torch.logsumexp(top_lp, dim=-1).exp().clamp(max=1 - 1e-7))
    if topk == logp.shape[-1]:
        tail = torch.full_like(tail, float("-inf"))
    zeros = torch.zeros(b, s)
    return TrainBatch(tokens=tokens[:, :-1].contiguous(), position_ids=torch.arange(s).expand(b, s).contiguous(),
                      targets=targets.contiguous(), loss_mask=mask, topk_ids=top_ids.to(torch.int32),
                      topk_logprobs=top_lp, sampled_logprob=logp.gather(-1, targets[..., None])[..., 0],
                      tail_logmass=tail, behaviour_logprobs=zeros, teacher_index=torch.zeros(b, s, dtype=torch.long),
                      reward=torch.zeros(b))


def _gkd_inputs(tokens: torch.Tensor, prompt: int) -> dict[str, torch.Tensor]:
    """What GKD's ChatML collator yields: full ids, attention mask, labels = -100 on the prompt."""
    labels = tokens.clone()
    labels[:, :prompt] = -100
    return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": labels}


def _tokenizer():
    """A word-level tokenizer over the 100 ids (GKDTrainer's collator and SFTTrainer want one)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t2", unk_token="t1")


def _gkd_trainer(student, teacher, args, out_dir: str):
    from datasets import Dataset

    _, GKDConfig, GKDTrainer = _require_trl()
    cfg = GKDConfig(output_dir=out_dir, lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
                    per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, learning_rate=1e-4,
                    weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
                    lr_scheduler_type="constant", warmup_steps=0, use_cpu=True, bf16=False, fp16=False,
                    report_to=[], logging_strategy="no", save_strategy="no", disable_dropout=True,
                    max_length=args.prompt + args.response, dataloader_num_workers=0)
    data = Dataset.from_dict({"messages": [[{"role": "user", "content": "t3"}]] * args.batch})
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=data,
                         processing_class=_tokenizer())
    trainer.create_optimizer_and_scheduler(num_training_steps=args.warmup + args.iters + 1)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets per step (one micro-batch)
    return trainer


def _trl_step(trainer, inputs: dict[str, torch.Tensor]) -> float:
    """One optimizer step as Trainer._inner_training_loop takes it (gradient accumulation 1)."""
    model = trainer.model
    model.train()
    loss = trainer.training_step(model, dict(inputs))
    trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    return float(loss)


def _mopd_initial_loss(chunk, batch, loss_fn) -> float:
    with torch.no_grad():
        logits = chunk(batch.tokens, batch.position_ids, None).float()
        loss_sum, _ = loss_fn(logits, batch)
    return float(loss_sum) / batch.num_tokens


def _trl_initial_loss(trainer, inputs) -> float:
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, dict(inputs)))


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64, help="sequences per step")
    p.add_argument("--prompt", type=int, default=8, help="prompt tokens per sequence (no loss)")
    p.add_argument("--response", type=int, default=16, help="response tokens per sequence (loss)")
    p.add_argument("--topk", type=int, default=20, help="teacher top-K entries mopd receives")
    p.add_argument("--sharpen", type=float, default=20.0, help="teacher lm_head scale (peakier teacher)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    return p.parse_args()


def main() -> None:
    args = _parse()
    trl_version, _, _ = _require_trl()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29671"))
    torch.set_num_threads(1)

    from mopd.config import ObjectiveConfig, ObjectiveName
    from mopd.hf import megatron_to_hf
    from mopd.parallel import init_parallel
    from mopd.stages.batches import loss_fn_for
    from mopd.student import build_model, build_optimizer

    cfg = _student_config(args)
    layout = init_parallel(cfg.parallel, seed=0)
    chunks = build_model(cfg, layout)
    optimizer, scheduler = build_optimizer(cfg, chunks)
    objectives = {0: [ObjectiveConfig(name=ObjectiveName.forward_kl_topk)]}
    loss_fn = loss_fn_for(cfg, layout, objectives, (TEACHER,))

    student_hf = _hf_llama(cfg, {n: t.detach().clone() for n, t in megatron_to_hf(chunks, cfg.model)}, seed=0)
    teacher = _teacher(cfg, args.sharpen)
    torch.manual_seed(7)
    tokens = torch.randint(3, VOCAB, (args.batch, args.prompt + args.response))
    logp = _teacher_logprobs(teacher, tokens)
    batch = _mopd_batch(tokens, logp, args.prompt, args.topk)
    full_batch = _mopd_batch(tokens, logp, args.prompt, VOCAB)
    inputs = _gkd_inputs(tokens, args.prompt)

    with tempfile.TemporaryDirectory() as out_dir:
        trainer = _gkd_trainer(student_hf, teacher, args, out_dir)
        _report_losses(chunks[0], batch, full_batch, loss_fn, trainer, inputs, args)
        mopd_t, trl_t, prefill_t, losses = _interleave(chunks, optimizer, scheduler, batch, loss_fn, layout, trainer,
                                                      inputs, teacher, tokens, args)
    _report_times(args, trl_version, mopd_t, trl_t, prefill_t, losses, batch.num_tokens)


def _report_losses(chunk, batch, full_batch, loss_fn, trainer, inputs, args) -> None:
    mopd_k = _mopd_initial_loss(chunk, batch, loss_fn)
    mopd_v = _mopd_initial_loss(chunk, full_batch, loss_fn)
    trl = _trl_initial_loss(trainer, inputs)
    print(f"loss before any step (same weights, batch, teacher): TRL full-vocab forward KL {trl:.8f}; "
          f"mopd top-K=vocab {mopd_v:.8f} (|diff| {abs(mopd_v - trl):.2e}, expected ~fp32 rounding); "
          f"mopd top-{args.topk}+tail {mopd_k:.6f} (expected <= full KL: the tail bucket merges the rest)")


def _interleave(chunks, optimizer, scheduler, batch, loss_fn, layout, trainer, inputs, teacher, tokens, args):
    """Warm-up, then mopd step, TRL step, teacher prefill, repeated; per-step wall times."""
    from mopd.student import train_step

    mopd_t, trl_t, prefill_t, losses = [], [], [], []
    for i in range(args.warmup + args.iters):
        dt_m, res = _timed(partial(train_step, chunks, optimizer, scheduler, [batch], loss_fn, layout, step=i))
        dt_t, trl_loss = _timed(lambda: _trl_step(trainer, inputs))
        dt_p, _ = _timed(lambda: _teacher_logprobs(teacher, tokens))
        losses.append((res.loss, trl_loss))
        if i >= args.warmup:
            mopd_t.append(dt_m)
            trl_t.append(dt_t)
            prefill_t.append(dt_p)
    return mopd_t, trl_t, prefill_t, losses


def _report_times(args, trl_version, mopd_t, trl_t, prefill_t, losses, num_tokens) -> None:
    m, t, p = (statistics.median(x) for x in (mopd_t, trl_t, prefill_t))
    seq = args.prompt + args.response
    print(f"TRL {trl_version} GKDTrainer(lmbda=0, beta=0) vs mopd train_step (forward_kl_topk, K={args.topk}); "
          f"Llama {LAYERS}x{HIDDEN}, {HEADS} heads / {KV_HEADS} KV, FFN {FFN}, vocab {VOCAB}; "
          f"batch {args.batch} x {seq} tokens ({num_tokens} loss tokens); fp32 CPU, 1 thread; "
          f"median of {args.iters} interleaved steps after {args.warmup} warm-up")
    shown = ", ".join(f"{m:.5f} / {t:.5f}" for m, t in losses[:4])
    print(f"loss of steps 1..{min(4, len(losses))}, mopd (top-{args.topk}+tail) / TRL (full vocab): {shown}")
    rows = [("mopd step (teacher scores given)", m), ("HF teacher prefill (same batch)", p),
            ("mopd step + teacher prefill", m + p), ("TRL GKD step (teacher inside)", t),
            ("TRL step - teacher prefill (est.)", t - p)]
    for name, sec in rows:
        print(f"  {name:34s} {sec * 1e3:8.1f} ms  {num_tokens / sec:9.0f} loss tokens/s  "
              f"{args.batch * seq / sec:9.0f} seq tokens/s")
    print(f"ratio TRL / (mopd step + teacher prefill): {t / (m + p):.2f}x (the like-for-like figure);  "
          f"(TRL - prefill) / mopd step: {(t - p) / m:.2f}x (student side only);  > 1 means mopd is faster")


if __name__ == "__main__":
    main()
