"""SGLangLauncher: exact SGLang command lines, and start / readiness / teardown against a fake launch_server.

The fake is the protocol server run as a script (it takes launch_server's flags), so the real
process handling is exercised; only the program behind the command prefix differs.
"""

from __future__ import annotations

import os
import sys
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
from mopd.rollout.sglang_launcher import SGLangLauncher, router_spec, server_specs, sglang_engine
from sglang_protocol_server import load_api_types, tiny_llama

FAKE_SERVER = [sys.executable, str(Path(__file__).with_name("sglang_protocol_server.py"))]


def test_server_and_router_command_lines_are_exactly_sglangs():
    cfg = SGLangConfig(model_path="/ckpt/qwen3-8b", tp=2, num_servers=2, port=31000, mem_fraction_static=0.7)
    servers = server_specs(cfg, python="python3", host="10.0.0.5")
    assert [s.argv for s in servers] == [
        ["python3", "-m", "sglang.launch_server", "--model-path", "/ckpt/qwen3-8b", "--tp-size", "2",
         "--base-gpu-id", str(2 * i), "--host", "10.0.0.5", "--port", str(31001 + i),
         "--mem-fraction-static", "0.7", "--weight-version", "0"]
        for i in range(2)
    ]
    assert all(s.env == {"SGLANG_RETURN_ORIGINAL_LOGPROB": "1"} for s in servers)
    router = router_spec(cfg, [s.url for s in servers], python="python3", host="10.0.0.5")
    assert router.argv == [
        "python3", "-m", "sglang_router.launch_router", "--worker-urls", "http://10.0.0.5:31001", "http://10.0.0.5:31002",
        "--host", "10.0.0.5", "--port", "31000", "--policy", "cache_aware", "--health-failure-threshold", "30",
    ]
    launcher = SGLangLauncher(cfg, host="10.0.0.5")
    assert launcher.endpoint == "http://10.0.0.5:31000"
    assert launcher.worker_urls == ["http://10.0.0.5:31001", "http://10.0.0.5:31002"]
    one = SGLangLauncher(SGLangConfig(model_path="/m", port=30000))
    assert one.endpoint == "http://127.0.0.1:30000" and one.worker_urls == [one.endpoint]


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
                           ready_timeout_s=120, poll_s=0.5)
    launcher = client.on_close[0].__self__
    try:
        pid = launcher.procs["sglang-server-0"].pid
        info = httpx.get(f"{launcher.endpoint}/server_info", timeout=10, trust_env=False).json()
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
                              log_dir=tmp_path, ready_timeout_s=30, poll_s=0.2)
    with pytest.raises(EngineError, match=r"sglang-server-0 \(http://127.0.0.1:\d+\) exited with code 1 before it was ready"):
        launcher.start()
    assert "model dir missing" in launcher.log_tail("sglang-server-0")


@pytest.mark.timeout(60)
def test_a_server_that_never_gets_ready_times_out_and_its_whole_process_group_is_killed(tmp_path):
    spawn_child = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    cfg = SGLangConfig(model_path="/m", port=_free_port())
    launcher = SGLangLauncher(cfg, server_prefix=[sys.executable, "-c", spawn_child], log_dir=tmp_path,
                              ready_timeout_s=1.5, poll_s=0.2, stop_grace_s=2)
    launcher.launch()
    leader = psutil.Process(launcher.procs["sglang-server-0"].pid)
    children = []
    for _ in range(50):
        children = leader.children(recursive=True)
        if children:
            break
        psutil.wait_procs([], timeout=0.1)
    assert children, "the fake server should have started a child"
    with pytest.raises(EngineError, match=r"not ready within 1.5 s"):
        try:
            launcher.wait_ready()
        finally:
            launcher.stop()
    gone, alive = psutil.wait_procs([leader, *children], timeout=5)
    assert alive == []
