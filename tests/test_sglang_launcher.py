"""SGLangLauncher: exact SGLang command lines, and start / readiness / teardown against a fake launch_server.

The fake is the protocol server run as a script (it takes launch_server's flags), so the real
process handling is exercised; only the program behind the command prefix differs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx
import psutil
import pytest
import torch

from mopd.config import SGLangConfig
from mopd.errors import ConfigError, EngineError
from mopd.rollout.embedded import EmbeddedEngine
from mopd.rollout.engine import ScoreRequest
from mopd.rollout.sglang_launcher import (
    SGLangLauncher,
    router_spec,
    server_gpu_bases,
    server_specs,
    sglang_engine,
    sglang_python,
)
from sglang_protocol_server import tiny_llama
from sglang_wheel import load_api_types

FAKE_SERVER = [sys.executable, str(Path(__file__).with_name("sglang_protocol_server.py"))]


def test_server_and_router_command_lines_are_exactly_sglangs():
    cfg = SGLangConfig(model_path="/ckpt/qwen3-8b", tp=2, num_servers=2, port=31000, mem_fraction_static=0.7,
                       host="10.0.0.5")
    servers = server_specs(cfg, python="python3", base_gpu_ids=[4, 6], key_file="/private/keys.yaml")
    assert [s.argv for s in servers] == [
        ["python3", "-m", "sglang.launch_server", "--config", "/private/keys.yaml", "--model-path", "/ckpt/qwen3-8b",
         "--tp-size", "2", "--base-gpu-id", str(4 + 2 * i), "--host", "10.0.0.5", "--port", str(31001 + i),
         "--mem-fraction-static", "0.7", "--weight-version", "0"]
        for i in range(2)
    ]
    assert all(s.env == {"SGLANG_RETURN_ORIGINAL_LOGPROB": "1"} for s in servers)
    router = router_spec(cfg, [s.url for s in servers], python="python3", api_key="k")
    assert router.argv == [
        "python3", "-m", "sglang_router.launch_router", "--worker-urls", "http://10.0.0.5:31001", "http://10.0.0.5:31002",
        "--host", "10.0.0.5", "--port", "31000", "--policy", "cache_aware", "--health-failure-threshold", "30",
        "--api-key", "k",
    ]
    launcher = SGLangLauncher(cfg, python="python3", trainer_gpus=4, node_gpus=8)
    assert launcher.endpoint == "http://10.0.0.5:31000"
    assert launcher.worker_urls == ["http://10.0.0.5:31001", "http://10.0.0.5:31002"]
    assert [s.argv[s.argv.index("--base-gpu-id") + 1] for s in launcher.specs[:2]] == ["4", "6"]
    one = SGLangLauncher(SGLangConfig(model_path="/m", port=30000), python="python3", trainer_gpus=1, node_gpus=2)
    assert one.endpoint == "http://127.0.0.1:30000" and one.worker_urls == [one.endpoint]  # local: loopback


@pytest.mark.parametrize("servers,tp,trainer,node,bases", [
    (2, 1, 4, 8, [4, 5]),      # the 8B recipe: TP2 x DP2 trainer on GPUs 0-3, two servers on 4 and 5
    (1, 4, 4, 8, [4]),
    (3, 2, 0, 6, [0, 2, 4]),   # a CPU trainer holds no GPU
])
def test_launched_servers_take_the_gpus_after_the_trainers_never_its_own(servers, tp, trainer, node, bases):
    got = server_gpu_bases(servers, tp, trainer_gpus=trainer, node_gpus=node)
    assert got == bases
    used = {b + k for b in got for k in range(tp)}
    assert used.isdisjoint(range(trainer)) and max(used) < node and len(used) == servers * tp


@pytest.mark.parametrize("servers,tp,trainer,node", [(4, 8, 8, 8), (2, 1, 8, 8), (1, 2, 7, 8)])
def test_a_layout_whose_servers_would_share_the_trainers_gpus_is_refused(servers, tp, trainer, node):
    with pytest.raises(ConfigError, match=rf"rollout.sglang.launch: {servers} server\(s\) x tp {tp} .* beside the "
                                          rf"trainer's {trainer} on this node of {node} GPU"):
        server_gpu_bases(servers, tp, trainer_gpus=trainer, node_gpus=node)


def test_the_trainers_venv_is_refused_as_sglangs_environment(monkeypatch):
    """launch/setup.sh installs the sglang wheel without its dependencies: its runtime cannot import."""
    monkeypatch.delenv("SGLANG_PYTHON", raising=False)
    with pytest.raises(ConfigError, match=r"rollout.sglang.python: launch=true needs SGLang's own interpreter"):
        sglang_python(SGLangConfig(launch=True, model_path="/m"))
    monkeypatch.setenv("SGLANG_PYTHON", "/opt/sglang/bin/python")
    assert sglang_python(SGLangConfig(launch=True, model_path="/m")) == "/opt/sglang/bin/python"
    launcher = SGLangLauncher(SGLangConfig(model_path="/m"), python=sys.executable, trainer_gpus=0, node_gpus=1)
    with pytest.raises(ConfigError, match=r"rollout.sglang.python: .* cannot import SGLang's runtime \(import "
                                          r"sglang.launch_server: ModuleNotFoundError"):
        launcher.start()
    assert launcher.procs == {}  # refused before anything started


def test_a_missing_model_path_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="rollout.sglang.model_path"):
        server_specs(SGLangConfig())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(load_api_types() is None, reason="sglang/api/v1/api_types.py not installed")
@pytest.mark.timeout(180)
def test_a_launched_server_becomes_ready_serves_scores_and_leaves_no_process_behind(tmp_path):
    model = tiny_llama(seed=3)
    model.save_pretrained(tmp_path / "model")
    cfg = SGLangConfig(model_path=str(tmp_path / "model"), port=_free_port(), launch=True)
    client = sglang_engine(cfg, name="teacher", server_prefix=FAKE_SERVER, log_dir=tmp_path / "logs",
                           ready_timeout_s=120, poll_s=0.5, trainer_gpus=0, node_gpus=1)
    launcher = client.on_close[0].__self__
    try:
        pid = launcher.procs["sglang-server-0"].pid
        assert httpx.get(f"{launcher.endpoint}/server_info", timeout=10, trust_env=False).status_code == 401
        info = httpx.get(f"{launcher.endpoint}/server_info", timeout=10, trust_env=False,
                         headers=launcher.keys.header("/server_info")).json()  # keys generated for this launch
        assert info["SGLANG_RETURN_ORIGINAL_LOGPROB"] == "1"
        assert "--tp-size 1 --base-gpu-id 0" in info["launch_command"]
        req = ScoreRequest(ids=torch.arange(3, 15), response_start=5)
        got = client.score([req], top_k=6)[0]
        want = EmbeddedEngine(model, eos_token_ids=[1], pad_token_id=0).score([req], top_k=6)[0]
        assert torch.equal(got.topk_ids, want.topk_ids)
        assert torch.allclose(got.topk_logprobs, want.topk_logprobs, atol=1e-5)
        assert client.health().ok
    finally:
        client.close()  # stops the launched server too
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert launcher.procs == {}


@pytest.mark.timeout(60)
def test_a_server_that_dies_at_start_is_an_error_with_its_log(tmp_path):
    cfg = SGLangConfig(model_path=str(tmp_path / "missing"), port=_free_port())
    launcher = SGLangLauncher(cfg, server_prefix=[sys.executable, "-c", "import sys; sys.exit('model dir missing')"],
                              log_dir=tmp_path, ready_timeout_s=30, poll_s=0.2, trainer_gpus=0, node_gpus=1)
    with pytest.raises(EngineError, match=r"sglang-server-0 \(http://127.0.0.1:\d+\) exited with code 1 before it was ready"):
        launcher.start()
    assert "model dir missing" in launcher.log_tail("sglang-server-0")


@pytest.mark.timeout(60)
def test_a_server_that_never_gets_ready_times_out_and_its_whole_process_group_is_killed(tmp_path):
    spawn_child = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    cfg = SGLangConfig(model_path="/m", port=_free_port())
    launcher = SGLangLauncher(cfg, server_prefix=[sys.executable, "-c", spawn_child], log_dir=tmp_path,
                              ready_timeout_s=1.5, poll_s=0.2, stop_grace_s=2, trainer_gpus=0, node_gpus=1)
    launcher.launch()
    leader = psutil.Process(launcher.procs["sglang-server-0"].pid)
    children = []
    for _ in range(50):
        children = leader.children(recursive=True)
        if children:
            break
        time.sleep(0.1)
    assert children, "the fake server should have started a child"
    with pytest.raises(EngineError, match=r"not ready within 1.5 s"):
        try:
            launcher.wait_ready()
        finally:
            launcher.stop()
    gone, alive = psutil.wait_procs([leader, *children], timeout=5)
    assert alive == []


@pytest.mark.timeout(60)
def test_launched_servers_read_the_keys_from_a_private_file_and_logs_never_show_them(tmp_path):
    """The key file is 0600 and passed with --config (not the command line); what a server prints
    about its configuration reaches the log with every key redacted."""
    from mopd.rollout.sglang_client import ApiKeys

    keys = ApiKeys("secret-api-key-0123456789", "secret-admin-key-9876543210", "test")
    show_config = ("import os, stat, sys; p = sys.argv[sys.argv.index('--config') + 1]; "
                   "print(oct(stat.S_IMODE(os.stat(p).st_mode)), open(p).read(), ' '.join(sys.argv)); sys.exit(2)")
    cfg = SGLangConfig(model_path="/m", port=_free_port())
    launcher = SGLangLauncher(cfg, keys=keys, server_prefix=[sys.executable, "-c", show_config], log_dir=tmp_path,
                              ready_timeout_s=30, poll_s=0.2, trainer_gpus=0, node_gpus=1)
    assert all(k not in " ".join(launcher.specs[0].argv) for k in keys.secrets())
    with pytest.raises(EngineError, match="exited with code 2"):
        launcher.start()
    log = (tmp_path / "sglang-server-0.log").read_text()
    assert "0o600" in log and 'api_key: "<redacted>"' in log and 'admin_api_key: "<redacted>"' in log
    assert all(k not in log for k in keys.secrets())
    assert not launcher._private.exists()  # the key file is gone with the servers
