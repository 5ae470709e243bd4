"""Specialise-then-unify: run the stages a config lists, each from the previous ones' outputs.

Stages (`mopd/stages/`): `sft` (cross-entropy; experts, the base, the SFT baseline), `opd` (on-policy
distillation from routed teachers), `average` (weight averaging baseline), `eval`, `export`. A stage
named N writes `runs/<run>/stages/N/` and, last, its `output.json`; `init_from: N` and a teacher's
`checkpoint: N` refer to it. `mopd run CONFIG --resume` skips finished stages and continues the
interrupted one from its latest checkpoint.

Launch: one process (`mopd run`, world size 1) or `torchrun --nproc-per-node W -m mopd.cli run` for
TP/PP/DP students; every rank runs this same function.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from mopd.config import RunConfig, StageKind, to_yaml, with_overrides
from mopd.errors import ConfigError
from mopd.library_noise import drop_megatron_log_noise
from mopd.parallel import destroy_parallel, init_parallel, seed_rngs
from mopd.stages.context import RunContext, StageOutput, barrier
from mopd.stages.average import run_average
from mopd.stages.evaluate import run_eval
from mopd.stages.export import run_export
from mopd.stages.opd import run_opd
from mopd.stages.sft import run_sft
from mopd.stages.training import check_init_sources
from mopd.summary import build_summary, write_summary

STAGES = {
    StageKind.sft: run_sft,
    StageKind.opd: run_opd,
    StageKind.average: run_average,
    StageKind.eval: run_eval,
    StageKind.export: run_export,
}


def run_pipeline(config: RunConfig, *, resume: bool = False) -> Path:
    """Run every stage of ``config``; returns the run directory (with summary.json on rank 0)."""
    if not config.stages:
        raise ConfigError("stages: the config lists no stages to run")
    # Every stage's overrides are applied and validated now, not hours into the run.
    stage_configs = {stage.name: _stage_config(config, stage) for stage in config.stages}
    check_init_sources(config.stages, stage_configs)  # and every checkpoint a stage starts from
    ctx = _start(config, resume)
    try:
        tokenizers = stage_tokenizers(config, stage_configs, ctx.tokenizer)
        for stage in config.stages:
            ctx.tokenizer = tokenizers[stage.name]
            done = ctx.stage_dir(stage) / "output.json"
            if done.is_file():
                ctx.outputs[stage.name] = StageOutput.load(done)
                if ctx.is_logger:
                    print(f"[pipeline] {stage.name}: finished earlier, skipping", flush=True)
                continue
            if ctx.is_logger:
                print(f"[pipeline] stage {stage.name} ({stage.kind.value})", flush=True)
            seed_rngs(stage_configs[stage.name].seed, ctx.layout.pp_rank)
            output = STAGES[stage.kind](ctx, stage, stage_configs[stage.name])
            if ctx.is_logger:
                output.save(done)
            ctx.outputs[stage.name] = output
            barrier()
        if ctx.is_logger:
            summary = build_summary(config, ctx.outputs, warnings=_warnings(ctx))
            path = write_summary(ctx.run_dir, summary, ctx.outputs)
            print(f"[pipeline] summary: {path}", flush=True)
            for line in summary["verdicts"].get("plainly", []):
                print(f"  {line}", flush=True)
        return ctx.run_dir
    finally:
        destroy_parallel(process_group=True)


def _stage_config(config: RunConfig, stage) -> RunConfig:
    try:
        return with_overrides(config, stage.overrides)
    except ConfigError as exc:
        raise ConfigError(f"stage {stage.name!r} (overrides {stage.overrides}): {exc}") from None


def evaluate_checkpoint(config: RunConfig, hf_dir: str) -> dict:
    """`mopd eval`: per-domain accuracy of an HF folder on the config's eval prompts (rank 0 prints)."""
    from mopd.stages.evaluate import evaluate_hf_dir

    ctx = _start(config, resume=True, writes=False)
    try:
        result = evaluate_hf_dir(ctx, config, Path(hf_dir))
        if ctx.is_logger:
            import json

            print(json.dumps(result, indent=2))
        return result
    finally:
        destroy_parallel(process_group=True)


def _start(config: RunConfig, resume: bool, writes: bool = True) -> RunContext:
    _default_single_process_env()
    _quiet_libraries()
    layout = init_parallel(config.student.parallel, seed=config.seed)
    run_dir = Path(config.output_dir) / config.name
    if layout.rank == 0 and writes:
        stages_dir = run_dir / "stages"
        if stages_dir.is_dir() and any(stages_dir.iterdir()) and not resume:
            raise ConfigError(f"{run_dir} already holds stages of a run: pass --resume to continue it, or choose "
                              "another name (name=...) or output_dir; nothing was overwritten")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(config))
    barrier()
    return RunContext(config=config, layout=layout, run_dir=run_dir, tokenizer=load_tokenizer(config),
                      resume=resume)


def stage_tokenizers(config: RunConfig, stage_configs: dict[str, RunConfig], run_tokenizer) -> dict:
    """Each stage's student tokenizer: the run's, or the one its overrides of `data.tokenizer` /
    `student.model` name (e.g. experts in another tokenizer than the student they teach), all loaded
    and checked before the first stage runs."""
    loaded = {(config.data.tokenizer, config.student.model.vocab_size): run_tokenizer}
    out = {}
    for name, cfg in stage_configs.items():
        key = (cfg.data.tokenizer, cfg.student.model.vocab_size)
        if key not in loaded:
            try:
                loaded[key] = load_tokenizer(cfg)
            except ConfigError as exc:
                raise ConfigError(f"stage {name!r}: {exc}") from None
        out[name] = loaded[key]
    return out


def load_tokenizer(config: RunConfig):
    """`data.tokenizer`, checked against `student.model` before any step (mopd.data.tokenizer)."""
    from mopd.data.tokenizer import load_run_tokenizer

    return load_run_tokenizer(config.data.tokenizer, config.student.model)


def _quiet_libraries() -> None:
    """Our own progress bar and log lines are the run's console output."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    os.environ.setdefault("WANDB_SILENT", "true")
    drop_megatron_log_noise()


def _default_single_process_env() -> None:
    """`mopd run` without torchrun: a world of one process on a free local port."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _warnings(ctx: RunContext) -> list[str]:
    return [f"{name}: {w}" for name, o in ctx.outputs.items() for w in o.warnings]
