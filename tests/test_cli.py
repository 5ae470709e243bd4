"""The `mopd` command line: `plan` prints a layout or the reason it is invalid (exit 1)."""

import subprocess
import sys
from pathlib import Path

from mopd.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "llama3_70b_mopd.yaml"


def test_plan_prints_the_layout_and_ranks_per_stage(capsys):
    assert main(["plan", str(RECIPE), "--world-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "TP=8 x PP=4 x DP=2" in out
    assert "pipeline stage 0: ranks (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)" in out
    assert "pipeline stage 3: ranks (48," in out
    assert "padded vocabulary: 128256" in out  # already a multiple of lcm(128, 8)
    assert "micro-batches per step per DP rank: 256" in out  # 512 / (1 x 2)


def test_plan_for_a_world_size_the_layout_does_not_divide_exits_1_with_the_reason(capsys):
    assert main(["plan", str(RECIPE), "--world-size", "48"]) == 1
    err = capsys.readouterr().err
    assert "student.parallel.tensor_parallel=8" in err and "48" in err


def test_plan_reports_a_batch_that_does_not_split_over_data_parallel_ranks(capsys):
    assert main(["plan", str(RECIPE), "--world-size", "96", "student.train.global_batch_size=100"]) == 1
    assert "student.train.global_batch_size=100" in capsys.readouterr().err


def test_plan_applies_overrides_and_reports_bad_keys(capsys):
    assert main(["plan", str(RECIPE), "--world-size", "32", "student.parallel.pipeline_parallel=2",
                 "student.parallel.tensor_parallel=4"]) == 0
    assert "TP=4 x PP=2 x DP=4" in capsys.readouterr().out
    assert main(["plan", str(RECIPE), "--world-size", "32", "student.paralel.tensor_parallel=4"]) == 1
    assert "student.paralel" in capsys.readouterr().err


def test_the_console_entry_point_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "mopd.cli", "plan", str(RECIPE), "--world-size", "8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "does not divide the world size 8" in proc.stderr
