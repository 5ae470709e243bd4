"""How fast a tiny model learns a synthetic domain: ``python -m mopd.data.calibrate reverse addition``.

Supervised fine-tuning of a ~0.68M-parameter Llama (hidden 128, 4 layers, 4 heads, the character
tokenizer) on prompt + reference + ``<eos>``, loss on the answer tokens only, AdamW, batch 128. Every
``--eval-every`` steps it prints the greedy exact-match accuracy on 200 eval-split prompts and the CPU
seconds spent in training steps, and stops at ``--target`` accuracy or ``--max-cpu-s``. Use it to size
a demo: the numbers in ``mopd.data.synthetic``'s docstring come from it.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mopd.data.synthetic import Example, generate, get_domain
from mopd.data.tokenizer import build_char_tokenizer


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def sft_batch(tok: PreTrainedTokenizerFast, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, S], labels [B, S])``, right-padded; labels are -100 outside the answer."""
    seqs, labels = [], []
    for ex in examples:
        prompt = tok.encode(ex.prompt)
        answer = tok.encode(ex.reference, add_special_tokens=False) + [tok.eos_token_id]
        seqs.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    return ids, torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])


@torch.no_grad()
def greedy_accuracy(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, examples: list[Example]) -> float:
    prompts = [tok.encode(ex.prompt) for ex in examples]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])  # left-pad to generate
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), max_new_tokens=12,
                         do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model.train()
    texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    verify = get_domain(examples[0].domain).verifier
    return sum(verify(t, ex.reference) for t, ex in zip(texts, examples)) / len(examples)


def calibrate(domain: str, args: argparse.Namespace) -> None:
    tok = build_char_tokenizer()
    model = tiny_llama(len(tok))
    train, evals = generate(domain, args.train_prompts, "train"), generate(domain, 200, "eval")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    pick = torch.Generator().manual_seed(0)
    cpu_s = 0.0
    for step in range(1, args.max_steps + 1):
        start = time.process_time()
        ids, labels = sft_batch(tok, [train[i] for i in torch.randint(len(train), (args.batch,), generator=pick)])
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        cpu_s += time.process_time() - start
        if step % args.eval_every == 0:
            acc = greedy_accuracy(model, tok, evals)
            print(f"{domain:10s} step {step:5d} loss {loss.item():.3f} greedy {acc:.3f} train_cpu_s {cpu_s:.0f}",
                  flush=True)
            if acc >= args.target or cpu_s > args.max_cpu_s:
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("domains", nargs="+")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--train-prompts", type=int, default=5000)
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--max-cpu-s", type=float, default=200.0)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for domain in args.domains:
        calibrate(domain, args)


if __name__ == "__main__":
    main()
