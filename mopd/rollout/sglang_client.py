"""SGLangEngine: an HTTP client of SGLang 0.5.23's native API (generation, scoring, weight updates).

* Every ``/generate`` request carries one sequence (one ``sampling_params`` object), so the same
  requests go to a server or through sgl-router; requests go round-robin over the endpoints, at
  most ``max_in_flight`` at once.
* Weight updates and pause/flush/continue go to ``worker_urls``: every server, never the router
  (it registers no weight-update routes).
* Keys (SGLang's ``--api-key`` / ``--admin-api-key``): ``Authorization: Bearer`` on every request,
  the admin key on the endpoints SGLang marks ``ADMIN_OPTIONAL`` (``ADMIN_PATHS``). A 401/403 is an
  ``AuthError`` naming the server and which key was sent, never retried. Keys are never printed.
* Retries with exponential back-off apply only to idempotent calls (scoring, health, control) after
  a dropped connection, a 5xx or a 429; never after a timeout (``request_timeout_s`` is the bound;
  a retried long call would double it), never after another 4xx, and never for generation.
* Generation is not reproducible on a default SGLang 0.5.23 server: ``sampling_seed`` is used only
  with ``--enable-deterministic-inference`` (``sampling_batch_info.py``), which mopd does not turn on
  (it is slower and refuses seeds with the flashinfer sampler). So a generation is never retried or
  failed over as if a second try would draw the same samples; the seeds are still sent, harmless.
* Behaviour logprobs are raw (temperature-1) only if the server runs with
  ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` (sglang_launcher and slurm/mopd_70b.sh set it); input
  (scoring) logprobs are always raw. No temperature is applied to scores here.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import torch

from mopd.config import ModelConfig, SamplingConfig, SGLangConfig
from mopd.errors import EngineError
from mopd.rollout import sglang_format as fmt
from mopd.rollout.engine import Engine, Health, ScoreRequest
from mopd.rollout.scoring import derive_seed
from mopd.types import Prompt, Rollout, TeacherScores

logger = logging.getLogger(__name__)

ADMIN_PATHS = frozenset({
    "/flush_cache", "/pause_generation", "/continue_generation", "/begin_weight_update", "/end_weight_update",
    "/init_weights_update_group", "/destroy_weights_update_group", "/update_weights_from_distributed",
    "/update_weights_from_disk",
})
"""The endpoints mopd calls that SGLang 0.5.23 marks ``AuthLevel.ADMIN_OPTIONAL``
(``srt/entrypoints/http_server.py``): with an admin key configured they accept only that key."""


class UnavailableError(EngineError):
    """A server did not answer (connection refused or dropped, timeout, 5xx) within the retries."""


class CallTimeout(EngineError):
    """A server took longer than the timeout to answer; neither retried nor failed over."""


class AuthError(EngineError):
    """A server refused the request's key (HTTP 401/403)."""


@dataclass(frozen=True)
class ApiKeys:
    """The job's SGLang keys; ``repr`` never shows them. ``source`` says where they came from."""

    api: str | None = field(default=None, repr=False)
    admin: str | None = field(default=None, repr=False)
    source: str = "none"

    @classmethod
    def from_env(cls, config: SGLangConfig) -> ApiKeys:
        """The keys in the environment variables the config names (unset: no key)."""
        api = os.environ.get(config.api_key_env) if config.api_key_env else None
        admin = os.environ.get(config.admin_api_key_env) if config.admin_api_key_env else None
        names = [f"${n}" for n, v in ((config.api_key_env, api), (config.admin_api_key_env, admin)) if v]
        return cls(api or None, admin or None, " and ".join(names) or "none")

    @classmethod
    def generate(cls, config: SGLangConfig) -> ApiKeys:
        """The environment's keys where set, otherwise a fresh random key per job (launch=true)."""
        import secrets

        env = cls.from_env(config)
        api = env.api or (secrets.token_urlsafe(32) if config.api_key_env else None)
        admin = env.admin or (secrets.token_urlsafe(32) if config.admin_api_key_env else None)
        return cls(api, admin, "generated for this job" if env.source == "none" else env.source)

    def header(self, path: str) -> dict[str, str]:
        key = self.admin if path in ADMIN_PATHS and self.admin else self.api
        return {"Authorization": f"Bearer {key}"} if key else {}

    def describe(self, path: str) -> str:
        """Which key a request to ``path`` carried, without the key itself."""
        if path in ADMIN_PATHS and self.admin:
            return f"the admin key ({self.source})"
        return f"the API key ({self.source})" if self.api else "no key"

    def secrets(self) -> list[str]:
        return [k for k in (self.api, self.admin) if k]


@dataclass(frozen=True, kw_only=True)
class WeightSyncOptions:
    """How update_weights reaches the servers (``SGLangConfig.weight_sync`` picks the mode)."""

    master_address: str = ""
    """Address the servers use to reach this process for the NCCL group ("" = this host's name)."""
    master_port: int = 0
    """0 picks a free port."""
    backend: str = "nccl"
    """The servers' group backend; "gloo" only for CPU tests."""
    group_name: str = "mopd_weight_sync"
    bucket_bytes: int = 512 << 20
    """Tensors per update_weights_from_distributed call, by total size."""
    timeout_s: float = 600.0
    """Bound on a broadcast the servers never join (e.g. a refused update call)."""
    disk_dir: str | None = None
    """weight_sync=disk: where each version is written as safetensors."""
    base_model_path: str | None = None
    """weight_sync=disk: config/tokenizer files copied next to the weights."""
    model: ModelConfig | None = None
    """weight_sync=disk: the student's architecture, which plans the safetensors shards."""
    disk_shard_bytes: int = 5 << 30
    """weight_sync=disk: the largest safetensors shard written."""


class SGLangEngine(Engine):
    """One model served by one or more SGLang servers (or an sglang_router in front of them)."""

    def __init__(
        self,
        config: SGLangConfig,
        *,
        name: str = "sglang",
        endpoints: Sequence[str] | None = None,
        worker_urls: Sequence[str] | None = None,
        keys: ApiKeys | None = None,
        backoff_s: float = 0.5,
        health_timeout_s: float = 20.0,
        sync: WeightSyncOptions | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.endpoints = [u.rstrip("/") for u in (endpoints or config.endpoints)]
        if not self.endpoints:
            raise EngineError(f"engine {name!r}: no SGLang endpoint (set rollout.sglang.endpoints or launch=true)")
        # config.worker_urls belong to config.endpoints: an engine given other endpoints (a teacher's
        # server) has its own servers as workers.
        workers = worker_urls or (config.worker_urls if endpoints is None else None) or self.endpoints
        self.worker_urls = [u.rstrip("/") for u in workers]
        self.keys = keys if keys is not None else ApiKeys.from_env(config)
        self.backoff_s = backoff_s
        self.health_timeout_s = health_timeout_s
        self.sync = sync or WeightSyncOptions()
        self.weight_version = 0
        # trust_env=False: cluster HTTP proxies must not sit between trainer and servers.
        self._http = httpx.Client(limits=httpx.Limits(max_connections=config.max_in_flight), trust_env=False)
        self._pool = ThreadPoolExecutor(max_workers=config.max_in_flight, thread_name_prefix=f"sglang-{name}")
        self._group = None
        self._group_broken = ""
        self._sending: Future | None = None
        self._lock = threading.Lock()
        self.on_close: list[Callable[[], None]] = []
        """Run by close() after the client is shut (e.g. the launcher's stop for servers it started)."""

    # ------------------------------------------------------------------ HTTP

    def _call(self, method: str, url: str, payload: Any = None, *, idempotent: bool, timeout: float | None = None,
              expect_json: bool = True) -> Any:
        """One HTTP call with bounded retries for idempotent requests; EngineError names the URL."""
        timeout = timeout or self.config.request_timeout_s
        attempts = 1 + (self.config.retries if idempotent else 0)
        path = httpx.URL(url).path
        problem = ""
        for attempt in range(attempts):
            try:
                resp = self._http.request(method, url, json=payload, headers=self.keys.header(path),
                                          timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))
            except httpx.ConnectTimeout:
                problem = "no connection within 10 s"
            except httpx.TimeoutException:
                raise CallTimeout(f"engine {self.name!r}: {url}: no answer within the {timeout:g} s timeout "
                                       "(rollout.sglang.request_timeout_s; not retried)") from None
            except httpx.TransportError as exc:
                problem = f"unreachable or connection dropped ({type(exc).__name__}: {exc})"
            else:
                if resp.status_code < 400:
                    return _decode(resp, url) if expect_json else resp.text
                message = _server_message(resp)
                if resp.status_code in (401, 403):
                    raise AuthError(
                        f"engine {self.name!r}: {url} refused the request's key: HTTP {resp.status_code} ({message}); "
                        f"it was sent {self.keys.describe(path)}: the key is missing or wrong for this server "
                        "(servers and router must be started with the job's --api-key/--admin-api-key)"
                    )
                if resp.status_code < 500 and resp.status_code != 429:
                    raise EngineError(f"engine {self.name!r}: {url} refused the request: HTTP {resp.status_code}: {message}")
                problem = f"HTTP {resp.status_code}: {message}"
            if attempt + 1 < attempts:
                time.sleep(self.backoff_s * 2**attempt)
        raise UnavailableError(f"engine {self.name!r}: {url}: {problem} (after {attempts} attempt(s))")

    def _map(self, items: Sequence[Any], work: Callable[[str, int], Any], idempotent: bool) -> list[Any]:
        """Run ``work(endpoint, i)`` for every item concurrently; results in input order.

        Items go round-robin over the endpoints; an idempotent item whose endpoint is unavailable
        (after its retries) moves on to the next endpoint, so one dead server does not fail a batch.
        """
        def failover(i: int) -> Any:
            tries = len(self.endpoints) if idempotent else 1
            for k in range(tries):
                try:
                    return work(self.endpoints[(i + k) % len(self.endpoints)], i)
                except UnavailableError:
                    if k + 1 == tries:
                        raise
            raise AssertionError("unreachable")

        futures = [self._pool.submit(failover, i) for i in range(len(items))]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    # ------------------------------------------------------------------ generation and scoring

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[Rollout]:
        """``sampling.n`` rollouts per prompt, prompt-major, one request per rollout (own seed each:
        a shared seed would make the n samples of a deterministic server identical)."""
        expanded = [p for p in prompts for _ in range(sampling.n)]
        seeds = [None if sampling.seed is None else derive_seed(sampling.seed, p.index, s) for p in prompts for s in range(sampling.n)]

        def work(url: str, i: int) -> Rollout:
            where = f"engine {self.name!r}: {url}/generate (sequence {i})"
            body = self._call("POST", f"{url}/generate", fmt.generate_payload(expanded[i], sampling, seeds[i]), idempotent=False)
            return self._rollout(fmt.single_result(body, where), expanded[i], sampling, where)

        return self._map(expanded, work, idempotent=False)

    def _rollout(self, item: dict, prompt: Prompt, sampling: SamplingConfig, where: str) -> Rollout:
        r = fmt.parse_rollout(item, prompt, where, self.weight_version)
        t = r.response_ids.numel()
        if t > sampling.max_new_tokens or (r.finish == "length" and t != sampling.max_new_tokens) or (r.finish == "stop" and t == 0):
            raise fmt.ResponseError(f"{where}: {t} tokens with finish={r.finish!r} for max_new_tokens={sampling.max_new_tokens}")
        return r

    def score(self, requests: Sequence[ScoreRequest], top_k: int) -> list[TeacherScores]:
        """Prefill-only scoring (``max_new_tokens: 0``, ``logprob_start_len = response_start - 1``)."""
        if top_k < 1:
            raise EngineError(f"engine {self.name!r}: top_k must be >= 1, got {top_k}")
        for i, r in enumerate(requests):
            _check_request(r, i, self.name)

        def work(url: str, i: int) -> TeacherScores:
            where = f"engine {self.name!r}: {url}/generate (score request {i})"
            body = self._call("POST", f"{url}/generate", fmt.score_payload(requests[i], top_k), idempotent=True)
            return fmt.parse_scores(fmt.single_result(body, where), requests[i], top_k, self.name, where)

        return self._map(requests, work, idempotent=True)

    # ------------------------------------------------------------------ weight updates

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Stream HF-named tensors into every worker (NCCL group or disk) between pause and continue."""
        with self._lock:
            if self.config.weight_sync == "disk":
                self._update_from_disk(named_tensors, version)
            else:
                self._update_from_distributed(named_tensors, version)
            self.weight_version = int(version)

    def _control(self, path: str, payload: Any = None, *, idempotent: bool = True, urls: Sequence[str] | None = None,
                 expect_json: bool = True) -> list[Any]:
        """POST ``path`` to every worker concurrently; the first failure raises."""
        futures = [self._pool.submit(self._call, "POST", f"{u}{path}", {} if payload is None else payload,
                                     idempotent=idempotent, expect_json=expect_json) for u in urls or self.worker_urls]
        return [f.result() for f in futures]

    @contextmanager
    def _paused(self) -> Iterator[None]:
        """pause_generation (retract: running requests go back to the queue and resume later) ... continue."""
        self._control("/pause_generation", {"mode": "retract"})
        try:
            self._control("/flush_cache", expect_json=False)
            yield
        finally:
            self._control("/continue_generation", {})

    def _update_from_distributed(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        group = self._ensure_group()
        with self._paused():
            self._control("/begin_weight_update", {}, idempotent=False)
            self._send_buckets(named_tensors, version, group)
            self._control("/end_weight_update", {}, idempotent=False)
            self._control("/flush_cache", expect_json=False)

    # Staged updates (added for mopd.sync): with pipeline parallelism every stage's first rank sends
    # its own layers over its own group (``sync.group_name`` distinct per stage); one process (global
    # rank 0) opens and closes the session around all of them.

    def begin_staged_update(self) -> None:
        """pause_generation, flush_cache, begin_weight_update on every worker (one process only)."""
        self._control("/pause_generation", {"mode": "retract"})
        try:
            self._control("/flush_cache", expect_json=False)
            self._control("/begin_weight_update", {}, idempotent=False)
        except BaseException:
            self._control("/continue_generation", {})
            raise

    def send_stage(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Broadcast this sender's tensors in buckets over its own group (between begin and end)."""
        with self._lock:
            self._send_buckets(named_tensors, version, self._ensure_group())
            self.weight_version = int(version)

    def end_staged_update(self, version: int) -> None:
        """end_weight_update, flush_cache, continue_generation (continue runs even if end fails)."""
        try:
            self._control("/end_weight_update", {}, idempotent=False)
            self._control("/flush_cache", expect_json=False)
        finally:
            self._control("/continue_generation", {})
        self.weight_version = int(version)

    def _send_buckets(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, group) -> None:
        from mopd.rollout.weight_group import broadcast_tensors

        device = torch.device("cuda", torch.cuda.current_device()) if self.sync.backend == "nccl" else torch.device("cpu")
        for bucket in _buckets(named_tensors, self.sync.bucket_bytes):
            body = {
                "names": [n for n, _ in bucket],
                "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket],
                "group_name": self.sync.group_name,
                "flush_cache": False,
                "abort_all_requests": False,
                "weight_version": str(version),
            }
            # Daemon threads, as for the broadcast: a call a broken peer never answers must not hold the
            # process at exit (pool threads are joined then).
            pending = [_in_daemon_thread(self._call, "POST", f"{u}/update_weights_from_distributed", body, idempotent=False)
                       for u in self.worker_urls]
            sending = self._sending = _in_daemon_thread(broadcast_tensors, [t for _, t in bucket], group, device)
            # A server that refuses the call never posts its receives: report that at once instead of
            # blocking in the broadcast until the group timeout.
            wait([sending, *pending], return_when=FIRST_EXCEPTION)
            for f in pending:
                if f.done() and f.exception() is not None:
                    self._group_broken = f"update_weights_from_distributed of {body['names'][0]!r}... failed"
                    raise f.exception()
            try:
                sending.result()
            except Exception as exc:
                self._group_broken = f"the broadcast of {body['names'][0]!r}... failed"
                raise EngineError(f"engine {self.name!r}: broadcasting weights to {self.worker_urls} failed: {exc}") from exc
            for f in pending:
                f.result()

    def _ensure_group(self):
        """Create the NCCL group once: servers join as ranks 1.., this process as rank 0.

        The rendezvous runs in a daemon thread while the init calls are in flight: a server that
        refuses the call (or is gone) never joins, so its error ends the wait at once instead of
        the rendezvous timing out after ``timeout_s``.
        """
        if self._group_broken:
            raise EngineError(
                f"engine {self.name!r}: the weight-update group is unusable ({self._group_broken}; a broadcast "
                "may be half-sent); restart the engine and its servers"
            )
        if self._group is not None:
            return self._group
        from mopd.rollout.weight_group import init_custom_process_group

        address = self.sync.master_address or self.config.weight_sync_address or socket.gethostname()
        port = self.sync.master_port or _free_port()
        world = 1 + self.config.tp * len(self.worker_urls)
        pending = [  # daemon threads: after a refusal the others stay blocked in their rendezvous
            _in_daemon_thread(self._call, "POST", f"{u}/init_weights_update_group", {
                "master_address": address, "master_port": port, "rank_offset": 1 + i * self.config.tp,
                "world_size": world, "group_name": self.sync.group_name, "backend": self.sync.backend,
            }, idempotent=False)
            for i, u in enumerate(self.worker_urls)
        ]
        joining = _in_daemon_thread(
            init_custom_process_group, backend=self.sync.backend, init_method=f"tcp://{address}:{port}",
            world_size=world, rank=0, group_name=self.sync.group_name, timeout=timedelta(seconds=self.sync.timeout_s),
        )
        wait([joining, *pending], return_when=FIRST_EXCEPTION)
        for f in pending:
            if f.done() and f.exception() is not None:
                self._group_broken = "a server refused /init_weights_update_group"
                raise f.exception()
        self._group = joining.result()
        for f in pending:
            f.result()
        return self._group

    def _update_from_disk(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Write ``version`` as safetensors shards, each tensor at its planned offset as it arrives
        (``HFFolderWriter``: never the whole model in memory), then have every server load the folder."""
        import itertools

        from mopd.hf.folder import HFFolderWriter

        if not self.sync.disk_dir or self.sync.model is None:
            raise EngineError(f"engine {self.name!r}: weight_sync=disk needs WeightSyncOptions.disk_dir and .model "
                              "(the student's architecture plans the shards)")
        stream = iter(named_tensors)
        first = next(stream, None)
        if first is None:
            raise EngineError(f"engine {self.name!r}: weight_sync=disk got an empty weight stream for version {version}")
        target = Path(self.sync.disk_dir) / f"v{version}"
        writer = HFFolderWriter(target, self.sync.model, dtype=first[1].dtype, max_shard_bytes=self.sync.disk_shard_bytes)
        writer.update_weights(itertools.chain([first], stream), version)
        if self.sync.base_model_path:  # the served model's own config and tokenizer files
            for f in Path(self.sync.base_model_path).iterdir():
                if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".index.json")):
                    shutil.copy2(f, target / f.name)
        with self._paused():
            self._control("/update_weights_from_disk", {
                "model_path": str(target), "weight_version": str(version), "flush_cache": True, "abort_all_requests": False,
            }, idempotent=False)
        for old in Path(self.sync.disk_dir).glob("v*"):  # the servers hold this version now; a model per step adds up
            if old != target and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ health

    def health(self) -> Health:
        """/health on every worker, and the weight version each reports in /model_info."""
        details, versions, ok = [], [], True
        for u in self.worker_urls:
            try:
                self._call("GET", f"{u}/health", idempotent=True, timeout=self.health_timeout_s, expect_json=False)
                info = self._model_info(u)
                versions.append(fmt.parse_version(info.get("weight_version"), self.weight_version))
                details.append(f"{u}: ok ({info.get('model_path', '?')}, weight_version {info.get('weight_version')})")
            except EngineError as exc:
                ok = False
                details.append(str(exc))
        return Health(ok=ok, detail="; ".join(details), weight_version=min(versions) if versions else self.weight_version)

    def _model_info(self, url: str) -> dict:
        try:
            info = self._call("GET", f"{url}/model_info", idempotent=True, timeout=self.health_timeout_s)
        except EngineError as exc:
            if "HTTP 404" not in str(exc):
                raise
            info = self._call("GET", f"{url}/get_model_info", idempotent=True, timeout=self.health_timeout_s)
        if not isinstance(info, dict):
            raise fmt.ResponseError(f"engine {self.name!r}: {url}/model_info answered {type(info).__name__}, not an object")
        return info

    def close(self) -> None:
        """Leave the weight-update group on both ends (``/destroy_weights_update_group``, so a later
        engine can create it again under the same name), stop the pool, close connections. Idempotent."""
        if self._group is not None:  # also a broken group: the servers must be able to create it again
            try:
                self._control("/destroy_weights_update_group", {"group_name": self.sync.group_name})
            except EngineError as exc:  # teardown goes on; a later init under this name would fail loudly
                logger.warning("engine %r: could not destroy the weight-update group: %s", self.name, exc)
        self._pool.shutdown(wait=not self._group_broken, cancel_futures=True)
        self._http.close()
        if self._group is not None:
            import torch.distributed as dist

            if self._sending is None or self._sending.done():  # not while a broadcast is blocked in it
                dist.destroy_process_group(self._group)
            self._group = None
        while self.on_close:
            self.on_close.pop()()


def _decode(resp: httpx.Response, url: str) -> Any:
    try:
        return resp.json()
    except ValueError as exc:
        raise fmt.ResponseError(f"{url} answered malformed JSON ({exc}): {resp.text[:200]!r}") from None


def _server_message(resp: httpx.Response) -> str:
    """SGLang's error text: ``{"error": {"message": ...}}``, ``{"error": "..."}``, ``{"message": ...}`` or plain text."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message", err))
        return str(err)
    return str(body)[:500]


def _check_request(r: ScoreRequest, index: int, engine: str) -> None:
    length = int(r.ids.shape[0])
    if not 1 <= r.response_start <= length:
        raise EngineError(f"engine {engine!r}: score request {index} has response_start={r.response_start}, "
                          f"which must be in [1, {length}]")
    if r.sampled_ids is not None and not torch.equal(r.sampled_ids.long().cpu(), r.ids[r.response_start :].long().cpu()):
        raise EngineError(f"engine {engine!r}: score request {index}: SGLang scores the tokens of ids, so sampled_ids "
                          "must equal ids[response_start:]")


def _buckets(named: Iterable[tuple[str, torch.Tensor]], limit: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    bucket, size = [], 0
    for name, t in named:
        if bucket and size + t.numel() * t.element_size() > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def _in_daemon_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
    """``fn(*args, **kwargs)`` in a daemon thread, as a Future (pool threads are joined at exit)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="sglang-weight-sync").start()
    return future


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]

