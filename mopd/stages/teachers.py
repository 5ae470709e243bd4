"""The opd stage's teachers: engines built from config, the router, and the weight stream they share.

Engines live on global rank 0: an expert is an earlier stage's (or a path's) HF folder in an
``EmbeddedEngine``, or an SGLang server; a PI self-teacher without a checkpoint holds the student's
initial weights (frozen, or as the seed of its EMA). Every rank knows the names, objectives and
coefficients (the loss needs them); only rank 0 holds teachers and the router.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mopd.config import EngineKind, ObjectiveConfig, RunConfig, TeacherConfig, TeacherKind
from mopd.errors import ConfigError
from mopd.rollout.embedded import EmbeddedEngine
from mopd.rollout.engine import Engine
from mopd.stages.context import RunContext
from mopd.stages.engines import hf_engine
from mopd.stages.student import Recorder, Student
from mopd.sync import tracking
from mopd.teachers import Router, Teacher, build_teachers, check_pi_coverage
from mopd.teachers.build import configured_tokenizer
from mopd.teachers.scoring import is_cross_tokenizer


@dataclass
class TeacherSet:
    names: tuple[str, ...]
    objectives: dict[int, list[ObjectiveConfig]]
    coefs: dict[int, float]
    teachers: list[Teacher] | None = None
    """Rank 0 only."""
    router: Router | None = None
    """Rank 0 only."""

    def consumers(self, engine: EmbeddedEngine | None) -> list:
        """What the student's weights stream into after each step: the rollout engine, EMA teachers."""
        return [c for c in (engine, *tracking(self.teachers or [])) if c is not None]

    def state(self) -> dict:
        """EMA teachers' state for the checkpoint (rank 0's is the one saved)."""
        return {"ema": {t.name: t.ema_state() for t in self.teachers or [] if t.tracks_student}}

    def restore(self, state: dict, version: int) -> None:
        for teacher in self.teachers or []:
            if teacher.tracks_student and teacher.name in state.get("ema", {}):
                teacher.load_ema_state(state["ema"][teacher.name], version)

    def route_metrics(self) -> dict[str, float]:
        if self.router is None or self.router.last is None:
            return {}
        return self.router.last.metrics()

    def named(self, names: list[str]) -> list[Teacher] | None:
        """Rank 0's teachers called ``names`` (``eval.teacher_kl``), in that order; None elsewhere."""
        if self.teachers is None:
            return None
        by_name = {t.name: t for t in self.teachers}
        return [by_name[n] for n in names]


def build_teacher_set(ctx: RunContext, run, config: RunConfig) -> TeacherSet:
    configs = config.distill.teachers
    if not configs:
        raise ConfigError("distill.teachers: an opd stage needs at least one teacher")
    names = tuple(t.name for t in configs)
    objectives = {i: list(t.objectives or config.distill.objectives) for i, t in enumerate(configs)}
    coefs = {i: float(t.coef) for i, t in enumerate(configs)}
    out = TeacherSet(names, objectives, coefs)
    # The student's initial weights, for self-teachers without a checkpoint (collective: every rank).
    needs_initial = any(t.kind == TeacherKind.self_pi and t.checkpoint is None for t in configs)
    initial = _collect(run.student) if needs_initial else None
    if not ctx.is_logger:
        return out
    engines: dict[str, Engine] = {}
    tokenizers = {}
    for t in configs:
        engines[t.name], tokenizers[t.name] = _engine(ctx, config, t, initial)
        if t.tokenizer is not None:  # its own tokenizer: same vocabulary or cross-tokenizer (DESIGN.md §13)
            own = tokenizers[t.name] if tokenizers[t.name] is not ctx.tokenizer else None
            tokenizers[t.name] = configured_tokenizer(t, own, _folder_of(ctx))
    out.teachers = build_teachers(configs, engines, ctx.tokenizer, tokenizers, initial_weights=initial,
                                  enable_thinking=config.data.enable_thinking,
                                  default_objectives={t.name: objectives[i] for i, t in enumerate(configs)})
    out.router = Router(config.distill.router, configs)
    cross = [t.name for t in out.teachers if is_cross_tokenizer(t)]
    if cross and out.router.per_token:
        raise ConfigError(f"distill.router.granularity=token compares teachers token by token, but {cross} read "
                          "the response in another tokenizer; route them per prompt (granularity=prompt)")
    check_pi_coverage(run.sampler.source, configs, out.router)  # before the first step, not at the prompt
    return out


def _folder_of(ctx: RunContext):
    """An earlier stage's HF folder or a path (a tokenizer folder need not hold a model's config.json)."""
    return lambda name: ctx.hf_dir_of(name) if name in ctx.outputs else Path(name)


def _collect(student: Student) -> list[tuple[str, torch.Tensor]] | None:
    recorder = Recorder()
    student.sync_into([recorder], version=0)
    return recorder.tensors if student.layout.rank == 0 else None


def _engine(ctx: RunContext, config: RunConfig, t: TeacherConfig, initial):
    """(engine, tokenizer) of one teacher."""
    if t.engine == EngineKind.sglang:
        from transformers import AutoTokenizer

        from mopd.rollout.sglang_client import SGLangEngine

        if not t.endpoint:
            raise ConfigError(f"distill.teachers[{t.name}].endpoint: an SGLang teacher is reached at its server's "
                              "URL (slurm/mopd_70b.sh starts one server group per teacher and exports it)")
        engine = SGLangEngine(config.rollout.sglang, name=t.name, endpoints=[t.endpoint])
        tokenizer = AutoTokenizer.from_pretrained(t.checkpoint) if t.checkpoint else ctx.tokenizer
        return engine, tokenizer
    if t.checkpoint is not None:
        engine = EmbeddedEngine.from_pretrained(ctx.hf_dir_of(t.checkpoint), name=t.name)
        return engine, engine.tokenizer
    if t.kind != TeacherKind.self_pi:
        raise ConfigError(f"distill.teachers[{t.name}].checkpoint: an expert teacher needs a checkpoint "
                          "(an earlier stage's name or an HF folder)")
    engine = hf_engine(config.student.model, ctx.tokenizer, name=t.name)
    engine.update_weights(initial, version=0)
    return engine, ctx.tokenizer
