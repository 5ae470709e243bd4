"""The root of the config tree: one run, its sections and the stages it executes."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from mopd.config.checks import Problem, at_least, positive
from mopd.config.distill import DistillConfig, PIPlacement, RolloutConfig
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
    average = "average"
    """Average the weights of the stages listed in `sources` (the weight-averaging baseline)."""


class WandbMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class AlarmAction(str, Enum):
    """What a firing diagnostics alarm does (``diagnostics.on_alarm``)."""

    warn = "warn"
    """Print it, keep it for the summary, keep training."""
    stop = "stop"
    """End the run with a CollapseError naming the metric and step. Checkpoints written inside the
    window that tripped the alarm move to ``checkpoints/after_alarm/``, so the latest one left is from
    before the collapse and ``--resume`` starts from it; none is written after the alarm."""
    checkpoint = "checkpoint"
    """Save a checkpoint at the alarm step under ``<stage>/alarm_checkpoints/`` (never pruned by
    ``checkpoint.keep_last``; usable as ``init_from``) and keep training."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where prompts come from."""

    source: str = "synthetic"
    """synthetic, jsonl or hf."""
    path: str | None = None
    """JSONL file or HF dataset name/path."""
    eval_path: str | None = None
    """source=jsonl: a JSONL file of held-out eval prompts (a JSONL file has no splits); null: eval reads
    data.path itself. Synthetic and HF data take their eval split instead."""
    split: str = "train"
    """The split trained on (synthetic, HF); a JSONL file has no splits, so only "train" there."""
    eval_split: str = "eval"
    """The split evaluation reads (synthetic: a held-out generator split; HF: a split of data.path)."""
    domains: list[str] = field(default_factory=list)
    """Synthetic domains to generate, or the domains to keep (empty keeps all)."""
    prompt_field: str = "prompt"
    """A record's prompt: a string, or a list of {role, content} messages (TRL's conversational format)."""
    messages_field: str = "messages"
    """A record's conversation (a list of {role, content} messages), read when it has no prompt field."""
    system_prompt: str | None = None
    """System message put before every plain-string prompt when the tokenizer has a chat template
    (the student's conversation is then [system, user]); null: [user] only, so the template's default
    system message, if it has one, applies. Never given to conversations, which carry their own."""
    domain_field: str = "domain"
    pi_field: str = "pi"
    reference_field: str = "reference"
    verifiers: dict[str, str] = field(default_factory=dict)
    """Verifier name (mopd.data.verifiers.VERIFIERS) per domain of JSONL/HF data, e.g. {identity: mentions};
    synthetic domains have their own, and any other domain uses exact match."""
    max_prompt_tokens: int = 512
    max_bad_fraction: float = 0.01
    """Stop the run if more than this fraction of records is malformed."""
    num_prompts: int = 1000
    """Synthetic: prompts per domain."""
    tokenizer: str = "char"
    """"char" builds the offline character tokenizer (synthetic demo); otherwise an HF tokenizer directory."""
    pi_mode: str = "answer"
    """Synthetic data: privileged information shown to a PI self-teacher (answer, hint or none)."""
    pi_in_prompt: float = 0.0
    """sft stages: fraction of training prompts shown with their PI through pi_template, so a base
    learns to use privileged context (what a PI self-teacher relies on)."""
    pi_template: str = "{pi}\n\n{prompt}"
    """How PI and prompt are joined for pi_in_prompt (use the same template as the self-teacher)."""
    pi_placement: PIPlacement = PIPlacement.user
    """Where pi_in_prompt puts the PI in a chat-templated conversation (use the self-teacher's
    pi_placement, so a base learns to read PI where the teacher will show it)."""
    enable_thinking: bool | None = None
    """Passed to the tokenizer's chat template as ``enable_thinking`` (Qwen3-style thinking on/off);
    null passes nothing. Ignored when the tokenizer has no chat template."""

    def problems(self) -> list[Problem]:
        out = positive(self, "max_prompt_tokens", "num_prompts")
        if self.source not in ("synthetic", "jsonl", "hf"):
            out.append(Problem("source", self.source, "must be one of ['hf', 'jsonl', 'synthetic']"))
        if not 0.0 <= self.pi_in_prompt <= 1.0:
            out.append(Problem("pi_in_prompt", self.pi_in_prompt, "must be in [0, 1]"))
        if "{pi}" not in self.pi_template or self.pi_template.count("{prompt}") != 1:
            out.append(Problem("pi_template", self.pi_template, "must contain {pi} and exactly one {prompt}"))
        out += self._verifier_problems()
        if self.system_prompt is not None and not self.system_prompt.strip():
            out.append(Problem("system_prompt", self.system_prompt, "must be non-empty text or null"))
        if self.pi_mode not in ("answer", "hint", "none"):
            out.append(Problem("pi_mode", self.pi_mode, "must be one of ['answer', 'hint', 'none']"))
        if self.eval_path is not None and self.source != "jsonl":
            out.append(Problem("eval_path", self.eval_path, f"is for source=jsonl (source={self.source} has an "
                                                            "eval split)"))
        if self.source == "jsonl" and self.split != "train":
            out.append(Problem("split", self.split, "a JSONL file has no splits; keep train and give held-out "
                                                    "prompts as data.eval_path"))
        if self.source in ("jsonl", "hf") and not self.path:
            out.append(Problem("path", self.path, f"is required when source={self.source}"))
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            out.append(Problem("max_bad_fraction", self.max_bad_fraction, "must be in [0, 1]"))
        return out


    def _verifier_problems(self) -> list[Problem]:
        from mopd.data.synthetic import DOMAINS
        from mopd.data.verifiers import VERIFIERS

        out = [Problem(f"verifiers.{d}", v, f"must be one of {sorted(VERIFIERS)}")
               for d, v in self.verifiers.items() if v not in VERIFIERS]
        out += [Problem(f"verifiers.{d}", v, "is a synthetic domain, which has its own verifier")
                for d, v in self.verifiers.items() if d in DOMAINS]
        return out


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Training checkpoints, written under each stage's folder (runs/<name>/stages/<stage>/checkpoints).

    A run starts from pretrained weights through the first training stage's `init_from` (a folder written
    by `convert_hf.py import`), not through this section (REMOVED_KEYS)."""

    save_every: int = 0
    """Save every N optimizer steps (0: only at the end of a stage)."""
    keep_last: int = 2
    """Older checkpoints are deleted once a newer one is complete."""

    def problems(self) -> list[Problem]:
        return at_least(self, 0, "save_every") + positive(self, "keep_last")


_INIT_FROM_HINT = ("start from pretrained weights with the first training stage's init_from: a Megatron folder "
                   "written by `python tools/convert_hf.py import --hf-dir HF --megatron-dir OUT --tp N` "
                   "(stages: [{name: ..., kind: opd, init_from: OUT}])")
REMOVED_KEYS: dict[str, str] = {
    "checkpoint.load": f"checkpoint.load was never read; {_INIT_FROM_HINT}",
    "checkpoint.dir": "checkpoint.dir was never read: checkpoints go under each stage's folder "
                      "(<output_dir>/<name>/stages/<stage>/checkpoints); set output_dir or name to move them",
}
"""Keys mopd no longer has, with what to do instead (the loader's unknown-key error shows it)."""


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    log_every: int = 1
    wandb_mode: WandbMode = WandbMode.offline
    wandb_project: str = "mopd"
    progress_bar: bool = True

    def problems(self) -> list[Problem]:
        return positive(self, "log_every")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Per-domain accuracy with the domains' verifiers."""

    num_prompts: int = 100
    """Eval-split prompts per domain."""
    samples_per_prompt: int = 4
    """Sampled responses per prompt for pass@k (0: greedy only)."""
    pass_k: list[int] = field(default_factory=lambda: [1, 4])
    """k values of the unbiased pass@k estimate (each <= samples_per_prompt)."""
    temperature: float = 1.0
    """Sampling temperature of the pass@k samples."""
    max_new_tokens: int | None = None
    """Null: rollout.sampling.max_new_tokens."""
    every_steps: int = 0
    """Also evaluate every N optimizer steps inside opd and sft stages, on the rollout engine (0: only at the
    end); the stage's history then holds accuracy against teacher tokens (mopd/efficiency.py)."""
    at_start: bool = False
    """opd stages: also evaluate before the first step; the summary reports that as "before" and the
    stage's final evaluation as "after"."""
    allow_train_prompts: bool = False
    """Evaluate on the prompts the run trains on (a JSONL run without data.eval_path, or
    data.eval_split equal to data.split); refused unless this is true."""
    teacher_kl: list[str] = field(default_factory=list)
    """opd stages: teachers (distill.teachers names) whose reverse KL to the student is estimated at
    every evaluation, on one response per eval prompt sampled at temperature 1 (nats per token)."""

    def problems(self) -> list[Problem]:
        out = positive(self, "num_prompts") + at_least(self, 0, "samples_per_prompt", "every_steps")
        if self.samples_per_prompt and any(k < 1 or k > self.samples_per_prompt for k in self.pass_k):
            out.append(Problem("pass_k", self.pass_k, f"each k must be in [1, samples_per_prompt={self.samples_per_prompt}]"))
        return out


@dataclass(frozen=True, kw_only=True)
class DiagnosticsConfig:
    """Failure-mode diagnostics of on-policy (self-)distillation, which can fail quietly while the loss looks fine."""

    markers: list[str] = field(default_factory=lambda: ["wait", "hmm", "let me check"])
    """Epistemic markers counted per response."""
    position_buckets: int = 4
    """KL is reported per bucket of response position (early vs late tokens)."""
    alarm_drop: float = 0.5
    """Warn when a watched diagnostic falls by more than this fraction from the start."""
    alarm_on: list[str] = field(default_factory=lambda: ["entropy", "response_len"])
    """What the alarm watches: per-teacher entropy, response_len, and/or reward (rollout/reward, the
    verifier's accuracy on the step's rollouts; catches a teacher that drags the student off the task
    while entropy rises, as the shared-rule OPSD run of bench/opsd_failure_modes.py did)."""
    alarm_window: int = 5
    """Steps averaged at the start and at the current point for the alarm."""
    on_alarm: AlarmAction = AlarmAction.warn
    """warn, stop or checkpoint (see AlarmAction). With stop, keep ``checkpoint.save_every *
    (checkpoint.keep_last - 1)`` above ``alarm_window`` so a checkpoint from before the window survives."""

    def problems(self) -> list[Problem]:
        out = positive(self, "position_buckets", "alarm_window")
        if not 0.0 < self.alarm_drop < 1.0:
            out.append(Problem("alarm_drop", self.alarm_drop, "must be in (0, 1)"))
        unknown = sorted(set(self.alarm_on) - {"entropy", "response_len", "reward"})
        if unknown:
            out.append(Problem("alarm_on", unknown, "must name diagnostics among ['entropy', 'response_len', "
                                                    "'reward']"))
        return out


class StageRole(str, Enum):
    """What a stage's model is in the run summary (per-domain accuracy is reported by role)."""

    none = "none"
    base = "base"
    teacher = "teacher"
    student = "student"
    sft_baseline = "sft_baseline"
    weight_average = "weight_average"


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """One stage of a specialise-then-unify pipeline; its output checkpoint is named after it."""

    name: str
    kind: StageKind
    init_from: str | None = None
    """Name of an earlier stage whose weights this stage starts from, or a Megatron folder written by
    `tools/convert_hf.py import` (any TP/PP; its mopd_model.yaml must equal student.model). Null: random init."""
    overrides: list[str] = field(default_factory=list)
    """Dotted `a.b=c` overrides applied to the run config for this stage only."""
    role: StageRole = StageRole.none
    """How the summary reports this stage's model."""
    sources: list[str] = field(default_factory=list)
    """average: the stages whose weights are averaged; sft: teacher stages that generate the SFT
    targets (sequence-level distillation baseline; each serves the domains of its teacher entry)."""
    token_budget_from: str | None = None
    """sft with sources: train on as many teacher-generated tokens as this opd stage consumed."""
    evaluate: bool = True
    """Evaluate this stage's model at its end."""


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    stages: list[StageConfig] = field(default_factory=list)

    def _eval_on_training_prompts(self) -> list[Problem]:
        """Held-out evaluation: refuse eval prompts that are the training prompts unless asked for."""
        d = self.data
        evaluates = any(s.evaluate or s.kind == StageKind.eval for s in self.stages) or self.eval.every_steps > 0
        if not evaluates or self.eval.allow_train_prompts:
            return []
        if d.source == "jsonl" and d.eval_path in (None, d.path):
            return [Problem("data.eval_path", d.eval_path, f"evaluation would read the training file data.path={d.path!r}; "
                            "give a held-out JSONL file, or set eval.allow_train_prompts=true")]
        if d.source != "jsonl" and d.eval_split == d.split:
            return [Problem("data.eval_split", d.eval_split, f"is the training split (data.split); name a held-out "
                            "split, or set eval.allow_train_prompts=true")]
        return []

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            out.append(Problem("stages", dupes, "stage names must be unique"))
        for i, stage in enumerate(self.stages):
            if stage.init_from is not None and stage.init_from in names[i:]:
                out.append(Problem(f"stages[{i}].init_from", stage.init_from,
                                   f"must name an earlier stage, one of {names[:i]}, or a path"))
            for j, source in enumerate(stage.sources):
                if source not in names[:i]:
                    out.append(Problem(f"stages[{i}].sources[{j}]", source, f"must name an earlier stage, one of {names[:i]}"))
            if stage.kind == StageKind.average and len(stage.sources) < 2:
                out.append(Problem(f"stages[{i}].sources", stage.sources, "an average stage needs at least two stages"))
            if stage.token_budget_from is not None and stage.token_budget_from not in names[:i]:
                out.append(Problem(f"stages[{i}].token_budget_from", stage.token_budget_from,
                                   f"must name an earlier stage, one of {names[:i]}"))
            for j, item in enumerate(stage.overrides):
                if item.split("=", 1)[0].strip().startswith(("student.parallel", "stages")):
                    out.append(Problem(f"stages[{i}].overrides[{j}]", item,
                                       "stages share one parallel layout and cannot change the stage list"))
        out += self._eval_on_training_prompts()
        teachers = sorted(t.name for t in self.distill.teachers)
        out += [Problem("eval.teacher_kl", name, f"must name teachers in distill.teachers {teachers}")
                for name in self.eval.teacher_kl if name not in teachers]
        return out
