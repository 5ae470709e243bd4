"""The root of the config tree: one run, its sections and the stages it executes."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from mopd.config.checks import Problem, at_least, positive
from mopd.config.distill import DistillConfig, RolloutConfig
from mopd.config.model import StudentConfig


class StageKind(str, Enum):
    sft = "sft"
    """Cross-entropy on a dataset (experts, baselines)."""
    opd = "opd"
    """On-policy distillation from routed teachers."""
    eval = "eval"
    """Per-domain accuracy with verifiers."""
    export = "export"
    """Write an HF checkpoint."""


class WandbMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where prompts come from."""

    source: str = "synthetic"
    """synthetic, jsonl or hf."""
    path: str | None = None
    """JSONL file or HF dataset name/path."""
    split: str = "train"
    domains: list[str] = field(default_factory=list)
    """Synthetic domains to generate, or the domains to keep (empty keeps all)."""
    prompt_field: str = "prompt"
    domain_field: str = "domain"
    pi_field: str = "pi"
    reference_field: str = "reference"
    max_prompt_tokens: int = 512
    max_bad_fraction: float = 0.01
    """Stop the run if more than this fraction of records is malformed."""
    num_prompts: int = 1000
    """Synthetic: prompts per domain."""
    enable_thinking: bool | None = None
    """Passed to the tokenizer's chat template as ``enable_thinking`` (Qwen3-style thinking on/off);
    null passes nothing. Ignored when the tokenizer has no chat template."""

    def problems(self) -> list[Problem]:
        out = positive(self, "max_prompt_tokens", "num_prompts")
        if self.source not in ("synthetic", "jsonl", "hf"):
            out.append(Problem("source", self.source, "must be one of ['hf', 'jsonl', 'synthetic']"))
        if self.source in ("jsonl", "hf") and not self.path:
            out.append(Problem("path", self.path, f"is required when source={self.source}"))
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            out.append(Problem("max_bad_fraction", self.max_bad_fraction, "must be in [0, 1]"))
        return out


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    dir: str | None = None
    """Where checkpoints go; null means runs/<name>/checkpoints."""
    save_every: int = 0
    """Save every N optimizer steps (0: only at the end of a stage)."""
    keep_last: int = 2
    """Older checkpoints are deleted once a newer one is complete."""
    load: str | None = None
    """Initial weights: a Megatron checkpoint dir, an HF dir, or the name of an earlier stage."""

    def problems(self) -> list[Problem]:
        return at_least(self, 0, "save_every") + positive(self, "keep_last")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    log_every: int = 1
    wandb_mode: WandbMode = WandbMode.offline
    wandb_project: str = "mopd"
    progress_bar: bool = True

    def problems(self) -> list[Problem]:
        return positive(self, "log_every")


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """One stage of a specialise-then-unify pipeline; its output checkpoint is named after it."""

    name: str
    kind: StageKind
    init_from: str | None = None
    """Name of an earlier stage (or a path) whose checkpoint this stage starts from."""
    overrides: list[str] = field(default_factory=list)
    """Dotted `a.b=c` overrides applied to the run config for this stage only."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole run: the student, how it is distilled, from what data, and which stages to execute."""

    name: str = "run"
    """Run name: outputs go to <output_dir>/<name>."""
    output_dir: str = "runs"
    seed: int = 1234
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    stages: list[StageConfig] = field(default_factory=list)

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        names = [s.name for s in self.stages]
        for i, stage in enumerate(self.stages):
            if stage.init_from is not None and stage.init_from in names[i:]:
                out.append(Problem(f"stages[{i}].init_from", stage.init_from,
                                   f"must name an earlier stage, one of {names[:i]}, or a path"))
        return out
