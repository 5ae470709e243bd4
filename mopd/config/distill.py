"""Config sections for distillation: objectives, teachers, routing, rollouts."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from mopd.config.checks import Problem, at_least, positive


class ObjectiveName(str, Enum):
    """The objectives of DESIGN.md §4 (registry in mopd/objectives)."""

    forward_kl_topk = "forward_kl_topk"
    reverse_kl_sampled = "reverse_kl_sampled"
    reverse_kl_student_topk = "reverse_kl_student_topk"
    jsd = "jsd"
    skew_kl = "skew_kl"
    aopd = "aopd"
    rlsd = "rlsd"
    cross_entropy = "cross_entropy"
    uld = "uld"
    """Sorted-probability L1 (ULD) where a cross-tokenizer teacher's chunk is not 1:1 (mopd/objectives/cross_vocab.py)."""


class TeacherKind(str, Enum):
    expert = "expert"
    """Another model (a domain expert) served by an engine."""
    self_pi = "self_pi"
    """The student's own initial (or EMA) weights shown privileged information."""


class PIPlacement(str, Enum):
    """Where privileged information goes in a chat-templated conversation (``mopd.data.chat.place_pi``)."""

    system = "system"
    """As the system message: replaces the conversation's system message, or is added first."""
    system_append = "system_append"
    """Appended to the conversation's system message after a blank line (added first when there is none)."""
    user = "user"
    """In the last user message, joined with its text by ``pi_template`` (before or after it)."""


class EngineKind(str, Enum):
    embedded = "embedded"
    """In-process HuggingFace transformers model (CPU, tests, small machines)."""
    sglang = "sglang"
    """SGLang servers over HTTP (production)."""


class RouteGranularity(str, Enum):
    prompt = "prompt"
    token = "token"


class TokenRule(str, Enum):
    confidence = "confidence"
    """Teacher with the highest logprob of the sampled token."""
    entropy = "entropy"
    """Teacher with the lowest entropy over its top-K (tail bucket included)."""
    mixture = "mixture"
    """Fixed mixture weights from router.mixture."""


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """One term of the loss; a teacher's loss is the coefficient-weighted sum of its terms."""

    name: ObjectiveName = ObjectiveName.forward_kl_topk
    """Which divergence."""
    coef: float = 1.0
    """Weight of this term in the sum."""
    teacher_temperature: float = 1.0
    """Temperature applied to the teacher's logprobs (renormalised over top-K + tail) before use."""
    beta: float = 0.5
    """JSD mixture weight (0 < beta < 1) or skew-KL mixing weight alpha."""
    tail_bucket: bool = True
    """top-K forward KL: include the mass outside the top-K as one extra bucket."""
    entry_clip: float = 0.0
    """Cap each vocabulary entry's contribution at this value (OPSD); 0 disables."""
    token_clip: float = 0.0
    """Cap each token's total divergence at this value; 0 disables."""
    importance_ratio: bool = False
    """reverse_kl_sampled: weight by p_student / p_behaviour (off-policy correction)."""
    ratio_cap: float = 2.0
    """Truncate importance ratios above this (TIS)."""
    student_top_k: int = 32
    """reverse_kl_student_topk: entries of the student's own top-K used."""
    credit_clip: float = 0.2
    """rlsd: the teacher's credit weight exp(sign(reward) * log-ratio) is clipped to [1 - c, 1 + c]."""

    def problems(self) -> list[Problem]:
        out = positive(self, "teacher_temperature", "ratio_cap", "student_top_k")
        out += at_least(self, 0.0, "entry_clip", "token_clip")
        if not 0.0 <= self.credit_clip < 1.0:
            out.append(Problem("credit_clip", self.credit_clip, "must be in [0, 1)"))
        if self.name in (ObjectiveName.jsd, ObjectiveName.skew_kl) and not 0.0 < self.beta < 1.0:
            out.append(Problem("beta", self.beta,
                               "must be in (0, 1); use forward_kl_topk / reverse_kl_* for the endpoints"))
        return out


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    """One teacher: a domain expert or the PI self-teacher."""

    name: str
    """Unique name; metrics are keyed teacher/<name>/."""
    kind: TeacherKind = TeacherKind.expert
    engine: EngineKind = EngineKind.embedded
    """Where the teacher runs."""
    checkpoint: str | None = None
    """HF directory (embedded), stage name whose output it is, or model path for a launched SGLang server."""
    endpoint: str | None = None
    """URL of an already-running SGLang server or router (engine=sglang)."""
    domains: list[str] = field(default_factory=list)
    """Domain tags this teacher covers (per-prompt routing)."""
    coef: float = 1.0
    """Scale of this teacher's loss."""
    top_k: int = 64
    """Top-K entries the teacher returns per position."""
    tokenizer: str | None = None
    """The teacher's tokenizer: null is the student's; "char" the built-in one; otherwise an earlier stage's
    name or an HF folder. Same vocabulary as the student's: its exact ids are scored; another: the teacher
    reads the response as text in its own tokens and chat template (cross-tokenizer, DESIGN.md §13)."""
    objectives: list[ObjectiveConfig] = field(default_factory=list)
    """Override the run's objective for this teacher (empty: use distill.objectives)."""
    pi_template: str = "{pi}\n\n{prompt}"
    """self_pi: how PI and the prompt's text are joined: around a plain-text prompt, or around the
    user's text when pi_placement=user ("{pi}\n\n{prompt}" before it, "{prompt}\n\n{pi}" after it)."""
    pi_placement: PIPlacement = PIPlacement.user
    """self_pi with a chat template: where the PI goes when the conversation is re-rendered for the
    teacher (system, system_append or user). Plain-text prompts (no chat template) need user."""
    shared_pi: str | None = None
    """self_pi: one privileged text shown with every prompt, a shared rule such as a system prompt the
    student should internalise. Null: each prompt's own PI (instance PI, read from data.pi_field)."""
    ema_decay: float = 0.0
    """self_pi: 0 keeps the initial weights frozen; otherwise an EMA of the student with this decay."""

    def _pi_problems(self) -> list[Problem]:
        out = []
        if "{pi}" not in self.pi_template or self.pi_template.count("{prompt}") != 1:
            out.append(Problem("pi_template", self.pi_template, "must contain {pi} and exactly one {prompt}"))
        elif self.pi_placement != PIPlacement.user and self.pi_template != "{pi}\n\n{prompt}":
            out.append(Problem("pi_template", self.pi_template,
                               f"is only used with pi_placement=user (it is {self.pi_placement.value})"))
        if self.shared_pi is not None and not self.shared_pi.strip():
            out.append(Problem("shared_pi", self.shared_pi, "must be non-empty text (null: each prompt's own PI)"))
        return out

    def problems(self) -> list[Problem]:
        out = positive(self, "top_k")
        if not 0.0 <= self.ema_decay < 1.0:
            out.append(Problem("ema_decay", self.ema_decay, "must be in [0, 1)"))
        if self.kind == TeacherKind.self_pi:
            out += self._pi_problems()
        elif self.shared_pi is not None:
            out.append(Problem("shared_pi", self.shared_pi, "is only read by kind=self_pi teachers"))
        if self.engine == EngineKind.sglang and not (self.endpoint or self.checkpoint):
            out.append(Problem("endpoint", None, "an sglang teacher needs endpoint or checkpoint"))
        if self.kind == TeacherKind.self_pi and self.tokenizer is not None:
            out.append(Problem("tokenizer", self.tokenizer, "a self_pi teacher is the student: it reads the student's"
                               " tokenizer (only kind=expert teachers take their own)"))
        return out


@dataclass(frozen=True, kw_only=True)
class RouteRule:
    """Send prompts that match to a teacher. Empty fields match anything."""

    teacher: str
    domain: str | None = None
    """Exact domain tag."""
    metadata_key: str | None = None
    metadata_pattern: str | None = None
    """Regex matched against prompt.metadata[metadata_key]."""


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    granularity: RouteGranularity = RouteGranularity.prompt
    rules: list[RouteRule] = field(default_factory=list)
    """Checked in order; the first match wins. A teacher's `domains` adds implicit rules after these."""
    default: str | None = None
    """Teacher for prompts no rule matches; null makes an unmatched prompt an error."""
    token_rule: TokenRule = TokenRule.confidence
    mixture: dict[str, float] = field(default_factory=dict)
    """token_rule=mixture: weight per teacher name."""


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Sampling parameters, sent explicitly to every engine."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 disables top-k sampling."""
    max_new_tokens: int = 64
    seed: int | None = None
    """Per-request sampling seed; null for unseeded."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra stop ids besides the tokenizer's EOS."""
    n: int = 1
    """Samples per prompt."""

    def problems(self) -> list[Problem]:
        out = at_least(self, 0.0, "temperature")
        out += positive(self, "max_new_tokens", "n")
        if not 0.0 < self.top_p <= 1.0:
            out.append(Problem("top_p", self.top_p, "must be in (0, 1]"))
        return out


@dataclass(frozen=True, kw_only=True)
class SGLangConfig:
    """How to reach (or launch) SGLang servers, and the keys they require."""

    endpoints: list[str] = field(default_factory=list)
    """Where generation and scoring go: the servers themselves, or one sglang_router in front of them.
    Empty with launch=true (mopd starts the servers)."""
    worker_urls: list[str] = field(default_factory=list)
    """The servers behind a router in endpoints: weight updates and pause/continue go to each of them
    directly (the router has no weight-update routes). Empty: the endpoints are the servers."""
    launch: bool = False
    """Start sglang.launch_server processes on this node, beside the trainer's GPUs (and sglang_router
    when more than one)."""
    model_path: str | None = None
    """The HF folder the servers load at start (launch=true) and the config files disk sync copies."""
    python: str | None = None
    """launch=true: the interpreter of SGLang's own environment (a venv or container with its full
    dependencies, never the trainer's); null reads $SGLANG_PYTHON. It must import sglang.launch_server."""
    host: str = "127.0.0.1"
    """launch=true: the address the servers and the router bind (and clients use)."""
    tp: int = 1
    num_servers: int = 1
    port: int = 30000
    mem_fraction_static: float = 0.8
    request_timeout_s: float = 3600.0
    """Bound on one HTTP call; a 70B step's longest rollout (12k new tokens behind a queue) fits in an
    hour. A call that times out is never retried."""
    max_in_flight: int = 64
    """Bounded concurrency of requests per engine (each request is one sequence)."""
    retries: int = 3
    """Retries (with exponential back-off) of idempotent calls (scoring, health, control) after a
    dropped connection or a 5xx; never after a timeout or a 4xx, never for generation."""
    weight_sync: str = "distributed"
    """distributed (NCCL group) or disk."""
    weight_sync_address: str = ""
    """weight_sync=distributed: the address the servers reach this trainer at for the group's
    rendezvous ("" = this host's name)."""
    api_key_env: str | None = "MOPD_SGLANG_API_KEY"
    """Environment variable holding the key every server and the router require on /generate and
    /model_info (SGLang's --api-key). launch=true without it set: a fresh key per job. Null: no key."""
    admin_api_key_env: str | None = "MOPD_SGLANG_ADMIN_API_KEY"
    """Environment variable holding the key of the weight-update and pause/flush endpoints (SGLang's
    --admin-api-key); launch=true without it set: a fresh key per job. Null: no admin key."""

    def problems(self) -> list[Problem]:
        out = positive(self, "tp", "num_servers", "port", "request_timeout_s", "max_in_flight")
        out += at_least(self, 0, "retries")
        if self.weight_sync not in ("distributed", "disk"):
            out.append(Problem("weight_sync", self.weight_sync, "must be one of ['disk', 'distributed']"))
        if self.launch and (self.endpoints or self.worker_urls):
            out.append(Problem("endpoints", self.endpoints + self.worker_urls,
                               "must be empty with launch=true (mopd starts the servers and knows their URLs)"))
        if self.worker_urls and not self.endpoints:
            out.append(Problem("worker_urls", self.worker_urls, "needs endpoints (the router in front of them)"))
        if self.api_key_env and self.api_key_env == self.admin_api_key_env:
            out.append(Problem("admin_api_key_env", self.admin_api_key_env,
                               "must differ from api_key_env (the admin key guards the weights)"))
        return out


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    engine: EngineKind = EngineKind.embedded
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    max_staleness: int = 0
    """1: generate step n+1 while step n trains (rollouts exactly one weight version behind); 0 is
    synchronous. The loop looks one step ahead, so nothing larger is accepted."""

    def problems(self) -> list[Problem]:
        if self.max_staleness not in (0, 1):
            return [Problem("max_staleness", self.max_staleness,
                            "must be 0 (synchronous) or 1 (generation overlaps one train step)")]
        return []


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """What the opd stage optimises."""

    objectives: list[ObjectiveConfig] = field(default_factory=lambda: [ObjectiveConfig()])
    """Default loss terms for every teacher without its own."""
    teachers: list[TeacherConfig] = field(default_factory=list)
    router: RouterConfig = field(default_factory=RouterConfig)

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        names = [t.name for t in self.teachers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            out.append(Problem("teachers", dupes, "teacher names must be unique"))
        known = set(names)
        for i, rule in enumerate(self.router.rules):
            if rule.teacher not in known:
                out.append(Problem(f"router.rules[{i}].teacher", rule.teacher, f"must be one of {sorted(known)}"))
        if self.router.default is not None and self.router.default not in known:
            out.append(Problem("router.default", self.router.default, f"must be one of {sorted(known)}"))
        for name in self.router.mixture:
            if name not in known:
                out.append(Problem("router.mixture", name, f"must name teachers in {sorted(known)}"))
        out += self._needs_teacher_logits()
        return out

    def _needs_teacher_logits(self) -> list[Problem]:
        """reverse_kl_student_topk reads the teacher's full logits (TrainBatch.teacher_logits), which only
        a teacher running inside the trainer has; every teacher mopd run builds is an engine that
        returns its top-K, so the objective is refused here rather than at the first step."""
        lists = [("objectives", self.objectives)]
        lists += [(f"teachers[{t.name}].objectives", t.objectives or []) for t in self.teachers]
        return [Problem(f"{key}[{i}].name", o.name.value,
                        "needs an in-trainer teacher's full logits, and mopd run's teachers are engines that "
                        "return their top-K; use forward_kl_topk, jsd or reverse_kl_sampled")
                for key, objectives in lists for i, o in enumerate(objectives)
                if o.name == ObjectiveName.reverse_kl_student_topk]
