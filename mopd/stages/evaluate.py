"""Per-domain accuracy of a model served by an engine: greedy exact match and sampled pass@k.

Runs on global rank 0 only (the engine lives there); the eval prompts are the data source's eval
split (held-out synthetic prompts), so training never sees them.
"""

from __future__ import annotations

from dataclasses import asdict, replace

from mopd.config import RunConfig
from mopd.data.sources import build_source
from mopd.data.synthetic import PiMode
from mopd.eval import EvalResult, EvalSample, evaluate
from mopd.rollout.engine import Engine
from mopd.types import Rollout


def eval_prompts(config: RunConfig, tokenizer):
    data = replace(config.data, num_prompts=config.eval.num_prompts)
    return list(build_source(data, tokenizer, seed=config.seed, split="eval", pi_mode=PiMode(config.data.pi_mode)))


def evaluate_engine(engine: Engine, config: RunConfig, tokenizer, prompts=None) -> EvalResult:
    prompts = prompts if prompts is not None else eval_prompts(config, tokenizer)
    max_new = config.eval.max_new_tokens or config.rollout.sampling.max_new_tokens
    base = replace(config.rollout.sampling, max_new_tokens=max_new, n=1, temperature=0.0, seed=config.seed)
    samples = [_sample(r, tokenizer, greedy=True) for r in engine.generate(prompts, base)]
    if config.eval.samples_per_prompt:
        sampled = replace(base, temperature=config.eval.temperature, n=config.eval.samples_per_prompt)
        samples += [_sample(r, tokenizer, greedy=False) for r in engine.generate(prompts, sampled)]
    return evaluate(samples, ks=config.eval.pass_k, markers=config.diagnostics.markers)


def as_dict(result: EvalResult) -> dict:
    """JSON-ready: pass@k keys as strings, as they read back from output.json."""
    out = {d.domain: asdict(d) for d in result.domains}
    for row in out.values():
        row["pass_at"] = {str(k): v for k, v in row["pass_at"].items()}
    return out


def _sample(rollout: Rollout, tokenizer, greedy: bool) -> EvalSample:
    text = tokenizer.decode(rollout.response_ids.tolist(), skip_special_tokens=True)
    return EvalSample(rollout.prompt_index, rollout.domain, text, rollout.reference, greedy)

