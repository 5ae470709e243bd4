"""The opd stage: on-policy distillation from routed teachers (DESIGN.md §1).

Each step: sample prompts -> the student's engine generates -> the router assigns teachers ->
teachers score the student's tokens (top-K) -> the Megatron student trains on them -> its weights
are synced into the engine (and into EMA self-teachers). Rank 0 holds the engines; every rank trains.

With ``rollout.max_staleness = 1`` generation of step n+1 overlaps training of step n (one thread),
so those rollouts come from weights exactly one version old; turn on the objectives' ``importance_ratio``
to correct for it. Off (0) by default: fully on-policy. One step of look-ahead is all the loop has, so
the config refuses larger values (mopd.config.distill.RolloutConfig).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import torch

from mopd.config import AlarmAction, RunConfig, SamplingConfig, StageConfig
from mopd.data.sampler import PromptSampler
from mopd.data.synthetic import domain_verifier
from mopd.diagnostics import Alarm, last_good_checkpoint, rollout_diagnostics, set_aside_after
from mopd.errors import CollapseError, ConfigError
from mopd.stages.batches import loss_fn_for
from mopd.stages.context import RunContext, StageOutput, broadcast
from mopd.stages.engines import rollout_engine
from mopd.stages.evaluate import maybe_evaluate
from mopd.stages.teachers import TeacherSet, build_teacher_set
from mopd.stages.training import (
    StageRun,
    finish_stage,
    fit_to_max_seq_len,
    log_step,
    maybe_checkpoint,
    resume_stage,
    start_stage,
    train_on,
)
from mopd.student import StepResult
from mopd.sync import WeightSync
from mopd.sync.stage_senders import rollout_weight_sync
from mopd.teachers import score_batch


def run_opd(ctx: RunContext, stage: StageConfig, config: RunConfig) -> StageOutput:
    sampling, train = config.rollout.sampling, config.student.train
    if train.global_batch_size % sampling.n:
        raise ConfigError(f"student.train.global_batch_size={train.global_batch_size} must be a multiple of "
                          f"rollout.sampling.n={sampling.n}")
    run = start_stage(ctx, stage, config, train.global_batch_size // sampling.n, train.steps)
    teachers = build_teacher_set(ctx, run, config)  # before resuming: self-teachers keep the initial weights
    teachers.restore(resume_stage(run), version=run.step)
    engine = rollout_engine(run)
    # SGLang over NCCL: each pipeline stage's first rank sends its own layers (mopd.sync.stage_senders)
    sync = rollout_weight_sync(run.student.chunks, config.student.model, ctx.layout, teachers.consumers(engine), engine)
    loss_fn = loss_fn_for(config.student, ctx.layout, teachers.objectives, teachers.names, teachers.coefs)
    alarm, prefetch = Alarm(config.diagnostics), Prefetch(config.rollout.max_staleness)
    kl_teachers = teachers.named(config.eval.teacher_kl)
    try:
        if config.eval.at_start and run.step == 0:  # "before"; a resumed run has it in its history
            maybe_evaluate(run, engine, force=True, teachers=kl_teachers)
        _loop(run, engine, teachers, sync, loss_fn, alarm, prefetch, kl_teachers)
        maybe_checkpoint(run, extra=teachers.state(), force=True)
        # The engine holds the final weights: it serves the evaluation.
        return finish_stage(run, engine, teachers=kl_teachers)
    finally:
        prefetch.close()
        sync.close()  # the stage senders' clients and groups
        if engine is not None:
            engine.close()  # SGLang: stops servers this run launched


def _loop(run: StageRun, engine, teachers: TeacherSet, sync: WeightSync, loss_fn, alarm: Alarm,
          prefetch: Prefetch, kl_teachers) -> None:
    """DESIGN.md §1, one iteration per optimizer step."""
    while run.step < run.config.student.train.steps:
        with run.metrics.span("step"):  # everything but checkpoints and evaluations (bench/vs_trl_onpolicy.py)
            result, diagnostics = _step(run, engine, teachers, sync, loss_fn, alarm, prefetch)
        log_step(run, result, diagnostics)
        act_on_alarm(run, alarm, teachers)  # before this step's checkpoint: stop writes none after the alarm
        maybe_checkpoint(run, extra=teachers.state())
        maybe_evaluate(run, engine, teachers=kl_teachers)


def _step(run: StageRun, engine, teachers: TeacherSet, sync: WeightSync, loss_fn, alarm: Alarm,
          prefetch: Prefetch) -> tuple[StepResult, dict[str, float]]:
    """Generate -> route and score -> train -> sync the engine; returns the step and its diagnostics."""
    ctx, config, train = run.ctx, run.config, run.config.student.train
    rollouts = routing = scores = rewards = None
    prompts = next(run.sampler)  # every rank advances the sampler: checkpoints record its position
    if ctx.is_logger:
        with run.metrics.span("generate"):
            rollouts = prefetch.take(lambda: engine.generate(prompts, step_sampling(config, run.step)))
        rollouts = fit_to_max_seq_len(run, rollouts)
        with run.metrics.span("score"):  # the prompts carry the metadata that routing rules match
            routing, scores = score_batch(rollouts, teachers.teachers, teachers.router,
                                          prompts={p.index: p for p in prompts})
        rewards = verify(rollouts, ctx.tokenizer, config.data.verifiers)
        if run.step + 1 < train.steps:
            upcoming, upcoming_sampling = peek(run.sampler), step_sampling(config, run.step + 1)
            prefetch.start(lambda: engine.generate(upcoming, upcoming_sampling))
    result = train_on(run, rollouts, routing, scores, loss_fn, teachers.names, rewards)
    prefetch.wait()  # the engine's weights change below; no generation may be in flight
    with run.metrics.span("sync"):
        sync.sync(version=run.step)
    return result, step_diagnostics(run, rollouts, routing, scores, rewards, teachers, alarm)


def step_sampling(config: RunConfig, step: int) -> SamplingConfig:
    """Sampling with a seed derived from (seed, step). The embedded engine honours it, so there a
    resumed run draws exactly what the uninterrupted run drew; a default SGLang 0.5.23 server ignores
    per-request seeds (only ``--enable-deterministic-inference`` uses them), so SGLang rollouts are not
    reproducible across a resume and mopd never retries a generation as if they were."""
    base = config.rollout.sampling.seed if config.rollout.sampling.seed is not None else config.seed
    return replace(config.rollout.sampling, seed=(base * 1_000_003 + step) % 2**31)


def peek(sampler: PromptSampler):
    """The next batch without advancing the sampler."""
    state = sampler.state_dict()
    upcoming = next(sampler)
    sampler.load_state_dict(state)
    return upcoming


def verify(rollouts, tokenizer, verifiers: dict[str, str] | None = None) -> torch.Tensor:
    """Verifier reward per rollout (1.0 / 0.0; 0 without a reference); ``verifiers`` is data.verifiers."""
    rewards = []
    for r in rollouts:
        text = tokenizer.decode(r.response_ids.tolist(), skip_special_tokens=True)
        score = domain_verifier(r.domain, named=verifiers)(text, r.reference) if r.reference is not None else 0.0
        rewards.append(score)
    return torch.tensor(rewards, dtype=torch.float32)


def step_diagnostics(run: StageRun, rollouts, routing, scores, rewards, teachers: TeacherSet,
                     alarm: Alarm) -> dict[str, float]:
    if not run.ctx.is_logger:
        return {}
    texts = [run.ctx.tokenizer.decode(r.response_ids.tolist(), skip_special_tokens=True) for r in rollouts]
    values = rollout_diagnostics(rollouts, texts, routing, scores, run.config.diagnostics)
    values["rollout/reward"] = float(rewards.mean())
    values["rollout/weight_version"] = float(min(r.weight_version for r in rollouts))
    values.update(teachers.route_metrics())
    for event in alarm.update(run.step, values):
        run.metrics.warn(event.message)
    return values


def act_on_alarm(run: StageRun, alarm: Alarm, teachers: TeacherSet) -> None:
    """``diagnostics.on_alarm`` for the alarms of this step (rank 0 saw them; every rank acts)."""
    action = run.config.diagnostics.on_alarm
    if action == AlarmAction.warn:
        return
    events = broadcast(alarm.fresh if run.ctx.is_logger else None)
    if not events:
        return
    if action == AlarmAction.checkpoint:
        maybe_checkpoint(run, extra=teachers.state(), force=True, directory=run.dir / "alarm_checkpoints")
        return
    event, good = events[0], None
    if run.ctx.is_logger:
        good = last_good_checkpoint(run.checkpoints, event)
        set_aside_after(run.checkpoints, event)
        if run.progress is not None:
            run.progress.close()
        run.metrics.close()
    good = broadcast(good)
    kept = (f"the last checkpoint from before it is {good}" if good is not None else
            f"no checkpoint from before step {event.window_start} is left in {run.checkpoints} "
            f"(checkpoint.save_every={run.config.checkpoint.save_every}, keep_last={run.config.checkpoint.keep_last})")
    raise CollapseError(f"diagnostics.on_alarm=stop ended stage {run.stage.name!r}: {event.message} "
                        f"(falling since step {event.window_start}); {kept}; checkpoints from the falling "
                        f"window moved to {run.checkpoints / 'after_alarm'}")


class Prefetch:
    """Generation of the next step's rollouts in a background thread (``max_staleness = 1``)."""

    def __init__(self, max_staleness: int):
        if max_staleness not in (0, 1):
            raise ConfigError(f"rollout.max_staleness={max_staleness}: the loop looks one step ahead, so 0 or 1")
        self.enabled = max_staleness == 1
        self.pool = ThreadPoolExecutor(max_workers=1) if self.enabled else None
        self.pending: Future | None = None

    def start(self, job) -> None:
        if self.enabled:
            self.pending = self.pool.submit(job)

    def take(self, job):
        """The prefetched rollouts if there are any, else generate now."""
        if self.pending is None:
            return job()
        result, self.pending = self.pending.result(), None
        return result

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.exception()  # block until done; errors surface in take()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

