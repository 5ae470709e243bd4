"""What every stage sees: the run's folders, the parallel layout, the tokenizer, and earlier stages' outputs.

A stage writes to ``runs/<run>/stages/<stage>/``: ``checkpoints/`` (Megatron dist_checkpointing,
resumable), ``hf/`` (the final weights as an HF folder for engines, teachers and eval) and
``output.json`` (its StageOutput), the last file written, so a stage with an ``output.json`` is
complete and a resumed pipeline skips it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mopd.config import RunConfig, StageConfig
from mopd.errors import CheckpointError
from mopd.parallel import ParallelLayout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageOutput:
    """What a finished stage leaves for later stages and the summary."""

    name: str
    kind: str
    role: str
    hf_dir: str | None
    """HF folder with the stage's final weights (None for eval-only stages)."""
    wall_s: float
    teacher_tokens: int = 0
    """Response tokens scored by teachers (opd) or trained on (sft): the baselines' budget."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Per-domain eval results (EvalResult.as_dict())."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per-step headline metrics for the summary plot (step, loss, kl, accuracy ...)."""
    warnings: list[str] = field(default_factory=list)
    """Diagnostic alarms raised during the stage."""

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.rename(path)

    @staticmethod
    def load(path: Path) -> StageOutput:
        return StageOutput(**json.loads(path.read_text()))


@dataclass
class RunContext:
    """Shared by the stages of one pipeline run (one process group, one layout)."""

    config: RunConfig
    layout: ParallelLayout
    run_dir: Path
    tokenizer: Any
    """The running stage's student tokenizer (transformers PreTrainedTokenizerBase): the run's
    `data.tokenizer`, or the one the stage's overrides name (pipeline.stage_tokenizers)."""
    outputs: dict[str, StageOutput] = field(default_factory=dict)
    resume: bool = False

    @property
    def is_logger(self) -> bool:
        return self.layout.rank == 0

    def stage_dir(self, stage: StageConfig) -> Path:
        return self.stage_dir_of(stage.name)

    def stage_dir_of(self, name: str) -> Path:
        return self.run_dir / "stages" / name

    def hf_dir_of(self, name_or_path: str) -> Path:
        """An earlier stage's HF folder, or a path to an HF folder."""
        if name_or_path in self.outputs:
            hf = self.outputs[name_or_path].hf_dir
            if hf is None:
                raise CheckpointError(f"stage {name_or_path!r} produced no weights to start from or serve")
            return Path(hf)
        path = Path(name_or_path)
        if not (path / "config.json").is_file():
            known = sorted(self.outputs)
            raise CheckpointError(f"{name_or_path!r} is neither a finished stage ({known}) nor an HF folder "
                                  f"(no config.json)")
        return path


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` from global rank ``src`` on every rank (pickled; for small control data and batches)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()

