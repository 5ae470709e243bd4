"""`mopd run | plan | eval | convert`: one entry point, one subcommand per job.

Every subcommand takes a config path plus `a.b.c=value` overrides (precedence: dataclass defaults <
YAML < overrides). Errors the user can fix print one clear message and exit with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from mopd.errors import MopdError
from mopd.library_noise import quiet_library_warnings


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. student.train.steps=5")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mopd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the stages a config lists (sft, opd, eval, export)")
    _add_config_args(run)
    run.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")

    plan = sub.add_parser("plan", help="check a parallel layout for a world size and print it")
    _add_config_args(plan)
    plan.add_argument("--world-size", type=int, required=True, help="total trainer ranks (GPUs)")

    evaluate = sub.add_parser("eval", help="evaluate an HF folder on the config's eval prompts, per domain")
    _add_config_args(evaluate)
    evaluate.add_argument("--hf-dir", required=True, help="HF model folder (a stage's hf/ or an export)")

    convert = sub.add_parser("convert", help="HF <-> Megatron checkpoints (same as tools/convert_hf.py)")
    convert.add_argument("args", nargs=argparse.REMAINDER, help="arguments of tools/convert_hf.py")
    return parser


def _plan(args: argparse.Namespace) -> int:
    from mopd.config import load_config
    from mopd.plan import make_plan

    config = load_config(args.config, args.overrides)
    print(make_plan(config, args.world_size).describe())
    return 0


def _run(args: argparse.Namespace) -> int:
    from mopd.config import load_config
    from mopd.pipeline import run_pipeline

    run_pipeline(load_config(args.config, args.overrides), resume=args.resume)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mopd.config import load_config
    from mopd.pipeline import evaluate_checkpoint

    evaluate_checkpoint(load_config(args.config, args.overrides), args.hf_dir)
    return 0


def _convert(args: argparse.Namespace) -> int:
    try:
        from mopd.hf.cli import main as convert_main
    except ImportError:
        print("mopd convert: the HF converter (mopd/hf) is not built yet; see issue 4", file=sys.stderr)
        return 2
    return convert_main(args.args)


def main(argv: list[str] | None = None) -> int:
    from mopd.parallel.layout import hide_cuda_if_forced

    hide_cuda_if_forced(os.environ)  # MOPD_FORCE_CPU=1: before any library initialises CUDA
    quiet_library_warnings()
    parser = _parser()
    # Overrides may come before or after options (`plan X --world-size 8 a.b=c`).
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    handler = {"run": _run, "plan": _plan, "eval": _eval, "convert": _convert}[args.command]
    try:
        return handler(args)
    except MopdError as exc:
        print(f"mopd {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
