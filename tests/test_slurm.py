"""slurm/mopd_70b.sh places processes correctly: run under fake `scontrol`/`srun` that record what they
are asked to start (the real `mopd plan` checks the layout first)."""

import os
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "mopd_70b.sh"


def fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_script(tmp_path: Path, nodes: int, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    bin_dir.mkdir()
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    log = tmp_path / "calls.log"
    fake(bin_dir, "scontrol", f'for i in $(seq 0 {nodes - 1}); do echo "n$i"; done\n')
    # Each srun call is one line; the trainer's also records the teacher URLs it was given. Like a real
    # training step, the trainer's call outlives the background servers' start (7 = 6 servers + router).
    fake(bin_dir, "srun", f"""if [[ "$*" == *torchrun* ]]; then
  for _ in $(seq 200); do [ "$(grep -c launch_ {log} 2>/dev/null)" -ge 7 ] && break; sleep 0.05; done
fi
echo "srun $* | $(env | grep ^MOPD_TEACHER_URL_ | sort | tr "\\n" " ")" >> {log}
""")
    fake(bin_dir, "mopd", f'exec {sys.executable} -m mopd.cli "$@"\n')
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          start_new_session=True,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(venv),
                               "SLURM_JOB_NODELIST": "n[0-99]", "SLURM_JOB_ID": "42",
                               "CONFIG": str(REPO / "configs" / "recipes" / "llama3_70b_mopd.yaml"), **env})
    return proc, (log.read_text().splitlines() if log.exists() else [])


def test_nodes_split_into_trainers_rollout_servers_and_one_server_group_per_teacher(tmp_path):
    proc, calls = run_script(tmp_path, nodes=14)
    assert proc.returncode == 0, proc.stderr
    assert "TP=8 x PP=4 x DP=2" in proc.stdout  # mopd plan for 8 trainer nodes x 8 GPUs
    # Servers start in the background, so their calls arrive in any order: key them by node.
    servers = {c.split("-w ")[1].split()[0]: c for c in calls if "sglang.launch_server" in c}
    assert sorted(servers) == ["n10", "n11", "n12", "n13", "n8", "n9"]
    assert all("--model-path /ckpt/llama3-70b-sft-hf --tp-size 8" in servers[n] for n in ("n8", "n9", "n10"))
    assert "--model-path /ckpt/experts/math-70b-hf" in servers["n11"]
    assert "--model-path /ckpt/experts/chat-70b-hf" in servers["n13"]
    router = next(c for c in calls if "sglang_router.launch_router" in c)
    assert "-w n8" in router and "--worker-urls http://n8:30000 http://n9:30000 http://n10:30000" in router
    trainer = next(c for c in calls if "torchrun" in c)
    assert "-w n0,n1,n2,n3,n4,n5,n6,n7" in trainer and "--nnodes=8" in trainer and "--nproc-per-node=8" in trainer
    assert "rollout.sglang.endpoints=[http://n8:30100]" in trainer and trainer.split(" | ")[0].endswith("--resume")
    assert ("MOPD_TEACHER_URL_CHAT=http://n13:30000 MOPD_TEACHER_URL_CODE=http://n12:30000 "
            "MOPD_TEACHER_URL_MATH=http://n11:30000") in trainer


def test_too_few_nodes_is_refused_before_anything_starts(tmp_path):
    proc, calls = run_script(tmp_path, nodes=10)
    assert proc.returncode == 1 and "need 14 nodes (8 train + 3 rollout + 3 teacher), got 10" in proc.stderr
    assert calls == []


def test_a_layout_that_does_not_fit_the_trainer_nodes_is_refused_by_mopd_plan(tmp_path):
    proc, calls = run_script(tmp_path, nodes=14, TRAIN_NODES="3", ROLLOUT_NODES="3")
    assert proc.returncode == 1 and "does not divide the world size 24" in proc.stderr
    assert calls == []
