"""The embedded-default demo (`configs/local/demo.yaml`, what `bash launch/demo.sh` runs), whole.

Takes about 6-7 minutes on 2 cores: the unified student must reach 90% of its expert on every domain,
and the summary must state plainly how it compares with both baselines.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_pipeline_e2e import env

DEMO = Path(__file__).resolve().parents[1] / "configs" / "local" / "demo.yaml"


@pytest.mark.slow
def test_demo_unifies_the_experts_and_reports_against_both_baselines(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mopd.cli", "run", str(DEMO), f"output_dir={tmp_path}",
                           "logging.progress_bar=false", "logging.wandb_mode=disabled"],
                          env=env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["domains"]) == {"reverse", "caesar"}
    for domain, row in summary["domains"].items():
        for role in ("base", "teacher", "student", "sft_baseline", "weight_average"):
            assert 0.0 <= row[role] <= 1.0, (domain, role)
        assert row["teacher"] >= 0.9, f"{domain}: the expert itself is weak ({row['teacher']})"
        assert row["student"] >= 0.9 * row["teacher"], f"{domain}: student {row['student']} < 90% of {row['teacher']}"
        assert row["vs_sft_baseline"] in ("beats", "ties with", "does not beat")
        assert row["vs_weight_average"] in ("beats", "ties with", "does not beat")
    assert summary["verdicts"]["student_reaches_90pct_of_teacher_on_every_domain"] is True
    assert all(stage["wall_s"] > 0 for stage in summary["stages"].values())
    assert (tmp_path / "demo" / "summary.png").is_file()
