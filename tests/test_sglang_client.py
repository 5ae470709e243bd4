"""SGLangEngine against the protocol server (with the sglang wheel, SGLang's own api_types check every
request and answer; without it the fault and retry tests still run, schema checks off).

The server runs EmbeddedEngine on a tiny random Llama; a second EmbeddedEngine with identical
weights is the reference the client's results are compared with.
"""

from __future__ import annotations

import os
import re
import socket

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx
import pytest
import torch

from mopd.config import SamplingConfig, SGLangConfig
from mopd.errors import EngineError
from mopd.rollout import sglang_format as fmt
from mopd.rollout.embedded import EmbeddedEngine
from mopd.rollout.engine import ScoreRequest
from mopd.rollout.sglang_client import ApiKeys, AuthError, CallTimeout, SGLangEngine, WeightSyncOptions
from mopd.teachers.transport import pack, unpack
from mopd.types import Prompt
from sglang_protocol_server import Fault, ProtocolServer, tiny_llama
from sglang_wheel import load_api_types

API = load_api_types()
needs_schema = pytest.mark.skipif(
    API is None, reason="sglang/api/v1/api_types.py not installed: pip install --no-deps sglang==0.5.23"
)


def make_engine(name: str) -> EmbeddedEngine:
    return EmbeddedEngine(tiny_llama(seed=0), eos_token_ids=[1], pad_token_id=0, name=name)


@pytest.fixture(scope="module")
def server():
    torch.set_num_threads(1)
    srv = ProtocolServer(make_engine("server"), API).start()
    yield srv
    srv.stop()
    assert srv.violations == [], "the client sent (or the server built) payloads SGLang's schema rejects"


@needs_schema
def test_the_server_validates_with_sglangs_schema(server):
    assert server.api is not None  # so the violations check of the fixture above is a real schema check


@pytest.fixture(scope="module")
def reference() -> EmbeddedEngine:
    return make_engine("reference")


@pytest.fixture
def server_reset(server):
    server.faults.clear()
    server.calls.clear()
    yield server
    server.faults.clear()


def client_for(url: str, **overrides) -> SGLangEngine:
    cfg = dict(endpoints=[url], max_in_flight=4, retries=2, request_timeout_s=20.0)
    sync = overrides.pop("sync", None)
    cfg.update(overrides)
    return SGLangEngine(SGLangConfig(**cfg), name="teacher-a", backoff_s=0.01, sync=sync)


@pytest.fixture
def client(server_reset):
    c = client_for(server_reset.url)
    yield c
    c.close()


def score_requests() -> list[ScoreRequest]:
    g = torch.Generator().manual_seed(9)
    return [ScoreRequest(ids=torch.randint(3, 128, (n,), generator=g), response_start=s) for n, s in ((10, 4), (7, 1), (12, 9), (5, 5), (9, 3))]


def prompts() -> list[Prompt]:
    g = torch.Generator().manual_seed(4)
    return [Prompt(index=10 + i, ids=torch.randint(3, 128, (n,), generator=g), text="", domain="math") for i, n in enumerate((4, 7, 2))]


def assert_same_scores(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g.topk_ids, w.topk_ids)
        assert torch.allclose(g.topk_logprobs, w.topk_logprobs, atol=1e-5)
        assert torch.allclose(g.sampled_logprob, w.sampled_logprob, atol=1e-5)
        assert torch.allclose(g.tail_logmass, w.tail_logmass, atol=1e-4)
        # What reaches the trainer: bf16 after the transport.
        gb, wb = unpack(pack(g)), unpack(pack(w))
        assert torch.allclose(gb.topk_logprobs.float(), wb.topk_logprobs.float(), atol=1e-3, rtol=0)


def test_scoring_through_the_client_equals_the_embedded_engine(client, reference):
    reqs = score_requests()
    got = client.score(reqs, top_k=8)
    assert [s.num_tokens for s in got] == [6, 6, 3, 0, 6]
    assert all(s.teacher == "teacher-a" for s in got)
    assert_same_scores(got, reference.score(reqs, top_k=8))


@pytest.mark.parametrize("flat,b64", [(False, False), (True, False)])
def test_nested_and_plain_flat_top_logprobs_parse_to_the_same_scores(server_reset, reference, flat, b64):
    reqs = score_requests()[:2]
    got = []
    for r in reqs:
        payload = fmt.score_payload(r, 5) | {"return_flat_raw_top_logprobs": flat, "return_flat_raw_top_logprobs_b64": b64}
        body = httpx.post(f"{server_reset.url}/generate", json=payload, timeout=20).json()
        assert ("input_top_logprobs" in body["meta_info"]) == (not flat)
        got.append(fmt.parse_scores(body, r, 5, "reference", "test"))
    assert_same_scores(got, reference.score(reqs, top_k=5))


@pytest.mark.parametrize("sampling", [
    SamplingConfig(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=8, seed=3, n=2),
    SamplingConfig(temperature=0.0, max_new_tokens=6, n=1, stop_token_ids=[5]),
])
def test_generation_through_the_client_matches_the_embedded_engine_with_the_same_seed(client, reference, sampling):
    got, want = client.generate(prompts(), sampling), reference.generate(prompts(), sampling)
    assert [r.prompt_index for r in got] == [r.prompt_index for r in want]
    for g, w in zip(got, want):
        assert g.response_ids.tolist() == w.response_ids.tolist()
        assert g.finish == w.finish
        assert torch.allclose(g.behaviour_logprobs, w.behaviour_logprobs, atol=1e-5)


@needs_schema
def test_sglangs_contract_gate_rejects_unknown_sampling_keys_and_the_client_never_sends_them(server_reset):
    bad = {"input_ids": [3, 4], "sampling_params": {"max_tokens": 3}}
    resp = httpx.post(f"{server_reset.url}/generate", json=bad, timeout=20)
    assert resp.status_code == 400 and "unknown field `max_tokens`" in resp.json()["error"]
    server_reset.violations.remove(next(v for v in server_reset.violations if "max_tokens" in v))


def test_no_more_than_max_in_flight_calls_reach_the_server_at_once(server_reset, reference):
    server_reset.inject(Fault("delay", delay_s=0.05, times=100))
    server_reset.max_active = 0
    c = SGLangEngine(SGLangConfig(endpoints=[server_reset.url], max_in_flight=2))
    try:
        reqs = score_requests() * 2
        assert_same_scores(c.score(reqs, top_k=4), reference.score(reqs, top_k=4))
    finally:
        c.close()
    assert 1 <= server_reset.max_active <= 2


def test_a_socket_closed_mid_batch_is_retried_and_scores_stay_correct(server_reset, client, reference):
    server_reset.inject(Fault("close", skip=1, times=1))
    reqs = score_requests()
    assert_same_scores(client.score(reqs, top_k=8), reference.score(reqs, top_k=8))
    assert server_reset.faults[0].times == 0


def test_a_server_that_keeps_dropping_connections_ends_in_an_engine_error_after_bounded_retries(server_reset, client):
    server_reset.inject(Fault("close", times=100))
    with pytest.raises(EngineError, match=r"/generate: unreachable or connection dropped .* \(after 3 attempt\(s\)\)"):
        client.score(score_requests()[:1], top_k=4)
    assert server_reset.faults[0].times == 97


@pytest.mark.parametrize("seed", [None, 7])
def test_generation_is_never_retried_seeded_or_not(server_reset, client, seed):
    """SGLang 0.5.23 ignores sampling_seed without --enable-deterministic-inference: a second try
    would not draw the same samples, so a generation is never treated as idempotent."""
    server_reset.inject(Fault("close", times=100))
    with pytest.raises(EngineError, match=r"after 1 attempt\(s\)"):
        client.generate(prompts()[:1], SamplingConfig(max_new_tokens=4, seed=seed))
    assert server_reset.faults[0].times == 99


def test_the_default_http_timeout_fits_a_70b_generation_step():
    assert SGLangConfig().request_timeout_s >= 3600


@pytest.mark.parametrize("call", ["score", "generate"])
def test_a_timed_out_call_names_the_endpoint_and_is_not_retried(server_reset, call):
    server_reset.inject(Fault("delay", delay_s=1.5, times=5))
    c = client_for(server_reset.url, request_timeout_s=0.3, retries=3)  # retries would apply to a dropped connection
    try:
        with pytest.raises(CallTimeout, match=rf"{server_reset.url}/generate: no answer within the 0.3 s timeout"):
            if call == "score":
                c.score(score_requests()[:1], top_k=4)
            else:
                c.generate(prompts()[:1], SamplingConfig(max_new_tokens=2, seed=1))
    finally:
        c.close()
    assert server_reset.faults[0].times == 4  # one call reached the server


def test_a_bad_parameter_gets_the_servers_400_message_and_no_retry(server_reset, client):
    bad = SamplingConfig(max_new_tokens=-1, seed=1)  # built directly, so config validation did not run
    with pytest.raises(EngineError, match="refused the request: HTTP 400: max_new_tokens must be >= 0"):
        client.generate(prompts()[:1], bad)


@pytest.mark.parametrize("kind,message", [
    ("garbage", "answered malformed JSON"),
    ("bad_b64", "input_top_logprobs_val_flat_b64 is not valid base64"),
    ("nan", "non-finite top-K logprob at response position 0"),
    ("abort", "the server aborted the scoring request \\('Abort in waiting queue'\\)"),
    ("wrong_count", r"6 input_token_logprobs for 6 response tokens \(expected 7 with the null first entry\)"),
])
def test_malformed_answers_are_engine_errors_never_empty_scores(server_reset, client, kind, message):
    server_reset.inject(Fault(kind, times=1))
    with pytest.raises(EngineError, match=message):
        client.score(score_requests()[:1], top_k=4)


def test_nan_behaviour_logprobs_are_rejected(server_reset, client):
    server_reset.inject(Fault("nan", times=1))
    with pytest.raises(EngineError, match=r"output_token_logprobs\[0\] is nan"):
        client.generate(prompts()[:1], SamplingConfig(max_new_tokens=3, seed=1))


def test_an_unreachable_server_is_an_engine_error_naming_it():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = client_for(f"http://127.0.0.1:{port}", retries=1)
    try:
        with pytest.raises(EngineError, match=rf"http://127.0.0.1:{port}/generate: unreachable"):
            c.score(score_requests()[:1], top_k=4)
        health = c.health()
        assert not health.ok and f"127.0.0.1:{port}/health" in health.detail
    finally:
        c.close()


def test_idempotent_chunks_fail_over_from_a_dead_endpoint_to_a_live_one(server_reset, reference):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    c = SGLangEngine(SGLangConfig(endpoints=[dead, server_reset.url], retries=0, max_in_flight=2))
    try:
        reqs = score_requests()
        assert_same_scores(c.score(reqs, top_k=4), reference.score(reqs, top_k=4))
        with pytest.raises(EngineError, match=f"{dead}/generate: unreachable"):
            c.generate(prompts(), SamplingConfig(max_new_tokens=2, seed=1))  # generation: not retried elsewhere
    finally:
        c.close()


def new_weights(engine: EmbeddedEngine, seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    sd = engine.model.state_dict()
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight"]
    return [(n, torch.randn(sd[n].shape, generator=g) * 0.2) for n in names]


def test_distributed_weight_update_runs_the_sglang_sequence_and_changes_the_scores(server_reset, reference):
    sync = WeightSyncOptions(backend="gloo", master_address="127.0.0.1", bucket_bytes=20_000)
    c = client_for(server_reset.url, sync=sync)
    try:
        before = c.score(score_requests(), top_k=8)
        weights = new_weights(reference, seed=1)
        c.update_weights(weights, version=7)
        reference.update_weights(weights, version=7)
        assert server_reset.calls == [
            "/init_weights_update_group", "/pause_generation", "/flush_cache", "/begin_weight_update",
            "/update_weights_from_distributed", "/update_weights_from_distributed",
            "/end_weight_update", "/flush_cache", "/continue_generation",
        ]
        after = c.score(score_requests(), top_k=8)
        assert_same_scores(after, reference.score(score_requests(), top_k=8))
        assert not torch.allclose(after[0].topk_logprobs, before[0].topk_logprobs)
        assert c.health().weight_version == 7 and c.health().ok
    finally:
        c.close()


def test_a_refused_weight_update_names_the_weight_and_resumes_generation(server_reset):
    sync = WeightSyncOptions(backend="gloo", master_address="127.0.0.1")
    c = client_for(server_reset.url, sync=sync)
    try:
        with pytest.raises(EngineError, match="unknown weight 'model.layers.7.mlp.up_proj.weight'"):
            c.update_weights([("model.layers.7.mlp.up_proj.weight", torch.zeros(3))], version=8)
        assert server_reset.calls[-1] == "/continue_generation" and not server_reset.paused
    finally:
        c.close()


def test_a_server_refusing_a_bucket_fails_the_update_at_once_and_the_group_is_not_reused(server_reset, reference):
    # Its own group name: a broadcast may stay blocked in the broken group, which is then left in place.
    sync = WeightSyncOptions(backend="gloo", master_address="127.0.0.1", timeout_s=3, group_name="mopd-refused-bucket")
    c = client_for(server_reset.url, sync=sync)
    try:
        server_reset.inject(Fault("status", path="/update_weights_from_distributed", status=400))
        with pytest.raises(EngineError, match="update_weights_from_distributed refused the request: HTTP 400: injected"):
            c.update_weights(new_weights(reference, seed=3), version=11)
        assert not server_reset.paused
        with pytest.raises(EngineError, match="weight-update group is unusable"):
            c.update_weights(new_weights(reference, seed=3), version=12)
    finally:
        c.close()


def test_disk_weight_update_writes_safetensors_shards_and_reloads_them(server_reset, reference, tmp_path):
    from mopd.hf.families import model_config_from_hf

    model = model_config_from_hf(reference.model.config.to_dict())
    c = client_for(server_reset.url, weight_sync="disk",
                   sync=WeightSyncOptions(disk_dir=str(tmp_path), model=model, disk_shard_bytes=40_000))
    try:
        g = torch.Generator().manual_seed(2)
        weights = [(n, torch.randn(t.shape, generator=g) * 0.2) for n, t in reference.model.state_dict().items()]
        c.update_weights(weights, version=9)
        reference.update_weights(weights, version=9)
        assert server_reset.calls == ["/pause_generation", "/flush_cache", "/update_weights_from_disk", "/continue_generation"]
        shards = sorted(p.name for p in (tmp_path / "v9").glob("*.safetensors"))
        assert len(shards) > 1 and (tmp_path / "v9" / "model.safetensors.index.json").is_file(), shards
        assert_same_scores(c.score(score_requests(), top_k=8), reference.score(score_requests(), top_k=8))
        assert c.health().weight_version == 9
    finally:
        c.close()


def test_health_reports_a_paused_server_as_not_ok(server_reset, client):
    assert client.health().ok
    server_reset.paused = True
    try:
        health = client.health()
        assert not health.ok and "HTTP 503" in health.detail
    finally:
        server_reset.paused = False


# ---------------------------------------------------------------------- keys (SGLang 0.5.23's auth rules)

API_KEY, ADMIN_KEY = "api-key-for-tests-0123", "admin-key-for-tests-4567"


@pytest.fixture(scope="module")
def keyed_server():
    srv = ProtocolServer(make_engine("keyed"), API, api_key=API_KEY, admin_api_key=ADMIN_KEY).start()
    yield srv
    srv.stop()


def keyed_client(url: str, keys: ApiKeys, group: str) -> SGLangEngine:
    sync = WeightSyncOptions(backend="gloo", master_address="127.0.0.1", group_name=group)
    return SGLangEngine(SGLangConfig(endpoints=[url], retries=2, request_timeout_s=20.0), name="keyed", keys=keys,
                        backoff_s=0.01, sync=sync)


@needs_schema
def test_the_protocol_server_applies_sglangs_auth_levels(keyed_server):
    """Open health, the api key on /generate and /model_info, only the admin key on weight endpoints."""
    def status(method, path, key=None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, f"{keyed_server.url}{path}", headers=headers, json={}, timeout=20).status_code

    assert status("GET", "/health") == 200
    assert status("GET", "/model_info") == 401 and status("GET", "/model_info", API_KEY) == 200
    assert status("POST", "/pause_generation", API_KEY) == 401  # admin endpoints refuse the api key
    assert status("POST", "/pause_generation", ADMIN_KEY) == 200 and status("POST", "/continue_generation", ADMIN_KEY) == 200
    assert status("POST", "/init_weights_update_group") == 401


@needs_schema
def test_the_client_sends_the_admin_key_exactly_where_sglang_requires_it():
    from sglang_wheel import endpoint_auth_levels

    from mopd.rollout.sglang_client import ADMIN_PATHS

    levels = endpoint_auth_levels()
    assert {p for p in ADMIN_PATHS if levels.get(p) == "admin_optional"} == ADMIN_PATHS
    assert "/generate" not in levels and "/model_info" not in levels  # normal level: the api key


@needs_schema
def test_with_the_keys_the_client_generates_scores_and_updates_weights(keyed_server, reference):
    c = keyed_client(keyed_server.url, ApiKeys(API_KEY, ADMIN_KEY, "test"), "mopd-keyed")
    try:
        assert len(c.generate(prompts()[:2], SamplingConfig(max_new_tokens=3))) == 2
        c.update_weights(new_weights(reference, seed=4), version=3)
        assert c.health().ok and c.health().weight_version == 3
    finally:
        c.close()


@needs_schema
@pytest.mark.parametrize("keys,sent", [
    (ApiKeys(None, None), "no key"),
    (ApiKeys("wrong", "wrong-admin", "$WRONG"), "the API key ($WRONG)"),
])
def test_a_missing_or_wrong_key_is_a_clear_error_naming_the_server_and_not_retried(keyed_server, keys, sent):
    c = keyed_client(keyed_server.url, keys, "mopd-unkeyed")
    keyed_server.calls.clear()
    try:
        with pytest.raises(AuthError, match=rf"{keyed_server.url}/generate refused the request's key: HTTP 401 .* "
                                             rf"sent {re.escape(sent)}: the key is missing or wrong"):
            c.score(score_requests()[:1], top_k=4)
        with pytest.raises(AuthError, match=r"/init_weights_update_group refused the request's key: HTTP 401"):
            c.update_weights([("lm_head.weight", torch.zeros(1))], version=1)
    finally:
        c.close()
    assert keyed_server.calls == []  # refused before any handler ran, once


def test_keys_come_from_the_environment_variables_the_config_names(monkeypatch):
    monkeypatch.setenv("MY_KEY", "k1")
    monkeypatch.delenv("MY_ADMIN_KEY", raising=False)
    cfg = SGLangConfig(api_key_env="MY_KEY", admin_api_key_env="MY_ADMIN_KEY")
    keys = ApiKeys.from_env(cfg)
    assert (keys.api, keys.admin, keys.source) == ("k1", None, "$MY_KEY")
    fresh = ApiKeys.generate(cfg)  # launch=true: what is not set is generated for the job
    assert fresh.api == "k1" and fresh.admin and len(fresh.admin) >= 32 and fresh.admin != ApiKeys.generate(cfg).admin
    assert "k1" not in repr(fresh) and fresh.admin not in repr(fresh)
    assert keys.header("/generate") == {"Authorization": "Bearer k1"}


# ---------------------------------------------------------------------- the weight-update group's life

def test_a_refused_weight_group_init_fails_at_once_not_after_the_rendezvous_timeout(server_reset):
    server_reset.refuse_weight_group = True
    sync = WeightSyncOptions(backend="gloo", master_address="127.0.0.1", timeout_s=600, group_name="mopd-refused-init")
    c = client_for(server_reset.url, sync=sync)
    try:
        with pytest.raises(EngineError, match=rf"{server_reset.url}/init_weights_update_group refused the request: "
                                             "HTTP 400: Failed to initialize custom process group"):
            c.update_weights(new_weights(make_engine("x"), seed=1), version=1)  # the test's timeout bounds a hang
    finally:
        server_reset.refuse_weight_group = False
        c.close()


def test_close_destroys_the_weight_group_on_the_server_so_a_new_engine_can_create_it_again(server_reset, reference):
    sync = WeightSyncOptions(backend="gloo", master_address="127.0.0.1", group_name="mopd-recreated")
    first = client_for(server_reset.url, sync=sync)
    first.update_weights(new_weights(reference, seed=5), version=1)
    second = client_for(server_reset.url, sync=sync)
    try:  # while the first holds it, the name is taken (torch refuses duplicate group names)
        with pytest.raises(EngineError, match="group name mopd-recreated has already been created"):
            second.update_weights(new_weights(reference, seed=6), version=2)
    finally:
        second.close()
    first.close()
    assert "/destroy_weights_update_group" in server_reset.calls and "mopd-recreated" not in server_reset.groups
    third = client_for(server_reset.url, sync=sync)
    try:
        weights = new_weights(reference, seed=6)
        third.update_weights(weights, version=2)
        reference.update_weights(weights, version=2)
        assert_same_scores(third.score(score_requests(), top_k=8), reference.score(score_requests(), top_k=8))
    finally:
        third.close()


def test_an_engine_on_its_own_endpoints_does_not_inherit_the_rollout_workers():
    cfg = SGLangConfig(endpoints=["http://router:1"], worker_urls=["http://w1:2", "http://w2:2"])
    rollout, teacher = SGLangEngine(cfg), SGLangEngine(cfg, name="teacher", endpoints=["http://teacher:3"])
    try:
        assert rollout.worker_urls == ["http://w1:2", "http://w2:2"] and teacher.worker_urls == ["http://teacher:3"]
    finally:
        rollout.close()
        teacher.close()
