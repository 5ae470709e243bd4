"""Per-domain accuracy of a model served by an engine: greedy exact match and sampled pass@k; the
periodic evaluation inside training stages, and the ``eval`` stage.

Generation runs on global rank 0 only (engines live there) and the result is broadcast; the eval
prompts are the data source's held-out eval split (``eval_prompts``), so training never sees them.
Every evaluation covers every domain of the run, not only the stage's own, so experts and baselines
compare.

With ``eval.teacher_kl`` an opd stage's evaluations also estimate, per domain, each named teacher's
reverse KL to the evaluated model on the eval prompts (``teacher_kl``): how far the model still is
from what its teachers would say, e.g. a PI self-teacher that sees a rule the eval prompts lack.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mopd.config import RunConfig, StageConfig
from mopd.data.sources import build_source
from mopd.data.synthetic import PiMode, domain_verifier
from mopd.errors import ConfigError
from mopd.eval import EvalResult, EvalSample, evaluate
from mopd.rollout.embedded import EmbeddedEngine
from mopd.rollout.engine import Engine
from mopd.stages.context import RunContext, StageOutput, broadcast
from mopd.teachers import Teacher
from mopd.types import Rollout

if TYPE_CHECKING:
    from mopd.stages.training import StageRun


def eval_prompts(config: RunConfig, tokenizer):
    """The held-out prompts: the first ``eval.num_prompts`` of each domain of the eval split
    (``data.eval_split``; a JSONL run's ``data.eval_path``). The config refuses eval prompts that are
    the training prompts unless ``eval.allow_train_prompts``."""
    data = replace(config.data, num_prompts=config.eval.num_prompts)
    split = "eval" if data.source == "jsonl" else data.eval_split  # JSONL: build_source reads data.eval_path
    source = build_source(data, tokenizer, seed=config.seed, split=split, pi_mode=PiMode(config.data.pi_mode))
    taken: dict[str, int] = {}
    out = []
    for prompt in source:
        if taken.get(prompt.domain, 0) < config.eval.num_prompts:
            taken[prompt.domain] = taken.get(prompt.domain, 0) + 1
            out.append(prompt)
    return out


def evaluate_engine(engine: Engine, config: RunConfig, tokenizer, prompts=None) -> EvalResult:
    prompts = prompts if prompts is not None else eval_prompts(config, tokenizer)
    max_new = config.eval.max_new_tokens or config.rollout.sampling.max_new_tokens
    base = replace(config.rollout.sampling, max_new_tokens=max_new, n=1, temperature=0.0, seed=config.seed)
    samples = [_sample(r, tokenizer, greedy=True) for r in engine.generate(prompts, base)]
    if config.eval.samples_per_prompt:
        sampled = replace(base, temperature=config.eval.temperature, n=config.eval.samples_per_prompt)
        samples += [_sample(r, tokenizer, greedy=False) for r in engine.generate(prompts, sampled)]
    return evaluate(samples, ks=config.eval.pass_k, markers=config.diagnostics.markers,
                    verifier_for=lambda d: domain_verifier(d, named=config.data.verifiers))


def teacher_kl(engine: Engine, teachers: list[Teacher], config: RunConfig, prompts) -> dict[str, dict[str, float]]:
    """domain -> teacher -> reverse KL estimate in nats per response token, on one response per prompt
    sampled from ``engine`` at temperature 1: the mean of ``log p_model(y_t) - log p_teacher(y_t)``
    over the sampled tokens (unbiased for KL(model || teacher), like training's ``kl_sample``)."""
    max_new = config.eval.max_new_tokens or config.rollout.sampling.max_new_tokens
    sampling = replace(config.rollout.sampling, max_new_tokens=max_new, n=1, temperature=1.0, top_p=1.0, top_k=-1,
                       seed=config.seed + 1)
    rollouts = [r for r in engine.generate(prompts, sampling) if r.response_ids.numel()]
    out: dict[str, dict[str, float]] = {}
    for teacher in teachers:
        scores = teacher.score(rollouts, teacher.config.top_k)
        sums: dict[str, list[float]] = {}
        for r, s in zip(rollouts, scores):
            row = sums.setdefault(r.domain, [0.0, 0.0])
            row[0] += float((r.behaviour_logprobs.double() - s.sampled_logprob.double()).sum())
            row[1] += r.response_ids.numel()
        for domain, (total, count) in sums.items():
            out.setdefault(domain, {})[teacher.name] = total / count
    return out


def _with_kl(result: EvalResult, engine: Engine, config: RunConfig, tokenizer,
             teachers: list[Teacher] | None) -> tuple[dict, dict[str, float]]:
    """(``as_dict`` rows with a ``teacher_kl`` entry per domain, flat metrics with
    ``eval/<domain>/teacher_kl/<teacher>``)."""
    rows, metrics = as_dict(result), result.metrics()
    if teachers:
        kl = teacher_kl(engine, teachers, config, eval_prompts(config, tokenizer))
        for domain, row in rows.items():
            row["teacher_kl"] = kl.get(domain, {})
            metrics.update({f"eval/{domain}/teacher_kl/{name}": v for name, v in row["teacher_kl"].items()})
    return rows, metrics


def as_dict(result: EvalResult) -> dict:
    """JSON-ready: pass@k keys as strings, as they read back from output.json."""
    out = {d.domain: asdict(d) for d in result.domains}
    for row in out.values():
        row["pass_at"] = {str(k): v for k, v in row["pass_at"].items()}
    return out


def _sample(rollout: Rollout, tokenizer, greedy: bool) -> EvalSample:
    text = tokenizer.decode(rollout.response_ids.tolist(), skip_special_tokens=True)
    return EvalSample(rollout.prompt_index, rollout.domain, text, rollout.reference, greedy)



def evaluate_on_engine(ctx: RunContext, config: RunConfig, engine: Engine | None,
                       teachers: list[Teacher] | None = None) -> dict:
    """Evaluate the model ``engine`` serves (rank 0's) on every domain of the run, with the reverse KL of
    ``teachers`` (rank 0's; ``eval.teacher_kl``) when given. Collective."""
    config = replace(config, data=ctx.config.data)
    result = None
    if ctx.is_logger:
        result, _ = _with_kl(evaluate_engine(engine, config, ctx.tokenizer), engine, config, ctx.tokenizer, teachers)
    return broadcast(result)


def maybe_evaluate(run: StageRun, engine: Engine | None, force: bool = False,
                   teachers: list[Teacher] | None = None) -> dict | None:
    """Evaluate the rollout engine every ``eval.every_steps`` steps (and with ``force``); logs the
    metrics (with ``teachers``' KL) into the stage's history and returns them."""
    every = run.config.eval.every_steps
    if not force and (every <= 0 or run.step % every):
        return None
    rows = None
    if run.ctx.is_logger:
        with run.metrics.span("eval"):
            result = evaluate_engine(engine, run.config, run.ctx.tokenizer)
            rows, metrics = _with_kl(result, engine, run.config, run.ctx.tokenizer, teachers)
        run.metrics.log(run.step, metrics)
        run.history.append({"step": float(run.step), **metrics})
    return broadcast(rows)


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
