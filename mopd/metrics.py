"""One way to log: `Metrics.log(step, values)` fans out to the console, a JSONL file and wandb.

Keys are namespaced `train/`, `teacher/<name>/`, `timing/`, `eval/<domain>/`, `rollout/`. Only the
rank that owns logging (global rank 0 by convention) creates sinks; every other rank gets a Metrics
with no sinks, so call sites never test the rank.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from mopd.config import LoggingConfig, WandbMode


class Sink(Protocol):
    def write(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON object per logged step; the run summary and plots read it back."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", buffering=1)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **{k: _finite_or_none(v) for k, v in values.items()}}) + "\n")

    def close(self) -> None:
        self._file.close()


class ConsoleSink:
    """A compact line per logged step with the headline numbers; the full set goes to the JSONL file."""

    def __init__(self, keys: tuple[str, ...] = ("train/loss", "train/grad_norm", "train/tokens_per_s", "train/lr")):
        self._keys = keys

    def write(self, step: int, values: Mapping[str, float]) -> None:
        shown = [f"{k.split('/')[-1]}={values[k]:.4g}" for k in self._keys if k in values]
        shown += [f"{k}={v:.3g}" for k, v in values.items() if k.startswith("timing/")]
        print(f"[step {step}] " + " ".join(shown), flush=True)

    def close(self) -> None:
        pass


class WandbSink:
    """wandb, offline by default (no network); `logging.wandb_mode=online` syncs live."""

    def __init__(self, config: LoggingConfig, run_name: str, run_dir: Path, run_config: dict[str, Any]):
        import wandb

        self._run = wandb.init(
            project=config.wandb_project, name=run_name, dir=str(run_dir), mode=config.wandb_mode.value,
            config=run_config, reinit="create_new", settings=wandb.Settings(silent=True, console="off"),
        )

    def write(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(dict(values), step=step)

    def close(self) -> None:
        self._run.finish()


class Metrics:
    def __init__(self, sinks: list[Sink] | None = None):
        self._sinks = sinks or []
        self.timings: dict[str, float] = {}
        self.warnings: list[str] = []

    @classmethod
    def for_run(cls, config: LoggingConfig, run_name: str, run_dir: Path, *, is_logger: bool,
                run_config: dict[str, Any] | None = None) -> Metrics:
        if not is_logger:
            return cls([])
        sinks: list[Sink] = [ConsoleSink(), JsonlSink(run_dir / "metrics.jsonl")]
        if config.wandb_mode != WandbMode.disabled:
            sinks.append(WandbSink(config, run_name, run_dir, run_config or {}))
        return cls(sinks)

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Time a phase; the seconds appear as `timing/<name>` in the next log call."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def warn(self, message: str) -> None:
        """A diagnostic alarm: printed now, kept for the run summary."""
        self.warnings.append(message)
        if self._sinks:
            print(f"WARNING {message}", flush=True)

    def pop_timings(self) -> dict[str, float]:
        """The spans timed since the last call, as `timing/<name>` seconds."""
        out, self.timings = {f"timing/{k}": v for k, v in self.timings.items()}, {}
        return out

    def log(self, step: int, values: Mapping[str, float]) -> None:
        merged = {**values, **self.pop_timings()}
        for sink in self._sinks:
            sink.write(step, merged)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()


def read_jsonl(path: Path) -> list[dict[str, float]]:
    """The rows a JsonlSink wrote (None for non-finite values)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
