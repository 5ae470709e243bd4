"""A training stage's life (sft and opd): start, resume, one optimizer step on a packed batch, log,
checkpoint, finish (final weights, HF export, evaluation through the rollout engine)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from mopd.config import ModelConfig, RunConfig, StageConfig, StageKind
from mopd.config.model import Overlong
from mopd.data.sampler import PromptSampler
from mopd.data.sources import build_source
from mopd.data.synthetic import PiMode
from mopd.errors import ConfigError, DataError
from mopd.hf.convert import check_checkpoint_model
from mopd.metrics import Metrics
from mopd.objectives import mean_metrics
from mopd.rollout.engine import Engine
from mopd.stages.batches import my_share
from mopd.stages.context import RunContext, StageOutput, barrier, broadcast
from mopd.stages.engines import rollout_engine
from mopd.stages.evaluate import evaluate_on_engine
from mopd.stages.student import Student
from mopd.student import StepResult, train_step
from mopd.teachers import build_train_batches
from mopd.types import LossFn, Rollout, Routing, TeacherScores

logger = logging.getLogger(__name__)

TRAINING_KINDS = (StageKind.sft, StageKind.opd)


@dataclass
class StageRun:
    """The mutable state of one training stage: step counter, budgets, history, progress."""

    ctx: RunContext
    stage: StageConfig
    config: RunConfig
    student: Student
    sampler: PromptSampler
    metrics: Metrics
    total_steps: int = 0
    step: int = 0
    teacher_tokens: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    progress: tqdm | None = None
    length_metrics: dict[str, float] = field(default_factory=dict)
    """This step's ``train/truncated_*`` counts (rank 0's, set by ``fit_to_max_seq_len``)."""

    @property
    def dir(self) -> Path:
        return self.ctx.stage_dir(self.stage)

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"


def start_stage(ctx: RunContext, stage: StageConfig, config: RunConfig, prompts_per_step: int,
                total_steps: int) -> StageRun:
    """Build the student (from ``init_from`` or random), the prompt sampler and the metrics.

    Call ``resume_stage`` after building anything that needs the student's initial weights.
    """
    student = Student.build(config.student, ctx.layout, init_weights(ctx, stage, config.student.model))
    source = build_source(config.data, ctx.tokenizer, seed=config.seed, pi_mode=PiMode(config.data.pi_mode))
    sampler = PromptSampler(list(source), batch_size=prompts_per_step, seed=config.seed)
    stage_dir = ctx.stage_dir(stage)
    metrics = Metrics.for_run(config.logging, f"{config.name}/{stage.name}", stage_dir, is_logger=ctx.is_logger)
    run = StageRun(ctx, stage, config, student, sampler, metrics, total_steps=total_steps)
    return run


def resume_stage(run: StageRun) -> dict:
    """With ``--resume``, load the stage's latest checkpoint; returns its extra state ({} if none)."""
    state = run.student.resume(run.checkpoints) if run.ctx.resume else None
    if state is not None:
        run.step, run.teacher_tokens = int(state["step"]), int(state["teacher_tokens"])
        run.history = list(state["history"])
        run.sampler.load_state_dict(state["sampler"])
        if run.ctx.is_logger:
            print(f"[{run.stage.name}] resumed at step {run.step} from {run.checkpoints}", flush=True)
    if run.ctx.is_logger and run.config.logging.progress_bar:
        run.progress = tqdm(total=run.total_steps, initial=run.step, desc=run.stage.name, unit="step",
                            dynamic_ncols=True)
    return state or {}


def init_weights(ctx: RunContext, stage: StageConfig, model: ModelConfig | None = None) -> Path | None:
    """The Megatron weights a stage starts from: an earlier stage's, or a folder written by
    `convert_hf.py import` whose model must be `model` (default: the run's student.model)."""
    if stage.init_from is None:
        return None
    if stage.init_from in ctx.outputs:
        return ctx.stage_dir_of(stage.init_from) / "weights"
    return checked_init_folder(stage, model or ctx.config.student.model)


def check_init_sources(stages: list[StageConfig], stage_configs: dict[str, RunConfig]) -> None:
    """Before the first stage runs: every training stage's init_from names a stage listed before it, or a
    Megatron folder of the stage's student.model (`checked_init_folder`); the earlier stages a stage
    starts from or takes weights or sft targets from (`sources`) share its tokenizer."""
    earlier: set[str] = set()
    for stage in stages:
        if stage.kind in TRAINING_KINDS and stage.init_from is not None and stage.init_from not in earlier:
            checked_init_folder(stage, stage_configs[stage.name].student.model)
        for key, source in [("init_from", stage.init_from)] + [("sources", s) for s in stage.sources or ()]:
            if source in earlier:
                check_same_tokenizer(f"stages[{stage.name}].{key}", source, stage_configs[source],
                                     stage_configs[stage.name])
        earlier.add(stage.name)


def check_same_tokenizer(key: str, source: str, theirs: RunConfig, ours: RunConfig) -> None:
    """Token ids (weights' rows, sft targets) mean something only in the tokenizer they came from."""
    a = (theirs.data.tokenizer, theirs.student.model.vocab_size)
    b = (ours.data.tokenizer, ours.student.model.vocab_size)
    if a != b:
        raise ConfigError(f"{key}={source!r}: that stage's tokenizer is data.tokenizer={a[0]!r} "
                          f"(student.model.vocab_size={a[1]}), this one's {b[0]!r} ({b[1]}); weights and token "
                          "ids pass between stages of one tokenizer only (a teacher of another tokenizer scores "
                          "through distill.teachers[].tokenizer)")


def checked_init_folder(stage: StageConfig, model: ModelConfig) -> Path:
    """`stage.init_from` as a folder: it exists, is a Megatron checkpoint (not an HF folder) and, when it
    carries the importer's mopd_model.yaml, describes `model` (ConfigError naming the key otherwise)."""
    key, path = f"stages[{stage.name}].init_from", Path(stage.init_from)
    convert = f"`python tools/convert_hf.py import --hf-dir {path} --megatron-dir OUT --tp N` and start from OUT"
    if not path.is_dir():
        raise ConfigError(f"{key}={stage.init_from!r} is neither a stage listed before {stage.name!r} nor an "
                          "existing folder")
    if (path / "config.json").is_file() and not (path / "metadata.json").is_file():
        raise ConfigError(f"{key}={stage.init_from!r} is an HF folder; convert it once with {convert}")
    if not (path / "metadata.json").is_file():
        raise ConfigError(f"{key}={stage.init_from!r} is not a Megatron checkpoint folder (no metadata.json); "
                          f"write one from an HF model with {convert.replace(str(path), 'HF')}")
    check_checkpoint_model(path, model, key=key)
    return path


def fit_to_max_seq_len(run: StageRun, rollouts: list[Rollout]) -> list[Rollout]:
    """Enforce ``student.train.max_seq_len`` (prompt + response) on rank 0's rollouts, before scoring.

    ``overlong=truncate`` cuts a longer response to fit and counts it (``train/truncated_rollouts``,
    ``train/truncated_tokens``: the tokens cut); ``overlong=refuse`` stops the run naming the rollout.
    A prompt that leaves no room for one response token is refused either way.
    """
    train = run.config.student.train
    limit, out, cut_rollouts, cut_tokens = train.max_seq_len, [], 0, 0
    for i, r in enumerate(rollouts):
        p, t = int(r.prompt_ids.numel()), int(r.response_ids.numel())
        if p + t <= limit:
            out.append(r)
            continue
        if train.overlong == Overlong.refuse or p >= limit:
            why = ("student.train.overlong=refuse" if p < limit else "its prompt alone fills it")
            raise DataError(f"student.train.max_seq_len={limit}: rollout {i} (prompt {r.prompt_index}, domain "
                            f"{r.domain!r}) has {p} prompt + {t} response tokens ({why}); raise max_seq_len, lower "
                            "rollout.sampling.max_new_tokens or data.max_prompt_tokens, or set overlong=truncate")
        keep = limit - p
        response = r.response_ids[:keep]
        out.append(replace(r, response_ids=response, behaviour_logprobs=r.behaviour_logprobs[:keep], finish="length",
                           text=run.ctx.tokenizer.decode(response.tolist(), skip_special_tokens=True)))
        cut_rollouts, cut_tokens = cut_rollouts + 1, cut_tokens + t - keep
    run.length_metrics = {"train/truncated_rollouts": float(cut_rollouts), "train/truncated_tokens": float(cut_tokens)}
    return out


def train_on(run: StageRun, rollouts: list[Rollout] | None, routing: Routing | None,
             scores: TeacherScores | None, loss_fn: LossFn, teacher_names: tuple[str, ...],
             rewards=None) -> StepResult:
    """Pack rank 0's scored rollouts, share them out, and take one optimizer step on every rank."""
    cfg = run.config.student
    batches = None
    if run.ctx.is_logger:
        longest = max(int(r.prompt_ids.numel() + r.response_ids.numel()) for r in rollouts)
        if longest > cfg.train.max_seq_len:  # fit_to_max_seq_len runs before scoring; this is its guard
            raise DataError(f"student.train.max_seq_len={cfg.train.max_seq_len}: a {longest}-token rollout reached "
                            "the train step (fit_to_max_seq_len was skipped)")
        batches = build_train_batches(rollouts, scores, routing, cfg.train.micro_batch_size,
                                      run.ctx.tokenizer.pad_token_id, rewards=rewards)
    with run.metrics.span("train"):
        result = train_step(run.student.chunks, run.student.optimizer, run.student.scheduler,
                            my_share(batches, run.ctx.layout), loss_fn, run.ctx.layout, step=run.step,
                            teacher_names=teacher_names)
    run.step += 1
    run.teacher_tokens += result.num_tokens
    return result


def log_step(run: StageRun, result: StepResult, extra: dict[str, float]) -> None:
    values = {"train/loss": result.loss, "train/grad_norm": result.grad_norm, "train/lr": result.lr,
              "train/tokens": float(result.num_tokens), "train/tokens_per_s": result.tokens_per_s,
              **mean_metrics(result.metrics), **run.length_metrics, **extra, **run.metrics.pop_timings()}
    if run.step % run.config.logging.log_every == 0 or run.step == 1:
        run.metrics.log(run.step, values)
    run.history.append({"step": float(run.step), **{k: float(v) for k, v in values.items()}})
    if run.progress is not None:
        run.progress.update(1)
        run.progress.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{result.tokens_per_s:.0f}")


def maybe_checkpoint(run: StageRun, extra: dict | None = None, force: bool = False,
                     directory: Path | None = None) -> None:
    """Every ``checkpoint.save_every`` steps (or now, with ``force``) into ``run.checkpoints``; a
    ``directory`` of its own (the alarm's) is never pruned by ``keep_last``."""
    every = run.config.checkpoint.save_every
    if not force and (every <= 0 or run.step % every):
        return
    state = {"teacher_tokens": run.teacher_tokens, "history": run.history, "sampler": run.sampler.state_dict(),
             **(extra or {})}
    keep = run.config.checkpoint.keep_last if directory is None else 1 << 30
    run.student.save(directory or run.checkpoints, run.step, state, keep)


def finish_stage(run: StageRun, engine: Engine | None = None, teachers=None) -> StageOutput:
    """Save final weights (Megatron + HF), evaluate them (with ``teachers``' KL: ``eval.teacher_kl``),
    and record the stage's output.

    The evaluation runs on ``engine`` (opd: its rollout engine, already holding the final weights) or
    on a rollout engine built for it from config (sft), never on a CPU copy of the exported folder.
    """
    if run.progress is not None:
        run.progress.close()
    run.student.save_weights(run.dir / "weights")
    hf_dir = run.student.export_hf(run.dir / "hf", run.ctx.tokenizer)
    evaluation = {}
    if run.stage.evaluate:
        own = broadcast(engine is None)  # rank 0's answer: only rank 0 holds an engine
        engine = rollout_engine(run) if own else engine
        try:
            evaluation = evaluate_on_engine(run.ctx, run.config, engine, teachers)
        finally:
            if own and engine is not None:
                engine.close()
    run.metrics.close()
    barrier()
    return StageOutput(name=run.stage.name, kind=run.stage.kind.value, role=run.stage.role.value,
                       hf_dir=str(hf_dir), wall_s=time.perf_counter() - run.started,
                       teacher_tokens=run.teacher_tokens, eval=evaluation, history=run.history,
                       warnings=list(run.metrics.warnings))
