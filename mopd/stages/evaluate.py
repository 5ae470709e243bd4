"""Per-domain accuracy of a model served by an engine: greedy exact match and sampled pass@k; the
periodic evaluation inside training stages, and the ``eval`` stage.

Generation runs on global rank 0 only (engines live there) and the result is broadcast; the eval
prompts are the data source's eval split (held-out synthetic prompts), so training never sees them.
Every evaluation covers every domain of the run, not only the stage's own, so experts and baselines
compare.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mopd.config import RunConfig, StageConfig
from mopd.data.sources import build_source
from mopd.data.synthetic import PiMode
from mopd.errors import ConfigError
from mopd.eval import EvalResult, EvalSample, evaluate
from mopd.rollout.embedded import EmbeddedEngine
from mopd.rollout.engine import Engine
from mopd.stages.context import RunContext, StageOutput, broadcast
from mopd.types import Rollout

if TYPE_CHECKING:
    from mopd.stages.training import StageRun


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



def evaluate_on_engine(ctx: RunContext, config: RunConfig, engine: Engine | None) -> dict:
    """Evaluate the model ``engine`` serves (rank 0's) on every domain of the run. Collective."""
    config = replace(config, data=ctx.config.data)
    result = as_dict(evaluate_engine(engine, config, ctx.tokenizer)) if ctx.is_logger else None
    return broadcast(result)


def maybe_evaluate(run: StageRun, engine: Engine | None, force: bool = False) -> dict | None:
    """Evaluate the rollout engine every ``eval.every_steps`` steps; logs and returns the metrics."""
    every = run.config.eval.every_steps
    if not force and (every <= 0 or run.step % every):
        return None
    result = None
    if run.ctx.is_logger:
        with run.metrics.span("eval"):
            result = evaluate_engine(engine, run.config, run.ctx.tokenizer)
        run.metrics.log(run.step, result.metrics())
        run.history.append({"step": float(run.step), **result.metrics()})
    return broadcast(as_dict(result) if result is not None else None)


def evaluate_hf_dir(ctx: RunContext, config: RunConfig, hf_dir: Path) -> dict:
    """Evaluate an HF folder (an average, an earlier stage's folder, ``mopd eval``) in an embedded
    engine on rank 0. A student in training is evaluated through its rollout engine instead."""
    engine = EmbeddedEngine.from_pretrained(hf_dir, name="eval") if ctx.is_logger else None
    return evaluate_on_engine(ctx, config, engine)


def run_eval(ctx: RunContext, stage: StageConfig, config: RunConfig) -> StageOutput:
    """The ``eval`` stage: evaluate ``init_from`` (a stage or an HF folder)."""
    start = time.perf_counter()
    if stage.init_from is None:
        raise ConfigError(f"stages[{stage.name}].init_from: an eval stage needs the stage or HF folder to evaluate")
    evaluation = evaluate_hf_dir(ctx, config, ctx.hf_dir_of(stage.init_from))
    return StageOutput(name=stage.name, kind=stage.kind.value, role=stage.role.value, hf_dir=None,
                       wall_s=time.perf_counter() - start, eval=evaluation)
