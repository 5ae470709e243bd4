"""Start SGLang servers (and sglang_router in front of several), wait until they answer, tear them down.

Command lines follow SGLang 0.5.23 (``python -m sglang.launch_server``; flags from
``srt/arg_groups/fields``) and sglang-router 0.3.2 (``python -m sglang_router.launch_router``).
Every process runs in its own session (process group), so ``stop()`` ends the server's scheduler
and detokenizer children too; ``stop()`` is registered with ``atexit`` and is idempotent.

* Placement (``server_gpu_bases``): the servers take the GPUs after the trainer's ranks on this
  node, never the trainer's own; a layout that does not fit is a ConfigError before anything starts.
* Environment: the servers run from SGLang's own interpreter (``rollout.sglang.python`` or
  ``$SGLANG_PYTHON``), checked to import ``sglang.launch_server`` first; the trainer's venv holds
  the sglang wheel without its dependencies and is refused.
* Keys: each server reads ``api_key`` / ``admin_api_key`` from a private 0600 YAML file
  (``--config``), so the keys are not in its command line; the router (0.3.2 has no other way) gets
  ``--api-key`` on its command line. Process output reaches the log files with the keys redacted
  (SGLang logs its resolved server args, keys included).

Ports: one server listens on ``config.port``; with ``num_servers > 1`` the router takes
``config.port`` and server ``i`` takes ``config.port + 1 + i``.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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

REDACTED = "<redacted>"


@dataclass(frozen=True)
class ProcessSpec:
    """One process to start: its argv, the environment it adds, and the URL it serves."""

    name: str
    argv: list[str]
    url: str
    env: dict[str, str] = field(default_factory=dict)
    is_router: bool = False


def server_gpu_bases(num_servers: int, tp: int, *, trainer_gpus: int, node_gpus: int) -> list[int]:
    """``--base-gpu-id`` of each server: the GPUs after the trainer's ``trainer_gpus`` on this node.

    Raises ConfigError when ``trainer_gpus + num_servers * tp`` exceeds the node's GPUs: SGLang
    would otherwise land on GPUs the trainer holds and fail its memory check (or starve the trainer).
    """
    need = trainer_gpus + num_servers * tp
    if need > node_gpus:
        raise ConfigError(
            f"rollout.sglang.launch: {num_servers} server(s) x tp {tp} = {num_servers * tp} GPU(s) do not fit beside the "
            f"trainer's {trainer_gpus} on this node of {node_gpus} GPU(s); lower rollout.sglang.num_servers/tp or the "
            "trainer's ranks per node, or start the servers on their own nodes (slurm/mopd_70b.sh) with launch=false"
        )
    return [trainer_gpus + i * tp for i in range(num_servers)]


def check_sglang_python(python: str, modules: Sequence[str] = ("sglang.launch_server",)) -> None:
    """Refuse an interpreter that cannot import SGLang's runtime (``sglang.launch_server``)."""
    try:
        proc = subprocess.run([python, "-c", f"import {', '.join(modules)}"], capture_output=True, text=True,
                              timeout=600, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"rollout.sglang.python: cannot run {python} ({exc})") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(
            f"rollout.sglang.python: {python} cannot import SGLang's runtime (import {', '.join(modules)}: {last}); "
            "point rollout.sglang.python (or $SGLANG_PYTHON) at an environment with SGLang's full dependencies, "
            "not the trainer's venv (it holds the sglang wheel without them)"
        )


def sglang_python(config: SGLangConfig) -> str:
    """The interpreter of SGLang's environment: the config's, else $SGLANG_PYTHON."""
    python = config.python or os.environ.get("SGLANG_PYTHON")
    if not python:
        raise ConfigError("rollout.sglang.python: launch=true needs SGLang's own interpreter (a venv or container "
                          "with its full dependencies); set it or $SGLANG_PYTHON")
    return python


def server_specs(
    config: SGLangConfig,
    *,
    python: str = "python",
    base_gpu_ids: Sequence[int] | None = None,
    prefix: Sequence[str] | None = None,
    key_file: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[ProcessSpec]:
    """``python -m sglang.launch_server`` for each of ``config.num_servers`` servers."""
    if not config.model_path:
        raise ConfigError("rollout.sglang.model_path: required when rollout.sglang.launch=true")
    prefix = list(prefix) if prefix else [python, "-m", "sglang.launch_server"]
    bases = list(base_gpu_ids) if base_gpu_ids is not None else [i * config.tp for i in range(config.num_servers)]
    specs = []
    for i in range(config.num_servers):
        port = config.port if config.num_servers == 1 else config.port + 1 + i
        argv = prefix + [
            *(["--config", key_file] if key_file else []),
            "--model-path", config.model_path,
            "--tp-size", str(config.tp),
            "--base-gpu-id", str(bases[i]),
            "--host", config.host,
            "--port", str(port),
            "--mem-fraction-static", str(config.mem_fraction_static),
            "--weight-version", "0",
            *extra_args,
        ]
        specs.append(ProcessSpec(f"sglang-server-{i}", argv, f"http://{_advertised(config.host)}:{port}", dict(SERVER_ENV)))
    return specs


def router_spec(
    config: SGLangConfig,
    worker_urls: Sequence[str],
    *,
    python: str = "python",
    prefix: Sequence[str] | None = None,
    policy: str = "cache_aware",
    api_key: str | None = None,
) -> ProcessSpec:
    """``python -m sglang_router.launch_router`` in front of ``worker_urls`` on ``config.port``.

    ``--api-key`` makes the router require the key of its clients and send it to the workers.
    """
    prefix = list(prefix) if prefix else [python, "-m", "sglang_router.launch_router"]
    argv = prefix + [
        "--worker-urls", *worker_urls,
        "--host", config.host,
        "--port", str(config.port),
        "--policy", policy,
        "--health-failure-threshold", str(ROUTER_HEALTH_FAILURE_THRESHOLD),
        *(["--api-key", api_key] if api_key else []),
    ]
    return ProcessSpec("sglang-router", argv, f"http://{_advertised(config.host)}:{config.port}", is_router=True)


def write_key_file(directory: Path, keys) -> str | None:
    """A 0600 YAML file SGLang reads with ``--config``: ``api_key`` and ``admin_api_key``."""
    lines = [f"{name}: {json.dumps(value)}" for name, value in (("api_key", keys.api), ("admin_api_key", keys.admin)) if value]
    if not lines:
        return None
    path = directory / "server-keys.yaml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


class SGLangLauncher:
    """Owns the server (and router) processes of one SGLangConfig; use as a context manager.

    ``keys`` (an ``ApiKeys``) are required by every process started; ``trainer_gpus`` /
    ``node_gpus`` default to this node's trainer ranks ($LOCAL_WORLD_SIZE on CUDA, 0 on a CPU
    trainer) and visible GPUs. ``server_prefix`` replaces ``python -m sglang.launch_server`` (tests).
    """

    def __init__(
        self,
        config: SGLangConfig,
        *,
        keys=None,
        python: str | None = None,
        server_prefix: Sequence[str] | None = None,
        router_prefix: Sequence[str] | None = None,
        extra_server_args: Sequence[str] = (),
        trainer_gpus: int | None = None,
        node_gpus: int | None = None,
        log_dir: str | os.PathLike | None = None,
        ready_timeout_s: float = 900.0,
        poll_s: float = 1.0,
        stop_grace_s: float = 15.0,
    ) -> None:
        from mopd.rollout.sglang_client import ApiKeys

        self.config = config
        self.keys = keys if keys is not None else ApiKeys.generate(config)
        self.python = python or (None if server_prefix else sglang_python(config))
        bases = server_gpu_bases(config.num_servers, config.tp, trainer_gpus=_trainer_gpus(trainer_gpus),
                                 node_gpus=_node_gpus(node_gpus))
        self._private = Path(tempfile.mkdtemp(prefix="mopd-sglang-keys-"))  # 0700
        key_file = write_key_file(self._private, self.keys)
        self.specs = server_specs(config, python=self.python or "python", base_gpu_ids=bases, prefix=server_prefix,
                                  key_file=key_file, extra_args=extra_server_args)
        if config.num_servers > 1:
            self.specs.append(router_spec(config, [s.url for s in self.specs], python=self.python or sys.executable,
                                          prefix=router_prefix, api_key=self.keys.api))
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="mopd-sglang-"))
        self.ready_timeout_s, self.poll_s, self.stop_grace_s = ready_timeout_s, poll_s, stop_grace_s
        self.procs: dict[str, subprocess.Popen] = {}
        self._copiers: list[threading.Thread] = []
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
        """Check SGLang's interpreter, launch everything and wait until each process answers /health;
        on failure stop all and raise."""
        if self.python:
            check_sglang_python(self.python, ["sglang.launch_server"] + (["sglang_router"] if self.config.num_servers > 1 else []))
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
            proc = subprocess.Popen(
                spec.argv, env={**os.environ, **spec.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
            self.procs[spec.name] = proc
            copier = threading.Thread(target=_copy_redacted, args=(proc.stdout, self.log_dir / f"{spec.name}.log",
                                                                   self.keys.secrets()), daemon=True)
            copier.start()
            self._copiers.append(copier)

    def wait_ready(self) -> None:
        """Poll /health of every process until 200; a process that exits first is an error with its log tail."""
        deadline = time.monotonic() + self.ready_timeout_s
        pending = list(self.specs)
        with httpx.Client(trust_env=False) as http:
            while pending:
                for spec in list(pending):
                    code = self.procs[spec.name].poll()
                    if code is not None:
                        time.sleep(0.2)  # let the log copier drain the last lines
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
        for copier in self._copiers:
            copier.join(timeout=5)
        self._copiers.clear()
        shutil.rmtree(self._private, ignore_errors=True)

    def __enter__(self) -> SGLangLauncher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def sglang_engine(config: SGLangConfig, *, name: str = "sglang", sync=None, **launcher_kwargs):
    """An SGLangEngine for ``config``: on its ``endpoints`` (weight updates to ``worker_urls``), or,
    with ``launch: true``, on servers started here with a fresh per-job key (their ``stop`` runs
    when the engine is closed). The weight-group backend follows the trainer's device."""
    from dataclasses import replace

    import torch

    from mopd.rollout.sglang_client import SGLangEngine, WeightSyncOptions

    sync = replace(sync or WeightSyncOptions(), backend="nccl" if torch.cuda.is_available() else "gloo")
    if not config.launch:
        return SGLangEngine(config, name=name, sync=sync)
    launcher = SGLangLauncher(config, **launcher_kwargs).start()
    try:
        engine = SGLangEngine(config, name=name, endpoints=[launcher.endpoint], worker_urls=launcher.worker_urls,
                              keys=launcher.keys, sync=sync)
    except BaseException:
        launcher.stop()
        raise
    engine.on_close.append(launcher.stop)
    return engine


def _copy_redacted(stream, path: Path, secrets: list[str]) -> None:
    """Copy a process's output into its log file line by line, every key replaced by REDACTED."""
    with open(path, "wb") as log:
        for line in iter(stream.readline, b""):
            for secret in secrets:
                line = line.replace(secret.encode(), REDACTED.encode())
            log.write(line)
            log.flush()
    stream.close()


def _trainer_gpus(given: int | None) -> int:
    if given is not None:
        return given
    import torch

    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if torch.cuda.is_available() else 0


def _node_gpus(given: int | None) -> int:
    if given is not None:
        return given
    import torch

    return torch.cuda.device_count()


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


def slurm_vars(config_path: str) -> str:
    """Shell assignments of the SGLang knobs in a run config, for slurm/mopd_70b.sh (``eval``): the
    script places processes; what they run with comes from the config, as for ``launch: true``."""
    import shlex

    from mopd.config import EngineKind, load_config

    run = load_config(config_path)
    sg = run.rollout.sglang
    if run.rollout.engine != EngineKind.sglang or not sg.model_path:
        raise ConfigError("rollout.sglang.model_path: slurm/mopd_70b.sh starts the rollout servers from it "
                          "(and needs rollout.engine=sglang)")
    teachers = []
    for t in run.distill.teachers:
        if t.engine == EngineKind.sglang:
            if not t.checkpoint:
                raise ConfigError(f"distill.teachers[{t.name}].checkpoint: the HF folder its SGLang server loads")
            teachers.append(f"{t.name}={t.checkpoint}")
    values = {
        "ROLLOUT_MODEL": sg.model_path, "ROLLOUT_SERVERS": str(sg.num_servers), "SGLANG_TP": str(sg.tp),
        "SGLANG_MEM_FRACTION": str(sg.mem_fraction_static), "API_KEY_ENV": sg.api_key_env or "",
        "ADMIN_API_KEY_ENV": sg.admin_api_key_env or "",
    }
    lines = [f"{k}={shlex.quote(v)}" for k, v in values.items()]
    lines.append("TEACHER_SPECS=(" + " ".join(shlex.quote(t) for t in teachers) + ")")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="SGLang settings of a run config as shell assignments")
    parser.add_argument("config")
    try:
        print(slurm_vars(parser.parse_args().config))
    except ConfigError as exc:
        sys.exit(f"{parser.prog}: {exc}")
