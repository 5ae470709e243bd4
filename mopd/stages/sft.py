"""The sft stage: cross-entropy on reference answers (experts, the weak base), or on responses that
teacher stages generate (the sequence-level distillation baseline, with a token budget)."""

from __future__ import annotations

from dataclasses import replace

import torch

from mopd.config import PIPlacement, RunConfig, StageConfig
from mopd.data.chat import check_takes_system_message, join_pi, place_pi
from mopd.data.sources import PromptRenderer
from mopd.errors import ConfigError
from mopd.rollout.embedded import EmbeddedEngine
from mopd.stages.batches import REFERENCE, one_hot_scores, reference_rollout, sft_loss_fn
from mopd.stages.context import RunContext, StageOutput, broadcast
from mopd.stages.engines import rollout_engine
from mopd.stages.evaluate import maybe_evaluate
from mopd.stages.opd import step_sampling
from mopd.stages.training import finish_stage, fit_to_max_seq_len, log_step, maybe_checkpoint, resume_stage, start_stage, train_on
from mopd.types import Prompt, Rollout


def run_sft(ctx: RunContext, stage: StageConfig, config: RunConfig) -> StageOutput:
    train = config.student.train
    budget = ctx.outputs[stage.token_budget_from].teacher_tokens if stage.token_budget_from else None
    run = start_stage(ctx, stage, config, prompts_per_step=train.global_batch_size, total_steps=train.steps)
    resume_stage(run)
    loss_fn = sft_loss_fn(config.student, ctx.layout)
    writers = _teacher_writers(ctx, stage, config) if stage.sources and ctx.is_logger else None
    engine: list = []  # the rollout engine of eval.every_steps, once built (None off rank 0)
    try:
        _train(run, config, writers, budget, loss_fn, engine)
        maybe_checkpoint(run, force=True)
        if engine:
            run.student.sync_into(engine, version=run.step)  # the final weights serve the final evaluation
        return finish_stage(run, engine[0] if engine else None)
    finally:
        if engine and engine[0] is not None:
            engine[0].close()


def _train(run, config: RunConfig, writers, budget: int | None, loss_fn, engine: list) -> None:
    ctx, train = run.ctx, config.student.train
    while _keep_going(run.step, train.steps, run.teacher_tokens, budget):
        rollouts = routing = scores = None
        if ctx.is_logger:
            prompts = with_pi(next(run.sampler), config, ctx.tokenizer)
            with run.metrics.span("generate"):
                rollouts = fit_to_max_seq_len(run, _targets(prompts, writers, ctx.tokenizer, config, run.step))
            routing, scores = one_hot_scores(rollouts)
        else:
            next(run.sampler)  # every rank keeps the same data position for its checkpoint
        result = train_on(run, rollouts, routing, scores, loss_fn, (REFERENCE,))
        log_step(run, result, {})
        maybe_checkpoint(run)
        _periodic_eval(run, engine)


def _periodic_eval(run, engine: list) -> None:
    """``eval.every_steps`` inside sft (an accuracy-over-teacher-tokens curve, bench/efficiency.py): a
    rollout engine built at the first evaluation, synced with the student's weights before each."""
    every = run.config.eval.every_steps
    if every <= 0 or run.step % every:
        return
    if engine:
        run.student.sync_into(engine, version=run.step)
    else:
        engine.append(rollout_engine(run))
    maybe_evaluate(run, engine[0], force=True)


def with_pi(prompts: list[Prompt], config: RunConfig, tokenizer) -> list[Prompt]:
    """Show a stable ``data.pi_in_prompt`` share of prompts (chosen by prompt index) with their PI, placed
    where a PI self-teacher shows it: in the conversation by ``data.pi_placement`` (re-rendered by the
    chat template), or around a plain-text prompt by ``data.pi_template``."""
    data = config.data
    if data.pi_in_prompt <= 0.0:
        return prompts
    render, out = PromptRenderer(tokenizer, enable_thinking=data.enable_thinking), []
    if data.pi_placement != PIPlacement.user and not render.uses_chat_template:
        raise ConfigError(f"data.pi_placement={data.pi_placement.value} needs a chat template, and the tokenizer "
                          "has none; plain-text prompts take pi_placement=user (data.pi_template)")
    if data.pi_placement != PIPlacement.user:
        check_takes_system_message(tokenizer, f"data.pi_placement={data.pi_placement.value}")
    for p in prompts:
        if p.pi is not None and (p.index * 0.6180339887) % 1.0 < data.pi_in_prompt:
            if p.messages is None:
                text = join_pi(data.pi_template, p.pi, p.text)
                p = replace(p, ids=torch.tensor(render(text), dtype=torch.long), text=text)
            else:
                ids, messages = render.render(place_pi(p.messages, p.pi, data.pi_placement, data.pi_template))
                p = replace(p, ids=torch.tensor(ids, dtype=torch.long), messages=messages)
        out.append(p)
    return out


def _keep_going(step: int, steps: int, tokens: int, budget: int | None) -> bool:
    """Steps bound a plain SFT stage; a budgeted baseline trains until it has seen `budget` tokens."""
    done = tokens >= budget if budget is not None else step >= steps
    return bool(broadcast(not done))


def _targets(prompts: list[Prompt], writers: dict[str, EmbeddedEngine] | None, tokenizer,
             config: RunConfig, step: int) -> list[Rollout]:
    if writers is None:
        return [reference_rollout(p, tokenizer, config.rollout.sampling.max_new_tokens) for p in prompts]
    by_domain: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_domain.setdefault(p.domain, []).append(p)
    out: list[Rollout] = []
    sampling = replace(step_sampling(config, step), n=1)
    for domain, group in by_domain.items():
        if domain not in writers:
            raise ConfigError(f"sft sources write only for domains {sorted(writers)}; prompt {group[0].index} "
                              f"has domain {domain!r}")
        out += writers[domain].generate(group, sampling)
    return out


def _teacher_writers(ctx: RunContext, stage: StageConfig, config: RunConfig) -> dict[str, EmbeddedEngine]:
    """domain -> the engine of the source stage whose teacher entry covers that domain."""
    writers: dict[str, EmbeddedEngine] = {}
    for source in stage.sources:
        covering = [t for t in config.distill.teachers if t.checkpoint == source]
        if not covering:
            raise ConfigError(f"stages[{stage.name}].sources: no distill.teachers entry has checkpoint={source!r}, "
                              "so the domains it writes for are unknown")
        engine = EmbeddedEngine.from_pretrained(ctx.hf_dir_of(source), name=source)
        for teacher in covering:
            for domain in teacher.domains:
                writers[domain] = engine
    return writers
