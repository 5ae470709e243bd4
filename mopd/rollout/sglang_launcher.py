"""Start SGLang servers (and sglang_router in front of several), wait until they answer, tear them down.

Command lines follow SGLang 0.5.23 (``python -m sglang.launch_server``; flags from
``srt/arg_groups/fields``) and sglang-router 0.3.2 (``python -m sglang_router.launch_router``).
Every process runs in its own session (process group), so ``stop()`` ends the server's scheduler
and detokenizer children too; ``stop()`` is registered with ``atexit`` and is idempotent.

Ports: one server listens on ``config.port``; with ``num_servers > 1`` the router takes
``config.port`` and server ``i`` takes ``config.port + 1 + i`` on GPUs ``[i*tp, (i+1)*tp)``.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from mopd.config import SGLangConfig
from mopd.errors import ConfigError, EngineError

SERVER_ENV = {"SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}
"""Behaviour logprobs must be the raw (temperature-1) distribution the trainer compares against;
without this SGLang returns log_softmax(logits / T) for non-greedy batches."""

ROUTER_HEALTH_FAILURE_THRESHOLD = 30
"""/health blocks while generation is paused for a weight sync; a low threshold makes the router
evict a healthy worker during a long update."""


@dataclass(frozen=True)
class ProcessSpec:
    """One process to start: its argv, the environment it adds, and the URL it serves."""

    name: str
    argv: list[str]
    url: str
    env: dict[str, str] = field(default_factory=dict)
    is_router: bool = False


def server_specs(
    config: SGLangConfig,
    *,
    python: str = sys.executable,
    host: str = "127.0.0.1",
    prefix: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
) -> list[ProcessSpec]:
    """``python -m sglang.launch_server`` for each of ``config.num_servers`` servers."""
    if not config.model_path:
        raise ConfigError("rollout.sglang.model_path: required when rollout.sglang.launch=true")
    prefix = list(prefix) if prefix else [python, "-m", "sglang.launch_server"]
    specs = []
    for i in range(config.num_servers):
        port = config.port if config.num_servers == 1 else config.port + 1 + i
        argv = prefix + [
            "--model-path", config.model_path,
            "--tp-size", str(config.tp),
            "--base-gpu-id", str(i * config.tp),
            "--host", host,
            "--port", str(port),
            "--mem-fraction-static", str(config.mem_fraction_static),
            "--weight-version", "0",
            *extra_args,
        ]
        specs.append(ProcessSpec(f"sglang-server-{i}", argv, f"http://{_advertised(host)}:{port}", dict(SERVER_ENV)))
    return specs


def router_spec(
    config: SGLangConfig,
    worker_urls: Sequence[str],
    *,
    python: str = sys.executable,
    host: str = "127.0.0.1",
    prefix: Sequence[str] | None = None,
    policy: str = "cache_aware",
) -> ProcessSpec:
    """``python -m sglang_router.launch_router`` in front of ``worker_urls`` on ``config.port``."""
    prefix = list(prefix) if prefix else [python, "-m", "sglang_router.launch_router"]
    argv = prefix + [
        "--worker-urls", *worker_urls,
        "--host", host,
        "--port", str(config.port),
        "--policy", policy,
        "--health-failure-threshold", str(ROUTER_HEALTH_FAILURE_THRESHOLD),
    ]
    return ProcessSpec("sglang-router", argv, f"http://{_advertised(host)}:{config.port}", is_router=True)


class SGLangLauncher:
    """Owns the server (and router) processes of one SGLangConfig; use as a context manager."""

    def __init__(
        self,
        config: SGLangConfig,
        *,
        host: str = "127.0.0.1",
        python: str = sys.executable,
        server_prefix: Sequence[str] | None = None,
        router_prefix: Sequence[str] | None = None,
        extra_server_args: Sequence[str] = (),
        log_dir: str | os.PathLike | None = None,
        ready_timeout_s: float = 900.0,
        poll_s: float = 1.0,
        stop_grace_s: float = 15.0,
    ) -> None:
        self.specs = server_specs(config, python=python, host=host, prefix=server_prefix, extra_args=extra_server_args)
        if config.num_servers > 1:
            self.specs.append(router_spec(config, [s.url for s in self.specs], python=python, host=host, prefix=router_prefix))
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="mopd-sglang-"))
        self.ready_timeout_s, self.poll_s, self.stop_grace_s = ready_timeout_s, poll_s, stop_grace_s
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        atexit.register(self.stop)

    @property
    def endpoint(self) -> str:
        """Where generation and scoring go: the router, or the only server."""
        return self.specs[-1].url

    @property
    def worker_urls(self) -> list[str]:
        """Where weight updates go: every server, never the router."""
        return [s.url for s in self.specs if not s.is_router]

    def start(self) -> SGLangLauncher:
        """Launch everything and wait until each process answers /health; on failure stop all and raise."""
        try:
            self.launch()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> None:
        """Start the processes (servers first, then the router) without waiting."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for spec in self.specs:
            log = open(self.log_dir / f"{spec.name}.log", "wb")  # noqa: SIM115 - closed in stop()
            self._logs.append(log)
            self.procs[spec.name] = subprocess.Popen(
                spec.argv, env={**os.environ, **spec.env}, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def wait_ready(self) -> None:
        """Poll /health of every process until 200; a process that exits first is an error with its log tail."""
        deadline = time.monotonic() + self.ready_timeout_s
        pending = list(self.specs)
        with httpx.Client(trust_env=False) as http:
            while pending:
                for spec in list(pending):
                    code = self.procs[spec.name].poll()
                    if code is not None:
                        raise EngineError(f"{spec.name} ({spec.url}) exited with code {code} before it was ready; "
                                          f"last lines of {self.log_dir / spec.name}.log:\n{self.log_tail(spec.name)}")
                    if _healthy(http, spec.url, self.poll_s):
                        pending.remove(spec)
                if pending and time.monotonic() > deadline:
                    names = ", ".join(f"{s.name} ({s.url})" for s in pending)
                    raise EngineError(f"{names} not ready within {self.ready_timeout_s:g} s; logs in {self.log_dir}")
                if pending:
                    time.sleep(self.poll_s)

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM each process group (router first), SIGKILL what is left after the grace period."""
        for name in reversed(list(self.procs)):
            _signal_group(self.procs[name], signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # Children (scheduler, detokenizer) share the group and may outlive the leader.
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        self.procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> SGLangLauncher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def sglang_engine(config: SGLangConfig, *, name: str = "sglang", sync=None, **launcher_kwargs):
    """An SGLangEngine for ``config``: on its ``endpoints``, or, with ``launch: true``, on servers
    started here (their ``stop`` runs when the engine is closed)."""
    from mopd.rollout.sglang_client import SGLangEngine

    if not config.launch:
        return SGLangEngine(config, name=name, sync=sync)
    launcher = SGLangLauncher(config, **launcher_kwargs).start()
    try:
        engine = SGLangEngine(config, name=name, endpoints=[launcher.endpoint], worker_urls=launcher.worker_urls, sync=sync)
    except BaseException:
        launcher.stop()
        raise
    engine.on_close.append(launcher.stop)
    return engine


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session made the pid the group id
    except (ProcessLookupError, PermissionError):
        pass


def _healthy(http: httpx.Client, url: str, timeout: float) -> bool:
    try:
        return http.get(f"{url}/health", timeout=max(timeout, 1.0)).status_code == 200
    except httpx.HTTPError:
        return False


def _advertised(host: str) -> str:
    """The address clients use: the bind address, or this host's name when bound to all interfaces."""
    return socket.gethostname() if host in ("0.0.0.0", "::") else host
