"""Typed configuration: a tree of frozen dataclasses loaded from YAML (see loader.py for precedence)."""

from mopd.config.checks import Problem
from mopd.config.distill import (
    DistillConfig,
    EngineKind,
    ObjectiveConfig,
    ObjectiveName,
    PIPlacement,
    RolloutConfig,
    RouteGranularity,
    RouteRule,
    RouterConfig,
    SamplingConfig,
    SGLangConfig,
    TeacherConfig,
    TeacherKind,
    TokenRule,
)
from mopd.config.loader import build_config, load_config, to_yaml, with_overrides
from mopd.config.model import (
    Backend,
    Dtype,
    Family,
    Fp8Format,
    Fp8Recipe,
    LrSchedule,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    StudentConfig,
    TrainConfig,
    padded_vocab_size,
)
from mopd.config.run import (
    AlarmAction,
    CheckpointConfig,
    DataConfig,
    DiagnosticsConfig,
    EvalConfig,
    LoggingConfig,
    RunConfig,
    StageConfig,
    StageKind,
    StageRole,
    WandbMode,
)

__all__ = [name for name in dir() if not name.startswith("_")]
