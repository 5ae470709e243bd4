"""slurm/mopd_70b.sh places processes correctly: run under fake `scontrol`/`srun`/`curl` that record
what they are asked to start (the real `mopd plan` checks the layout first, the real config supplies
the SGLang knobs). tests/test_cluster_box.py runs the same script for real on this machine."""

import os
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "mopd_70b.sh"


def fake(bin_dir: Path, name: str, body: str) -> Path:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def run_script(tmp_path: Path, nodes: int, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    bin_dir.mkdir()
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    log = tmp_path / "calls.log"
    fake(bin_dir, "scontrol", f'for i in $(seq 0 {nodes - 1}); do echo "n$i"; done\n')
    # Each srun call is one line (with the teacher URLs and CPU binding it was given); servers and the
    # router keep running until the script's exit trap stops them, as real background steps do.
    fake(bin_dir, "srun", f"""echo "srun $* | $(env | grep -E '^(MOPD_TEACHER_URL_|SRUN_CPUS)' | sort | tr "\\n" " ")" >> {log}
if [[ "$*" == *launch_server* || "$*" == *launch_router* ]]; then exec sleep 60; fi
""")
    fake(bin_dir, "curl", f'echo "curl ${{@: -1}}" >> {log}\n')
    fake(bin_dir, "python", f'exec {sys.executable} "$@"\n')
    fake(bin_dir, "mopd", f'exec {sys.executable} -m mopd.cli "$@"\n')
    sglang_python = fake(bin_dir, "sglang-python", "exit 0\n")  # an environment that imports SGLang's runtime
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          start_new_session=True,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(venv),
                               "SGLANG_PYTHON": str(sglang_python), "SLURM_JOB_NODELIST": "n[0-99]",
                               "SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "96",
                               "CONFIG": str(REPO / "configs" / "recipes" / "llama3_70b_mopd.yaml"), **env})
    return proc, (log.read_text().splitlines() if log.exists() else [])


def test_nodes_split_into_trainers_rollout_servers_behind_a_router_and_one_server_per_teacher(tmp_path):
    proc, calls = run_script(tmp_path, nodes=14)
    assert proc.returncode == 0, proc.stderr
    assert "TP=8 x PP=4 x DP=2" in proc.stdout  # mopd plan for 8 trainer nodes x 8 GPUs
    # Servers start in the background, so their calls arrive in any order: key them by node.
    servers = {c.split("-w ")[1].split()[0]: c for c in calls if "sglang.launch_server" in c}
    assert sorted(servers) == ["n10", "n11", "n12", "n13", "n8", "n9"]
    assert all(f"--model-path /ckpt/llama3-70b-sft-hf --tp-size 8 --host {n} --port 30000" in servers[n]
               for n in ("n8", "n9", "n10"))
    assert "--model-path /ckpt/experts/math-70b-hf" in servers["n11"]
    assert "--model-path /ckpt/experts/chat-70b-hf" in servers["n13"]
    assert all("--config logs/.sglang-keys-42.yaml" in c and "sglang-python -m" in c for c in servers.values())
    router = next(c for c in calls if "sglang_router.launch_router" in c)
    assert "-w n8" in router and "--host n8" in router and "--api-key " in router
    assert "--worker-urls http://n8:30000 http://n9:30000 http://n10:30000" in router
    trainer = next(c for c in calls if "torchrun" in c)
    assert "-w n0,n1,n2,n3,n4,n5,n6,n7" in trainer and "--nnodes=8" in trainer and "--nproc-per-node=8" in trainer
    assert "rollout.sglang.endpoints=[http://n8:30100]" in trainer  # generation through the router
    assert "rollout.sglang.worker_urls=[http://n8:30000,http://n9:30000,http://n10:30000]" in trainer  # weights direct
    assert trainer.split(" | ")[0].endswith("--resume")
    assert ("MOPD_TEACHER_URL_CHAT=http://n13:30000 MOPD_TEACHER_URL_CODE=http://n12:30000 "
            "MOPD_TEACHER_URL_MATH=http://n11:30000 SRUN_CPUS_PER_TASK=96") in trainer
    # Every server and the router answered /health before the trainer started.
    health = [c.split()[1] for c in calls[: calls.index(trainer)] if c.startswith("curl ")]
    assert sorted(health) == sorted([f"http://n{i}:30000/health" for i in range(8, 14)] + ["http://n8:30100/health"])
    # The key file is gone with the job, and the admin key reached no command line.
    assert not (tmp_path / "logs" / ".sglang-keys-42.yaml").exists()
    api_key = router.split("--api-key ")[1].split()[0]
    assert len(api_key) >= 32 and not any(api_key in c for c in calls if c is not router)


def test_the_trainers_venv_is_refused_as_the_sglang_environment(tmp_path):
    """launch/setup.sh installs the sglang wheel without its dependencies: its runtime cannot import."""
    proc, calls = run_script(tmp_path, nodes=14, SGLANG_PYTHON=sys.executable)
    assert proc.returncode == 1 and f"SGLANG_PYTHON={sys.executable} cannot import SGLang's runtime" in proc.stderr
    assert "ModuleNotFoundError" in proc.stderr and calls == []


def test_too_few_nodes_is_refused_before_anything_starts(tmp_path):
    proc, calls = run_script(tmp_path, nodes=10)
    assert proc.returncode == 1 and "need 14 nodes (8 train + 3 rollout + 3 teacher), got 10" in proc.stderr
    assert calls == []


def test_a_layout_that_does_not_fit_the_trainer_nodes_is_refused_by_mopd_plan(tmp_path):
    proc, calls = run_script(tmp_path, nodes=14, TRAIN_NODES="3")
    assert proc.returncode == 1 and "does not divide the world size 24" in proc.stderr
    assert calls == []
