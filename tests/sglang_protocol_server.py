"""A protocol-compatible SGLang 0.5.23 test server on top of EmbeddedEngine (stdlib http.server).

It speaks the subset mopd uses: ``/generate`` (generation, and prefill-only scoring with flat
base64 or nested top logprobs), ``/health``, ``/model_info``, ``/server_info``, the pause /
flush / begin-end weight-update endpoints, ``update_weights_from_disk`` and
``update_weights_from_distributed`` over a real (gloo) process group joined the way SGLang joins.
With ``api`` (``load_api_types()``), every ``/generate`` request is checked with SGLang's own
``decode_GenerateRequest`` and every answer with ``decode_GenerateResponse`` from
``sglang/api/v1/api_types.py`` in the sglang wheel, loaded by file path; violations are recorded in
``server.violations`` (and a bad request gets the contract gate's 400). Without it (``api=None``)
the server runs with schema validation off, for the fault/retry tests that do not need the wheel.

With keys, it enforces SGLang 0.5.23's auth rules by calling the wheel's own
``sglang/srt/utils/auth.py:decide_request_auth`` with each endpoint's level as marked in the wheel's
``srt/entrypoints/http_server.py`` (health open, the api key on /generate, the admin key on the
``ADMIN_OPTIONAL`` weight and pause endpoints). Faults can be injected per endpoint (``Fault``).

Run as a script it mimics ``python -m sglang.launch_server`` (same flags, ``--config`` YAML with
``api_key``/``admin_api_key``) for the launcher and cluster tests; ``--refuse-weight-group`` and
``--exit-after PATH:N`` make it refuse the weight-group init or die after its N-th call of PATH.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

PROTOCOL_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(PROTOCOL_DIR.parent))  # when run as a script from anywhere

from mopd.config import SamplingConfig  # noqa: E402
from mopd.errors import EngineError  # noqa: E402
from mopd.rollout.embedded import EmbeddedEngine  # noqa: E402
from mopd.rollout.engine import ScoreRequest  # noqa: E402
from mopd.types import Prompt  # noqa: E402
from sglang_wheel import SGLangAuth, load_api_types  # noqa: E402

TOP_K_ALL = 1 << 30


def tiny_llama(seed: int = 0, vocab_size: int = 128):
    """A 2-layer random LlamaForCausalLM (hidden 32, 4 query / 2 KV heads), fp32, built on the spot."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False, initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


@dataclass
class Fault:
    """Misbehaviour for the next matching calls: close | delay | garbage | bad_b64 | nan | abort | wrong_count | status."""

    kind: str
    path: str = "/generate"
    times: int = 1
    skip: int = 0
    """Matching calls to let through first (e.g. 1: the second chunk of a batch fails)."""
    delay_s: float = 0.0
    status: int = 503


class ProtocolServer:
    """The server state; ``start()`` serves it on 127.0.0.1 in a daemon thread."""

    def __init__(self, engine: EmbeddedEngine, api: ModuleType | None, *, port: int = 0, host: str = "127.0.0.1",
                 model_path: str = "tiny-llama", launch_command: list[str] | None = None, api_key: str | None = None,
                 admin_api_key: str | None = None, refuse_weight_group: bool = False,
                 exit_after: tuple[str, int] | None = None, stats_file: str | None = None) -> None:
        self.engine, self.api, self.model_path = engine, api, model_path
        self.auth = SGLangAuth(api_key, admin_api_key) if (api_key or admin_api_key) else None
        self.refuse_weight_group, self.exit_after = refuse_weight_group, exit_after
        self.counts: dict[str, int] = {}
        self.stats_file, self.generate_calls, self.weight_checksums = stats_file, 0, {}
        self.launch_command = launch_command or []
        self.violations: list[str] = []
        self.calls: list[str] = []
        self.faults: list[Fault] = []
        self.paused = self.in_update_session = False
        self.active = self.max_active = 0
        self.groups: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._engine_lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.state = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ProtocolServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def inject(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.path == path and f.times > 0:
                    if f.skip > 0:
                        f.skip -= 1
                        return None
                    f.times -= 1
                    return f
        return None

    # ------------------------------------------------------------------ /generate

    def generate(self, body: Any) -> tuple[int, Any]:
        if self.api is not None:
            try:
                self.api.decode_GenerateRequest(body)
            except self.api.JsonContractError as exc:
                self.violations.append(f"request: {exc}")
                return 400, {"error": str(exc)}
        try:
            items = _normalise(body)
        except ValueError as exc:
            return 400, {"error": {"message": str(exc), "code": 400}}
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.generate_calls += 1
        try:
            with self._engine_lock:
                results = self._run(items)
        finally:
            with self._lock:
                self.active -= 1
        for i, r in enumerate(results if self.api is not None else []):
            try:
                self.api.decode_GenerateResponse(json.loads(json.dumps(r)))
            except self.api.JsonContractError as exc:
                self.violations.append(f"response {i}: {exc}")
                return 500, {"error": f"server built an invalid response: {exc}"}
        self._write_stats()
        return 200, results if isinstance(body.get("input_ids", [None])[0], list) else results[0]

    def _run(self, items: list[dict]) -> list[dict]:
        out: list[dict | None] = [None] * len(items)
        gen = [i for i, it in enumerate(items) if it["sp"].get("max_new_tokens", 128) > 0]
        for i, it in enumerate(items):
            if i not in gen:
                out[i] = self._prefill(it)
        groups: dict[tuple, list[int]] = {}
        for i in gen:
            sp = items[i]["sp"]
            key = (sp.get("temperature", 1.0), sp.get("top_p", 1.0), sp.get("top_k", TOP_K_ALL),
                   sp.get("max_new_tokens", 128), tuple(sp.get("stop_token_ids") or ()))
            groups.setdefault(key, []).append(i)
        for (temp, top_p, top_k, max_new, stop), idx in groups.items():
            sampling = SamplingConfig(temperature=temp, top_p=top_p, top_k=-1 if top_k >= TOP_K_ALL else top_k,
                                      max_new_tokens=max_new, stop_token_ids=list(stop))
            prompts = [Prompt(index=i, ids=torch.tensor(items[i]["ids"]), text="", domain="") for i in idx]
            seeds = [items[i]["sp"].get("sampling_seed") for i in idx]
            for i, r in zip(idx, self.engine.generate_seeded(prompts, sampling, seeds)):
                out[i] = self._generation_result(items[i], r)
        return out

    def _generation_result(self, it: dict, r) -> dict:
        ids = r.response_ids.tolist()
        finish = {"type": "stop", "matched": ids[-1]} if r.finish == "stop" else {"type": "length", "length": len(ids)}
        meta = self._meta(it, finish, completion=len(ids))
        if it["return_logprob"]:
            meta["output_token_logprobs"] = [[float(lp), t, None] for lp, t in zip(r.behaviour_logprobs.tolist(), ids)]
            meta["output_token_logprobs_length"] = len(ids)
        return {"text": r.text, "output_ids": ids, "meta_info": meta}

    def _prefill(self, it: dict) -> dict:
        ids, start, k = it["ids"], it["logprob_start_len"], it["top_logprobs_num"]
        meta = self._meta(it, {"type": "length", "length": 0}, completion=0)
        if it["return_logprob"] and start >= 0:
            s = self.engine.score([ScoreRequest(ids=torch.tensor(ids), response_start=start + 1)], top_k=max(k, 1))[0]
            lps = s.sampled_logprob.tolist()
            meta["input_token_logprobs"] = [[None, ids[start], None]] + [[lp, ids[start + 1 + j], None] for j, lp in enumerate(lps)]
            if k > 0:
                vals, idx = s.topk_logprobs.float().numpy(), s.topk_ids.numpy()
                if it["flat"]:
                    meta.update(_flat_fields(vals, idx, it["b64"]))
                else:
                    rows = [[[float(v), int(t), None] for v, t in zip(vr, ir)] for vr, ir in zip(vals, idx)]
                    meta["input_top_logprobs"] = [None] + rows
        return {"text": "", "output_ids": [], "meta_info": meta}

    def _meta(self, it: dict, finish: dict, completion: int) -> dict:
        return {"id": it["rid"], "finish_reason": finish, "prompt_tokens": len(it["ids"]), "completion_tokens": completion,
                "cached_tokens": 0, "weight_version": str(self.engine.weight_version), "e2e_latency": 0.001}

    # ------------------------------------------------------------------ control endpoints

    def control(self, path: str, body: Any) -> tuple[int, Any]:
        self.calls.append(path)
        if not isinstance(body, dict):
            return 422, {"detail": f"{path}: the body must be a JSON object"}
        handler = {
            "/pause_generation": self._pause, "/continue_generation": self._continue,
            "/begin_weight_update": self._begin, "/end_weight_update": self._end,
            "/init_weights_update_group": self._init_group, "/update_weights_from_distributed": self._from_distributed,
            "/update_weights_from_disk": self._from_disk, "/destroy_weights_update_group": self._destroy_group,
            "/weights_checker": self._checksums,
        }.get(path)
        if handler is None:
            return 404, {"detail": "Not Found"}
        try:
            return handler(body)
        except KeyError as exc:
            return 422, {"detail": f"{path}: missing field {exc}"}

    def _pause(self, body):
        if body.get("mode", "abort") not in ("abort", "retract", "in_place"):
            return 422, {"detail": f"bad mode {body.get('mode')!r}"}
        self.paused = True
        return 200, {"message": "Generation paused successfully.", "status": "ok"}

    def _continue(self, body):
        self.paused = False
        return 200, {"message": "Generation continued successfully.", "status": "ok"}

    def flush_cache(self) -> tuple[int, str]:
        self.calls.append("/flush_cache")
        if self.active and not self.paused:
            return 400, "Flush cache failed: there are running or waiting requests.\n"
        return 200, "Cache flushed.\n"

    def _begin(self, body):
        self.in_update_session = True
        return 200, {"success": True, "message": "ok"}

    def _end(self, body):
        if not self.in_update_session:
            return 400, {"success": False, "message": "end_weight_update without begin_weight_update"}
        self.in_update_session = False
        return 200, {"success": True, "message": "ok"}

    def _init_group(self, body):
        name = body.get("group_name", "weight_update_group")
        if self.refuse_weight_group:
            print(f"refusing /init_weights_update_group at {time.time():.3f} (--refuse-weight-group)", flush=True)
            return 400, {"success": False, "message": "Failed to initialize custom process group: refused (--refuse-weight-group)"}
        if name in self.groups:  # torch refuses a second group under one name, and so does SGLang
            return 400, {"success": False, "message": f"Failed to initialize custom process group: The specified "
                         f"group name {name} has already been created, please use a different group name"}
        if body.get("backend", "nccl") != "gloo":
            return 400, {"success": False, "message": "this CPU test server joins gloo groups only"}
        self.groups[name] = _join_gloo_group(
            f"tcp://{body['master_address']}:{body['master_port']}", body["rank_offset"], body["world_size"], name
        )
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def _destroy_group(self, body):
        group = self.groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is None:
            return 400, {"success": False, "message": f"no group named {body.get('group_name')!r}"}
        return 200, {"success": True, "message": "ok"}

    def _checksums(self, body):
        """SHA-256 of every weight's bytes in ``dtype`` (this server's form of SGLang's /weights_checker)."""
        import hashlib

        dtype = getattr(torch, body.get("dtype", "float32"))
        with self._engine_lock:
            sums = {n: hashlib.sha256(t.detach().to(dtype).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                    for n, t in self.engine.model.state_dict().items()}
        return 200, {"success": True, "checksums": sums, "weight_version": str(self.engine.weight_version)}

    def _from_distributed(self, body):
        if not self.in_update_session:
            return 400, {"success": False, "message": "update_weights_from_distributed must run between "
                         "begin_weight_update() and end_weight_update()"}
        group = self.groups[body.get("group_name", "weight_update_group")]
        tensors = []
        for dtype, shape in zip(body["dtypes"], body["shapes"]):
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            opts = dist.BroadcastOptions()
            opts.rootRank, opts.rootTensor = 0, 0
            group.broadcast([t], opts).wait()
            tensors.append(t)
        return self._load(zip(body["names"], tensors), body.get("weight_version"))

    def _from_disk(self, body):
        from safetensors.torch import load_file

        files = sorted(Path(body["model_path"]).glob("*.safetensors"))
        if not files:
            return 400, {"success": False, "message": f"no safetensors in {body['model_path']}", "num_paused_requests": 0}
        named = [kv for f in files for kv in load_file(str(f)).items()]
        status, out = self._load(named, body.get("weight_version"))
        return status, {**out, "num_paused_requests": 0}

    def _load(self, named, version) -> tuple[int, dict]:
        try:
            with self._engine_lock:
                self.engine.update_weights(named, int(version) if version is not None else self.engine.weight_version)
        except EngineError as exc:
            return 400, {"success": False, "message": str(exc)}
        if self.stats_file:
            self.weight_checksums = {dtype: self._checksums({"dtype": dtype})[1]["checksums"]
                                     for dtype in ("float32", "bfloat16")}
            self._write_stats()
        return 200, {"success": True, "message": "Succeeded to update model weights."}

    def _write_stats(self) -> None:
        """--stats-file: what this server holds and served, rewritten atomically after each change."""
        if not self.stats_file:
            return
        with self._lock:
            stats = {"generate_calls": self.generate_calls, "weight_version": self.engine.weight_version,
                     "checksums": self.weight_checksums}
            tmp = f"{self.stats_file}.tmp"
            Path(tmp).write_text(json.dumps(stats))
            os.replace(tmp, self.stats_file)

    def model_info(self) -> dict:
        info = {"model_path": self.model_path, "served_model_name": self.model_path, "tokenizer_path": self.model_path,
                "is_generation": True, "preferred_sampling_params": None,
                "weight_version": str(self.engine.weight_version), "load_format": "auto"}
        if self.api is not None:
            self.api.decode_GetModelInfoResponse(info)
        return info

    def server_info(self) -> dict:
        return {"version": "0.5.23-protocol-test", "launch_command": " ".join(self.launch_command),
                "SGLANG_RETURN_ORIGINAL_LOGPROB": os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB"),
                "internal_states": [{}]}


def _join_gloo_group(init_method: str, rank: int, world_size: int, name: str):
    """The server end of the weight-update group, with the store keys SGLang's ranks use.

    SGLang registers the group under ``name`` in torch's process-wide table; the trainer end in
    this same test process already holds that name, so the server builds the gloo backend
    directly over the same key prefixes (``name`` / ``name/`` / ``cpu/``) instead.
    """
    from datetime import timedelta

    from torch.distributed.distributed_c10d import PrefixStore, rendezvous

    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timedelta(seconds=60)))
    store = PrefixStore("cpu/", PrefixStore(f"{name}/", PrefixStore(name, store)))
    return dist.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=60))


def _normalise(body: dict) -> list[dict]:
    """One dict per batch entry, with list-valued parameters split and checked like SGLang does."""
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise ValueError("input_ids is required (text input is not supported by this server)")
    batch = [list(x) for x in ids] if isinstance(ids[0], list) else [list(ids)]
    n = len(batch)

    def per_item(value, default, name):
        if isinstance(value, list):
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for a batch of {n}")
            return value
        return [default if value is None else value] * n

    raw_sp = body.get("sampling_params") or {}
    sps = per_item(raw_sp, {}, "sampling_params")
    return_lp = per_item(body.get("return_logprob"), False, "return_logprob")
    starts = per_item(body.get("logprob_start_len"), -1, "logprob_start_len")
    ks = per_item(body.get("top_logprobs_num"), 0, "top_logprobs_num")
    items = []
    for i in range(n):
        sp = sps[i]
        if sp.get("max_new_tokens", 128) < 0 or not 0 <= sp.get("min_new_tokens", 0) <= max(sp.get("max_new_tokens", 128), 0):
            raise ValueError(f"max_new_tokens must be >= 0 and min_new_tokens in [0, max_new_tokens]; got {sp}")
        if sp.get("n", 1) != 1:
            raise ValueError("this test server supports n == 1 only")
        if return_lp[i] and starts[i] > len(batch[i]):
            raise ValueError(f"logprob_start_len ({starts[i]}) is larger than the prompt ({len(batch[i])} tokens)")
        if any(not 0 <= t < 1 << 31 for t in batch[i]):
            raise ValueError(f"input_ids[{i}] holds an id outside the vocabulary")
        items.append({"ids": batch[i], "sp": sp, "return_logprob": bool(return_lp[i]), "top_logprobs_num": int(ks[i]),
                      "logprob_start_len": int(starts[i]) if return_lp[i] else -1, "rid": f"req-{time.monotonic_ns()}-{i}",
                      "flat": bool(body.get("return_flat_raw_top_logprobs")),
                      "b64": bool(body.get("return_flat_raw_top_logprobs_b64"))})
    return items


def _flat_fields(vals, idx, b64: bool) -> dict:
    """SGLang's flat top-logprob fields for rows 1..T (row 0 is the null prefix)."""
    fields = {"input_top_logprobs_shape": [int(vals.shape[0]), int(vals.shape[1])], "input_top_logprobs_null_prefix": 1}
    if b64:
        fields["input_top_logprobs_val_flat_b64"] = base64.b64encode(vals.astype("<f4").tobytes()).decode()
        fields["input_top_logprobs_idx_flat_b64"] = base64.b64encode(idx.astype("<i4").tobytes()).decode()
        fields["input_top_logprobs_val_flat_b64_dtype"] = "float32"
        fields["input_top_logprobs_idx_flat_b64_dtype"] = "int32"
    else:
        fields["input_top_logprobs_val_flat"] = vals.reshape(-1).tolist()
        fields["input_top_logprobs_idx_flat"] = idx.reshape(-1).tolist()
    return fields


def _corrupt(payload: Any, kind: str) -> Any:
    """Apply a data fault to a /generate answer (first result object)."""
    first = payload[0] if isinstance(payload, list) else payload
    meta = first["meta_info"]
    if kind == "bad_b64" and "input_top_logprobs_val_flat_b64" in meta:
        meta["input_top_logprobs_val_flat_b64"] = "!!not*base64!!"
    elif kind == "nan" and "input_top_logprobs_val_flat_b64" in meta:
        vals = bytearray(base64.b64decode(meta["input_top_logprobs_val_flat_b64"]))
        vals[0:4] = bytes.fromhex("0000c07f")  # float32 NaN, little-endian
        meta["input_top_logprobs_val_flat_b64"] = base64.b64encode(bytes(vals)).decode()
    elif kind == "nan" and "output_token_logprobs" in meta:
        meta["output_token_logprobs"][0][0] = math.nan
    elif kind == "abort":  # what a pause_generation(mode="abort") does to a running request
        meta["finish_reason"] = {"type": "abort", "message": "Abort in waiting queue"}
    elif kind == "wrong_count":
        for key in ("input_token_logprobs", "output_token_logprobs"):
            if meta.get(key):
                meta[key] = meta[key][:-1]
    return payload


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, payload: Any, text: bool = False) -> None:
        data = (payload if isinstance(payload, bytes) else payload.encode()) if text else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if text else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _body(self) -> Any:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return json.loads(raw) if raw else {}

    def do_GET(self) -> None:
        self._dispatch(None)

    def do_POST(self) -> None:
        try:
            body = self._body()
        except json.JSONDecodeError as exc:
            return self._send(400, {"error": {"message": f"invalid JSON body: {exc}", "code": 400}})
        self._dispatch(body)

    def _dispatch(self, body: Any) -> None:
        state: ProtocolServer = self.server.state
        path = self.path.split("?")[0]
        if state.auth is not None:
            refused = state.auth.decide(self.command, path, self.headers.get("Authorization"))
            if refused is not None:
                return self._send(refused, {"error": "Unauthorized" if refused == 401 else "Forbidden"})
        if state.exit_after is not None and path == state.exit_after[0]:
            state.counts[path] = state.counts.get(path, 0) + 1
            if state.counts[path] >= state.exit_after[1]:
                print(f"exiting at call {state.counts[path]} of {path} at {time.time():.3f} (--exit-after)", flush=True)
                os._exit(3)
        fault = state.take_fault(path)
        if fault and fault.kind == "close":
            self.close_connection = True
            self.connection.close()
            return
        if fault and fault.kind == "delay":
            time.sleep(fault.delay_s)
        if fault and fault.kind == "status":
            return self._send(fault.status, {"error": {"message": "injected failure", "code": fault.status}})
        if fault and fault.kind == "garbage":
            return self._send(200, b'{"text": "", "meta_info": {"id": ', text=True)
        if path == "/generate":
            status, payload = state.generate(body if body is not None else {})
            if fault and status == 200:
                payload = _corrupt(payload, fault.kind)
            return self._send(status, payload)
        if path in ("/health", "/health_generate"):
            return self._send(503 if state.paused else 200, b"", text=True)
        if path in ("/model_info", "/get_model_info"):
            return self._send(200, state.model_info())
        if path in ("/server_info", "/get_server_info"):
            return self._send(200, state.server_info())
        if path == "/flush_cache":
            status, text = state.flush_cache()
            return self._send(status, text, text=True)
        status, payload = state.control(path, body)
        self._send(status, payload)


def main() -> None:
    """Stand-in for ``python -m sglang.launch_server``: same flags (unknown ones ignored)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--model-path", "--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--api-key")
    parser.add_argument("--admin-api-key")
    parser.add_argument("--refuse-weight-group", action="store_true")
    parser.add_argument("--exit-after", help="PATH:N")
    parser.add_argument("--stats-file")
    args, _ = parser.parse_known_args()
    keys = {}
    if args.config:  # SGLang reads its flags from a YAML file with --config; mopd puts the keys there
        import yaml

        keys = yaml.safe_load(Path(args.config).read_text()) or {}
    torch.set_num_threads(1)
    api = load_api_types()
    if api is None:
        sys.exit("sglang/api/v1/api_types.py is not installed")
    exit_after = None
    if args.exit_after:
        path, n = args.exit_after.rsplit(":", 1)
        exit_after = (path, int(n))
    engine = EmbeddedEngine.from_pretrained(args.model_path, name="protocol-server")
    server = ProtocolServer(engine, api, port=args.port, host=args.host, model_path=args.model_path,
                            launch_command=sys.argv, api_key=args.api_key or keys.get("api_key"),
                            admin_api_key=args.admin_api_key or keys.get("admin_api_key"),
                            refuse_weight_group=args.refuse_weight_group, exit_after=exit_after,
                            stats_file=args.stats_file)
    print(f"serving {args.model_path} at {server.url}", flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
