"""SGLangEngine through the real sgl-router 0.3.2 binary in front of two protocol servers, keys on.

What the router does to mopd's requests (gpu_path_review.md items 1 and 3): it reads one
``sampling_params`` object per request (a batch list is a 422), re-serialises the body (the flat
top-K flags are dropped, so scores come back as nested lists), requires its own ``--api-key`` of
clients and forwards that key to the workers, and has no weight-update routes (404).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx
import pytest
import torch

from mopd.config import SamplingConfig, SGLangConfig
from mopd.rollout.embedded import EmbeddedEngine
from mopd.rollout.engine import ScoreRequest
from mopd.rollout.sglang_client import ApiKeys, AuthError, SGLangEngine, WeightSyncOptions
from mopd.types import Prompt
from sglang_protocol_server import ProtocolServer, tiny_llama
from sglang_wheel import load_api_types

API = load_api_types()
pytestmark = [pytest.mark.timeout(180), pytest.mark.skipif(API is None, reason="keys need the sglang wheel's auth.py")]
KEYS = ApiKeys("router-test-api-key-0123456789", "router-test-admin-key-9876543210", "test")


def engine(name: str) -> EmbeddedEngine:
    return EmbeddedEngine(tiny_llama(seed=0), eos_token_ids=[1], pad_token_id=0, name=name)


@pytest.fixture(scope="module")
def fleet():
    torch.set_num_threads(1)
    workers = [ProtocolServer(engine(f"w{i}"), API, api_key=KEYS.api, admin_api_key=KEYS.admin).start() for i in range(2)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    router = subprocess.Popen(
        [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
         "--worker-urls", *[w.url for w in workers], "--policy", "round_robin", "--api-key", KEYS.api,
         "--log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert router.poll() is None and time.monotonic() < deadline, "sgl-router did not come up"
            time.sleep(0.3)
        yield url, workers
    finally:
        router.terminate()
        router.wait(timeout=30)
        for w in workers:
            w.stop()
        assert all(w.violations == [] for w in workers)


def prompts() -> list[Prompt]:
    g = torch.Generator().manual_seed(2)
    return [Prompt(index=i, ids=torch.randint(3, 128, (n,), generator=g), text="", domain="d") for i, n in enumerate((3, 5, 4, 6))]


def client(router: str, workers, keys: ApiKeys = KEYS) -> SGLangEngine:
    sync = WeightSyncOptions(backend="gloo", master_address="127.0.0.1", group_name="mopd-router-test")
    return SGLangEngine(SGLangConfig(endpoints=[router], worker_urls=[w.url for w in workers], request_timeout_s=60),
                        name="rollout", keys=keys, sync=sync, backoff_s=0.01)


def test_generation_and_scoring_go_through_the_router_and_weights_to_every_worker(fleet):
    router, workers = fleet
    c = client(router, workers)
    reference = engine("reference")
    try:
        before = [w.generate_calls for w in workers]
        sampling = SamplingConfig(temperature=0.0, max_new_tokens=4)
        got = c.generate(prompts(), sampling)
        assert [r.response_ids.tolist() for r in got] == [r.response_ids.tolist() for r in reference.generate(prompts(), sampling)]
        assert all(w.generate_calls > b for w, b in zip(workers, before))  # round robin reached both
        g = torch.Generator().manual_seed(1)
        weights = [(n, torch.randn(t.shape, generator=g) * 0.2) for n, t in list(reference.model.state_dict().items())[:3]]
        c.update_weights(weights, version=5)
        reference.update_weights(weights, version=5)
        assert all(w.calls.count("/update_weights_from_distributed") == 1 for w in workers)
        req = ScoreRequest(ids=torch.arange(3, 15), response_start=6)
        got, want = c.score([req], top_k=4)[0], reference.score([req], top_k=4)[0]  # nested top-K after the router
        assert torch.equal(got.topk_ids, want.topk_ids) and torch.allclose(got.topk_logprobs, want.topk_logprobs, atol=1e-5)
    finally:
        c.close()


def test_the_router_rejects_a_batched_sampling_params_list_and_has_no_weight_routes(fleet):
    router, _ = fleet
    headers = KEYS.header("/generate")
    batch = {"input_ids": [[3, 4], [5, 6]], "sampling_params": [{"max_new_tokens": 1}, {"max_new_tokens": 1}]}
    resp = httpx.post(f"{router}/generate", json=batch, headers=headers, timeout=30, trust_env=False)
    assert resp.status_code == 422 and "sampling_params" in resp.text
    resp = httpx.post(f"{router}/init_weights_update_group", json={}, headers=headers, timeout=30, trust_env=False)
    assert resp.status_code == 404


@pytest.mark.parametrize("keys,sent", [(ApiKeys(None, None), "no key"), (ApiKeys("wrong", None, "$WRONG"), "the API key")])
def test_the_router_refuses_a_missing_or_wrong_key_with_a_clear_error(fleet, keys, sent):
    router, workers = fleet
    c = client(router, workers, keys)
    try:
        with pytest.raises(AuthError, match=rf"{router}/generate refused the request's key: HTTP 401 .* sent {sent}"):
            c.generate(prompts()[:1], SamplingConfig(max_new_tokens=2))
    finally:
        c.close()
