"""Weight sync from the Megatron student into engines and tracking teachers.

One 4-rank gloo spawn runs every layout (TP2xPP2, TP2xDP2, PP2xDP2, so every role: root, TP
gather, stage source, idle DP replica): the student trains 3 steps and syncs after each into an
embedded rollout engine, an EMA self-teacher and a recorder (one stream, three consumers). At
TP2xPP2 the same spawn also syncs into protocol-compatible SGLang servers over real weight-update
groups (gloo): from rank 0, from disk, and staged (one sender and group per pipeline stage), and
checks that consumer failures neither hang the other ranks nor starve the other consumers. The
pure checks (buckets, checksums, fan-out) run in the test process.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from dist_utils import full_logits, run_on_ranks

from mopd.config import ModelConfig, OptimizerConfig, ParallelConfig, StudentConfig, TrainConfig
from mopd.errors import EngineError
from mopd.types import TrainBatch
from mopd.sync import bucket_tensors, checksum, fan_out, tensor_bytes

pytestmark = pytest.mark.timeout(450)

VOCAB, STEPS, DECAY = 100, 3, 0.6
LAYOUTS = ((2, 2), (2, 1), (1, 2))  # on 4 ranks: TP2xPP2, TP2xDP2, PP2xDP2
WORLD, SGLANG_LAYOUT = 4, (2, 2)
IDS = torch.tensor([[1, 5, 17, 42, 99, 3, 64, 8, 23], [1, 77, 2, 9, 31, 50, 11, 0, 60]])


# ---------------------------------------------------------------------------------------- pure checks


def named(sizes: list[int]) -> list[tuple[str, torch.Tensor]]:
    return [(f"t{i}", torch.full((n,), float(i))) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("limit", [1, 16, 40, 64, 1000])
def test_buckets_respect_the_byte_limit_and_cover_every_tensor_once_in_order(limit):
    tensors = named([3, 1, 10, 4, 4, 2, 16, 5])  # fp32: 12, 4, 40, 16, 16, 8, 64, 20 bytes
    buckets = list(bucket_tensors(tensors, limit))
    flat = [item for b in buckets for item in b]
    assert [n for n, _ in flat] == [n for n, _ in tensors]
    assert all(a is b for (_, a), (_, b) in zip(flat, tensors))
    for b in buckets:
        size = sum(tensor_bytes(t) for _, t in b)
        assert size <= limit or len(b) == 1, f"bucket of {size} B over the {limit} B limit holds {len(b)} tensors"
    # Greedy: a bucket closes only when the next tensor would not fit.
    for b, nxt in zip(buckets, buckets[1:]):
        assert sum(tensor_bytes(t) for _, t in b) + tensor_bytes(nxt[0][1]) > limit


def test_bucket_limits_must_be_positive():
    with pytest.raises(ValueError, match="bucket_bytes must be positive, got 0"):
        list(bucket_tensors(named([1]), 0))


def test_checksums_are_equal_for_equal_tensors_and_differ_on_one_ulp_dtype_or_shape():
    a = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    assert checksum(a) == checksum(a.clone()) == checksum(a.t().contiguous().t())
    bumped = a.clone()
    bumped[2, 3] = torch.nextafter(bumped[2, 3], torch.tensor(float("inf")))
    assert checksum(bumped) != checksum(a)
    assert checksum(a.double()) != checksum(a)
    assert checksum(a.reshape(5, 4)) != checksum(a)
    assert checksum(a.bfloat16()) == checksum(a.bfloat16().float().bfloat16())


class Recorder:
    """A consumer that keeps float64 copies of what it was sent, per version."""

    def __init__(self, name: str = "recorder", fail_after: int | None = None, stop_after: int | None = None):
        self.name, self.fail_after, self.stop_after = name, fail_after, stop_after
        self.versions: dict[int, dict[str, torch.Tensor]] = {}
        self.threads: set[str] = set()

    def update_weights(self, named_tensors, version: int) -> None:
        got = self.versions.setdefault(version, {})
        self.threads.add(threading.current_thread().name)
        for i, (name, tensor) in enumerate(named_tensors):
            if self.fail_after is not None and i == self.fail_after:
                raise EngineError(f"{self.name}: refused {name!r}")
            if self.stop_after is not None and i == self.stop_after:
                return
            if name in got:
                raise AssertionError(f"{name} sent twice")
            got[name] = tensor.double().clone()


def test_fan_out_gives_every_consumer_the_whole_stream_from_one_pass():
    tensors = named([5, 7, 1, 30, 2, 2])
    pulled = []

    def stream():
        for item in tensors:
            pulled.append(item[0])
            yield item

    a, b = Recorder("a"), Recorder("b")
    fan_out(stream(), [a, b], version=3, bucket_bytes=32)
    assert pulled == [n for n, _ in tensors], "the stream must be read exactly once"
    for r in (a, b):
        assert list(r.versions[3]) == pulled
        assert all(torch.equal(r.versions[3][n], t.double()) for n, t in tensors)
    assert a.threads != b.threads, "each consumer loads in its own thread"


def test_a_failing_consumer_is_named_while_the_others_still_get_everything_and_the_stream_is_drained():
    tensors = named([4] * 10)
    pulled = []

    def stream():
        for item in tensors:
            pulled.append(item[0])
            yield item

    ok, bad, quits = Recorder("ok"), Recorder("bad", fail_after=2), Recorder("quits", stop_after=1)
    with pytest.raises(EngineError, match=r"bad: refused 't2'"):
        fan_out(stream(), [ok, bad, quits], version=1, bucket_bytes=16)
    assert len(pulled) == 10 and list(ok.versions[1]) == pulled
    with pytest.raises(EngineError, match="'quits' returned from update_weights before the stream ended"):
        fan_out(iter(tensors), [ok, quits], version=2, bucket_bytes=16)


def test_a_failing_stream_stops_every_consumer_with_its_error():
    def stream():
        yield "t0", torch.zeros(2)
        raise RuntimeError("gather broke")

    a, b = Recorder("a"), Recorder("b")
    with pytest.raises(RuntimeError, match="gather broke"):
        fan_out(stream(), [a, b], version=1, bucket_bytes=4)


# ---------------------------------------------------------------------------------------- the spawn


def student_config(tp: int, pp: int) -> StudentConfig:
    return StudentConfig(
        model=ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=64, vocab_size=VOCAB, make_vocab_size_divisible_by=64,
                          max_position_embeddings=64),
        parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp),
        optimizer=OptimizerConfig(lr=1e-2, use_distributed_optimizer=True),
        train=TrainConfig(steps=10, micro_batch_size=2),
    )


def micro_batches(step: int) -> list[TrainBatch]:
    """Two micro-batches of two 8-token rows, the same on every rank (every DP rank trains on it)."""
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
        zeros = torch.zeros(2, 8)
        out.append(TrainBatch(
            tokens=ids[:, :-1], position_ids=torch.arange(8).repeat(2, 1), targets=ids[:, 1:], loss_mask=torch.ones(2, 8),
            topk_ids=torch.zeros(2, 8, 1, dtype=torch.int32), topk_logprobs=torch.zeros(2, 8, 1), sampled_logprob=zeros,
            tail_logmass=zeros, behaviour_logprobs=zeros, teacher_index=torch.zeros(2, 8, dtype=torch.long),
            reward=torch.zeros(2)))
    return out


def cross_entropy(logits: torch.Tensor, batch: TrainBatch):
    from megatron.core import tensor_parallel

    loss = (tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch.targets) * batch.loss_mask).sum()
    return loss, {"tokens": batch.loss_mask.sum()}


def hf_model(model_cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """A randomly initialised HF model of the student's shape (never the student's weights)."""
    import transformers

    from mopd.hf.families import hf_config_from_model

    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**hf_config_from_model(model_cfg, dtype="float32"))
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def student_logits(chunks, layout) -> torch.Tensor | None:
    """[B, S, VOCAB] logits of the Megatron student (last stage; p2p between stages), else None."""
    from mopd.hf.gather import unwrap

    return full_logits(unwrap(chunks[0]).eval(), IDS, layout, VOCAB)


def engine_logits(engine) -> torch.Tensor:
    with torch.no_grad():
        return engine.model(IDS).logits.float()


def _worker(rank: int, world: int, tmp: str) -> dict:
    from mopd.parallel import destroy_parallel, init_parallel

    out = {}
    for tp, pp in LAYOUTS:
        layout = init_parallel(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp), seed=3)
        out[(tp, pp)] = _train_and_sync(layout, student_config(tp, pp), tmp, with_sglang=(tp, pp) == SGLANG_LAYOUT)
        destroy_parallel()
    return out


def _train_and_sync(layout, cfg: StudentConfig, tmp: str, *, with_sglang: bool) -> dict:
    from mopd.config import TeacherConfig, TeacherKind
    from mopd.data.tokenizer import build_char_tokenizer
    from mopd.rollout.embedded import EmbeddedEngine
    from mopd.student import build_model, build_optimizer, train_step
    from mopd.teachers.self_pi import SelfPITeacher
    from mopd.sync import WeightSync, tracking

    chunks = build_model(cfg, layout)
    optimizer, scheduler = build_optimizer(cfg, chunks)
    row: dict = {"reports": []}
    consumers = []
    if layout.rank == 0:
        rollout = EmbeddedEngine(hf_model(cfg.model, seed=1), eos_token_ids=[2], pad_token_id=0, name="rollout")
        ema_model = hf_model(cfg.model, seed=2)
        row["ema_init"] = {n: t.double().clone() for n, t in ema_model.state_dict().items()}
        ema = SelfPITeacher(TeacherConfig(name="ema", kind=TeacherKind.self_pi, ema_decay=DECAY),
                            EmbeddedEngine(ema_model, eos_token_ids=[2], pad_token_id=0, name="ema-engine"),
                            build_char_tokenizer(), initial_weights=ema_model.state_dict().items())
        recorder = Recorder()
        consumers = [rollout, *tracking([ema]), recorder]
    sync = WeightSync(chunks, cfg.model, layout, consumers, bucket_bytes=20_000, verify=True)
    for step in range(STEPS):
        train_step(chunks, optimizer, scheduler, micro_batches(step), cross_entropy, layout, step=step)
        row["reports"].append(sync.sync(version=step + 1))
    row["student_logits"] = student_logits(chunks, layout)
    if layout.rank == 0:
        row.update(rollout_logits=engine_logits(rollout), rollout_version=rollout.health().weight_version,
                   ema_state={n: t.clone() for n, t in ema.engine.model.state_dict().items()},
                   ema_version=ema.engine.weight_version, streamed=recorder.versions)
    if with_sglang:
        row.update(_sglang_cases(chunks, cfg, layout, tmp))
        row.update(_failure_cases(chunks, cfg, layout))
    return row


def _sglang_cases(chunks, cfg: StudentConfig, layout, tmp: str) -> dict:
    """Sync into protocol servers: rank 0 the sender of one group (distributed: the stage-start sync),
    rank 0 writing a folder (disk), and one group per pipeline stage (staged: the opd loop's
    ``rollout_weight_sync``, each stage's first rank sending its own layers to two servers)."""
    from mopd.sync import WeightSync
    from mopd.sync.stage_senders import rollout_weight_sync
    from mopd.sync.traffic import count_traffic
    from sglang_wheel import load_api_types

    api = load_api_types()
    row: dict = {"sglang_available": api is not None}
    if api is None:
        return row
    for mode, version in (("distributed", 11), ("disk", 12), ("staged", 13)):
        servers = [_start_server(cfg, api) for _ in range(2 if mode == "staged" else 1)] if layout.rank == 0 else []
        client = _client([s.url for s in servers], mode, cfg, tmp) if layout.rank == 0 else None
        records = [_record_updates(s) for s in servers]
        with count_traffic() as traffic:
            if mode == "distributed":
                sync = WeightSync(chunks, cfg.model, layout, [client] if client else [])
            else:
                sync = rollout_weight_sync(chunks, cfg.model, layout, [client] if client else [], client)
            sync.sync(version)
        row[f"{mode}_sent_by_broadcast"] = traffic.by_op.get("broadcast", [0, 0])[0]
        row[f"{mode}_staged"] = [c.name for c in sync.staged]
        sync.close()
        torch.distributed.barrier()
        if servers:
            row[mode] = {"calls": [list(s.calls) for s in servers], "updates": records,
                         "logits": [engine_logits(s.engine) for s in servers],
                         "health_version": client.health().weight_version,
                         "files": sorted(p.name for p in (Path(tmp) / "disk" / f"v{version}").glob("*"))}
            for s in servers:
                s.stop()
            client.close()
    return row


def _start_server(cfg: StudentConfig, api):
    from mopd.rollout.embedded import EmbeddedEngine
    from sglang_protocol_server import ProtocolServer

    return ProtocolServer(EmbeddedEngine(hf_model(cfg.model, seed=5), eos_token_ids=[2], pad_token_id=0), api).start()


def _client(urls: list[str], mode: str, cfg: StudentConfig, tmp: str):
    from mopd.config import SGLangConfig
    from mopd.rollout.sglang_client import SGLangEngine, WeightSyncOptions

    options = WeightSyncOptions(backend="gloo", master_address="127.0.0.1", bucket_bytes=20_000,
                                group_name=f"mopd-test-{mode}", disk_dir=f"{tmp}/disk", model=cfg.model,
                                disk_shard_bytes=30_000)
    return SGLangEngine(SGLangConfig(endpoints=urls, weight_sync="disk" if mode == "disk" else "distributed",
                                     request_timeout_s=60.0), name=f"sglang-{mode}", sync=options)


_UPDATE_CALLS = ("/init_weights_update_group", "/update_weights_from_distributed")


def _record_updates(server) -> list:
    """(path, body, start, end) of each control call. Like SGLang's scheduler, the server runs one
    weight-group call at a time, so two stages sending at once could deadlock two servers."""
    records, control, one_at_a_time = [], server.control, threading.Lock()

    def recording(path, body):
        if path not in _UPDATE_CALLS:
            records.append((path, body, time.monotonic(), time.monotonic()))
            return control(path, body)
        with one_at_a_time:
            start = time.monotonic()
            out = control(path, body)
            records.append((path, body, start, time.monotonic()))
            return out

    server.control = recording
    return records


class _Lossy:
    """An embedded engine that silently skips one tensor: verify must catch it."""

    def __init__(self, engine, skip: str):
        self.engine, self.skip, self.name, self.model = engine, skip, "lossy", engine.model

    def update_weights(self, named_tensors, version):
        self.engine.update_weights(((n, t) for n, t in named_tensors if n != self.skip), version)


class _StagedRecorder:
    """A staged consumer that records its calls; ``fail`` makes send_stage raise after two tensors."""

    def __init__(self, fail: bool):
        self.name, self.fail, self.calls = "staged-recorder", fail, []

    def begin_staged_update(self):
        self.calls.append("begin")

    def send_stage(self, named_tensors, version):
        for i, (name, _) in enumerate(named_tensors):
            if self.fail and i == 2:
                raise EngineError(f"server refused {name!r}")
        self.calls.append(f"send {version}")

    def end_staged_update(self, version):
        self.calls.append(f"end {version}")


def _failure_cases(chunks, cfg: StudentConfig, layout) -> dict:
    """Consumer failures on rank 0: a clear error there, every other rank finishes its sync."""
    from mopd.rollout.embedded import EmbeddedEngine
    from mopd.sync import WeightSync

    row: dict = {}
    cases = {
        "lossy": lambda: [_Lossy(EmbeddedEngine(hf_model(cfg.model, seed=6), eos_token_ids=[2], pad_token_id=0), "model.norm.weight")],
        "refusing": lambda: [EmbeddedEngine(hf_model(cfg.model, seed=7), eos_token_ids=[2], pad_token_id=0, name="intact"),
                             Recorder("refuser", fail_after=3)],
    }
    for version, (case, make) in enumerate(cases.items(), start=21):
        consumers = make() if layout.rank == 0 else []
        sync = WeightSync(chunks, cfg.model, layout, consumers, bucket_bytes=20_000, verify=True)
        try:
            row[f"{case}_report"] = sync.sync(version)
        except EngineError as exc:
            row[f"{case}_error"] = str(exc)
        if case == "refusing" and layout.rank == 0:
            row.update(intact_logits=engine_logits(consumers[0]), intact_version=consumers[0].weight_version)
    staged = _StagedRecorder(fail=layout.pp_rank == 1)
    try:
        WeightSync(chunks, cfg.model, layout, staged=[staged]).sync(31)
    except EngineError as exc:
        row["staged_error"] = str(exc)
    row["staged_calls"] = staged.calls
    return row


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_worker, WORLD, str(tmp_path_factory.mktemp("weight_sync")), timeout=420)


def _last_stage_logits(results: list[dict], layout) -> torch.Tensor:
    got = [r[layout]["student_logits"] for r in results if r[layout]["student_logits"] is not None]
    assert got, f"no rank returned the student's logits at {layout}"
    return got[-1]


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"tp{tp}_pp{pp}" for tp, pp in LAYOUTS])
def test_synced_embedded_engine_reproduces_the_trained_students_logits_and_version(results, layout):
    root = results[0][layout]
    student = _last_stage_logits(results, layout)
    assert student.std() > 0.1
    diff = (root["rollout_logits"] - student).abs().max().item()
    assert diff < 1e-4, f"max |engine - student| = {diff:.3g} at tp,pp={layout}"
    assert root["rollout_version"] == STEPS


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"tp{tp}_pp{pp}" for tp, pp in LAYOUTS])
def test_the_stream_holds_every_hf_tensor_once_with_its_shape_and_changes_every_step(results, layout):
    from mopd.hf.mapping import expected_hf_shapes

    expected = expected_hf_shapes(student_config(*layout).model)
    streamed = results[0][layout]["streamed"]
    assert sorted(streamed) == list(range(1, STEPS + 1))
    for version, tensors in streamed.items():
        assert {n: tuple(t.shape) for n, t in tensors.items()} == expected, f"version {version}"
    moved = [n for n in expected if not torch.equal(streamed[1][n], streamed[STEPS][n])]
    assert len(moved) == len(expected), f"weights that did not train: {set(expected) - set(moved)}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"tp{tp}_pp{pp}" for tp, pp in LAYOUTS])
def test_ema_self_teacher_holds_the_float64_ema_of_the_streamed_student_weights(results, layout):
    root = results[0][layout]
    reference = dict(root["ema_init"])
    for version in range(1, STEPS + 1):
        for name, w in root["streamed"][version].items():
            reference[name] = DECAY * reference[name] + (1 - DECAY) * w
    held = root["ema_state"]
    assert root["ema_version"] == STEPS
    worst = max((held[n].double() - reference[n]).abs().max().item() for n in reference)
    assert worst < 1e-6, f"max |teacher - float64 EMA| = {worst:.3g}"
    final = root["streamed"][STEPS]
    gap = max((held[n].double() - final[n]).abs().max().item() for n in final)
    assert gap > 1e-2, "the EMA teacher should lag the student, not copy it"


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"tp{tp}_pp{pp}" for tp, pp in LAYOUTS])
def test_each_rank_plays_its_role_and_rank_zero_streams_every_byte(results, layout):
    tp, pp = layout
    roles = [r[layout]["reports"][-1].role for r in results]
    assert roles == {(2, 2): ["root", "gather", "source", "gather"], (2, 1): ["root", "gather", "idle", "idle"],
                     (1, 2): ["root", "idle", "source", "idle"]}[layout]
    root = results[0][layout]["reports"][-1]
    model_bytes = sum(t.numel() * 4 for t in results[0][layout]["streamed"][STEPS].values())
    assert root.nbytes == model_bytes and root.consumers == ("rollout", "ema", "recorder")
    if pp == 2:
        sent = results[roles.index("source")][layout]["reports"][-1]
        assert 0 < sent.tensors < root.tensors and 0 < sent.nbytes < root.nbytes


def _sglang(results, mode: str) -> dict:
    root = results[0][SGLANG_LAYOUT]
    if not root["sglang_available"]:
        pytest.skip("sglang/api/v1/api_types.py not installed: pip install --no-deps sglang==0.5.23")
    return root[mode]


def _hf_bytes(names) -> int:
    from mopd.hf.mapping import expected_hf_shapes

    shapes = expected_hf_shapes(student_config(*SGLANG_LAYOUT).model)
    return sum(torch.Size(shapes[n]).numel() * 4 for n in names)


def _updates(got: dict, server: int = 0) -> list[dict]:
    return [b for p, b, _, _ in got["updates"][server] if p == "/update_weights_from_distributed"]


def test_sglang_distributed_sync_runs_the_refit_sequence_in_bounded_buckets_and_matches_the_student(results):
    got = _sglang(results, "distributed")
    calls = got["calls"][0]
    updates = calls.count("/update_weights_from_distributed")
    assert calls == ["/init_weights_update_group", "/pause_generation", "/flush_cache", "/begin_weight_update",
                     *["/update_weights_from_distributed"] * updates,
                     "/end_weight_update", "/flush_cache", "/continue_generation"]
    bodies = _updates(got)
    sizes = [sum(torch.Size(s).numel() * 4 for s in b["shapes"]) for b in bodies]
    assert updates >= 2 and all(s <= 20_000 or len(b["names"]) == 1 for s, b in zip(sizes, bodies))
    names = [n for b in bodies for n in b["names"]]
    from mopd.hf.mapping import expected_hf_shapes

    assert sorted(names) == sorted(expected_hf_shapes(student_config(*SGLANG_LAYOUT).model)) and len(set(names)) == len(names)
    assert {b["weight_version"] for b in bodies} == {"11"} and got["health_version"] == 11
    diff = (got["logits"][0] - _last_stage_logits(results, SGLANG_LAYOUT)).abs().max().item()
    assert diff < 1e-4, f"max |server - student| = {diff:.3g}"
    # rank 0 alone sends every byte: the whole model over its one group
    assert _hf_bytes(names) <= results[0][SGLANG_LAYOUT]["distributed_sent_by_broadcast"] <= _hf_bytes(names) + 4096


def test_sglang_disk_sync_writes_planned_shards_and_the_server_reloads_the_students_weights(results):
    got = _sglang(results, "disk")
    assert got["calls"][0] == ["/pause_generation", "/flush_cache", "/update_weights_from_disk", "/continue_generation"]
    shards = [f for f in got["files"] if f.endswith(".safetensors")]
    assert len(shards) >= 3 and all(f.startswith("model-0000") for f in shards), got["files"]
    assert "model.safetensors.index.json" in got["files"] and "config.json" in got["files"]
    assert got["health_version"] == 12
    diff = (got["logits"][0] - _last_stage_logits(results, SGLANG_LAYOUT)).abs().max().item()
    assert diff < 1e-4, f"max |server - student| = {diff:.3g}"
    assert results[0][SGLANG_LAYOUT]["disk_staged"] == [], "a disk sync is an in-process consumer on rank 0"


def test_verify_names_a_tensor_an_engine_did_not_load_and_other_ranks_finish(results):
    root = results[0][SGLANG_LAYOUT]
    assert "holds a different 'model.norm.weight'" in root["lossy_error"]
    assert [r[SGLANG_LAYOUT]["lossy_report"].role for r in results[1:]] == ["gather", "source", "gather"]


def test_a_refusing_consumer_is_named_and_the_other_engine_still_gets_the_whole_model(results):
    root = results[0][SGLANG_LAYOUT]
    assert "refuser: refused" in root["refusing_error"]
    diff = (root["intact_logits"] - _last_stage_logits(results, SGLANG_LAYOUT)).abs().max().item()
    assert diff < 1e-4 and root["intact_version"] == 22
    assert [r[SGLANG_LAYOUT]["refusing_report"].role for r in results[1:]] == ["gather", "source", "gather"]


def test_staged_sglang_sync_sends_each_pipeline_stage_from_its_own_rank_inside_one_session(results):
    from mopd.hf.mapping import expected_hf_shapes

    got = _sglang(results, "staged")
    assert [r[SGLANG_LAYOUT]["staged_staged"] for r in results] == [["sglang-staged"], [], ["sglang-staged-stage1"], []]
    student = _last_stage_logits(results, SGLANG_LAYOUT)
    for server, calls in enumerate(got["calls"]):
        calls = [c for c in calls if c != "/destroy_weights_update_group"]  # a stage sender's close()
        assert calls[:3] == ["/pause_generation", "/flush_cache", "/begin_weight_update"]
        assert calls[-3:] == ["/end_weight_update", "/flush_cache", "/continue_generation"]
        assert sorted(set(calls[3:-3])) == ["/init_weights_update_group", "/update_weights_from_distributed"]
        assert calls.count("/init_weights_update_group") == 2, "one weight-update group per pipeline stage"
        by_stage: dict[str, list[str]] = {}
        for b in _updates(got, server):
            by_stage.setdefault(b["group_name"], []).extend(b["names"])
        assert set(by_stage) == {"mopd-test-staged", "mopd-test-staged-stage1"}
        stage0, stage1 = by_stage["mopd-test-staged"], by_stage["mopd-test-staged-stage1"]
        assert "model.embed_tokens.weight" in stage0 and all(".layers.1." not in n for n in stage0)
        assert "lm_head.weight" in stage1 and all(".layers.0." not in n for n in stage1)
        assert sorted(stage0 + stage1) == sorted(expected_hf_shapes(student_config(*SGLANG_LAYOUT).model))
        diff = (got["logits"][server] - student).abs().max().item()
        assert diff < 1e-4, f"server {server}: max |server - student| = {diff:.3g}"
    assert got["health_version"] == 13
    # each stage source sent its own stage's bytes and nothing else; rank 0 never held stage 1's
    sent = [r[SGLANG_LAYOUT]["staged_sent_by_broadcast"] for r in results]
    for rank, names in ((0, stage0), (2, stage1)):
        assert _hf_bytes(names) <= sent[rank] <= _hf_bytes(names) + 4096, (rank, sent[rank], _hf_bytes(names))


def test_staged_stage_groups_take_turns_one_group_at_a_time_on_every_server(results):
    got = _sglang(results, "staged")
    for server, records in enumerate(got["updates"]):
        spans: dict[str, list[tuple[float, float]]] = {}
        for path, body, start, end in records:
            if path in _UPDATE_CALLS:
                spans.setdefault(body["group_name"], []).append((start, end))
        first, second = spans["mopd-test-staged"], spans["mopd-test-staged-stage1"]
        assert max(e for _, e in first) < min(s for s, _ in second), \
            f"server {server}: stage 1's group started before stage 0's finished"


def test_a_stage_that_fails_to_send_fails_every_rank_and_the_session_still_closes(results):
    rows = [r[SGLANG_LAYOUT] for r in results]
    for row in rows:
        assert "staged weight sync of version 31 failed on rank 2: EngineError: server refused" in row["staged_error"]
    assert [row["staged_calls"] for row in rows] == [["begin", "send 31", "end 31"], [], [], []]


def test_a_stage_sender_reaches_every_server_with_the_same_keys_over_its_own_group_on_its_own_host():
    from mopd.config import SGLangConfig
    from mopd.rollout.sglang_client import ApiKeys, SGLangEngine, WeightSyncOptions
    from mopd.sync.stage_senders import StageSenderSpec

    keys = ApiKeys("api-key", "admin-key", "test")
    config = SGLangConfig(endpoints=["http://router:30000"], weight_sync_address="10.0.0.5")
    engine = SGLangEngine(config, name="rollout", worker_urls=["http://n1:30000", "http://n2:30000"], keys=keys,
                          sync=WeightSyncOptions(master_address="10.0.0.5", master_port=29600, group_name="mopd_ws"))
    local = SGLangEngine(config, name="rollout", worker_urls=["http://n1:30000"], keys=keys,
                         sync=WeightSyncOptions(master_address="127.0.0.1"))
    try:
        sender = StageSenderSpec.of(engine).sender(2)
        assert sender.worker_urls == sender.endpoints == ["http://n1:30000", "http://n2:30000"]
        assert sender.keys is keys and sender.name == "rollout-stage2"
        assert (sender.sync.group_name, sender.sync.master_port) == ("mopd_ws-stage2", 29602)
        # rank 0's address is another node's: the sender's own host name is used ("" = socket.gethostname())
        assert sender.sync.master_address == "" and sender.config.weight_sync_address == ""
        one_machine = StageSenderSpec.of(local).sender(1)
        assert one_machine.sync.master_address == "127.0.0.1" and one_machine.sync.master_port == 0
        one_machine.close()
        sender.close()
    finally:
        engine.close()
        local.close()
