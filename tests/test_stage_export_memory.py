"""Stage-end HF export streams: exporting a ~440 MB student never holds a copy of the model.

``Student.export_hf`` (what every sft/opd stage does at its end) runs in a fresh gloo rank on a
Megatron student of 110M parameters (fp32: 442 MB). A sampling thread records the rank's RSS every
2 ms; the peak increase over the RSS just before the export must stay within 3x the largest tensor
group (the 64 MiB embedding) and far below the model's size -- the old path built a randomly
initialised fp32 transformers model of the whole student first (+1x the model, 280 GB at 70B).
The folder must then hold every tensor with the student's values (independent of the mapping for
tensors the mapping only copies: embeddings, norms, down projections).
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

from mopd.config import Family, ModelConfig, ParallelConfig, StudentConfig
from tests.dist_utils import run_on_ranks

pytestmark = pytest.mark.timeout(300)

MODEL = ModelConfig(family=Family.llama, num_layers=6, hidden_size=1024, num_attention_heads=8, num_query_groups=8,
                    ffn_hidden_size=2816, vocab_size=16384, tie_word_embeddings=False)


def _export_and_measure(rank: int, world: int, out: str) -> dict:
    import psutil

    from mopd.parallel import destroy_parallel, init_parallel
    from mopd.stages.student import Student
    from mopd.student import build_model

    cfg = StudentConfig(model=MODEL)
    layout = init_parallel(ParallelConfig(), seed=0)
    chunks = build_model(cfg, layout, wrap_ddp=False)
    student = Student(cfg, layout, chunks, optimizer=None, scheduler=None)
    params = {n: p.detach().clone() for n, p in chunks[0].named_parameters()
              if n.endswith(("word_embeddings.weight", "layers.5.mlp.linear_fc2.weight", "final_layernorm.weight"))}
    model_bytes = sum(p.numel() * p.element_size() for p in chunks[0].parameters())
    proc, peak, stop = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    time.sleep(0.05)
    base = peak[0] = proc.memory_info().rss
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    student.export_hf(__import__("pathlib").Path(out), tokenizer=None)
    time.sleep(0.05)
    stop.set()
    thread.join()
    destroy_parallel()
    return {"increase": peak[0] - base, "model_bytes": model_bytes, "params": params}


def test_stage_end_export_streams_within_a_small_multiple_of_the_largest_tensor(tmp_path, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(2**20))  # freed large tensors go back to the OS at once
    out = tmp_path / "hf"
    (result,) = run_on_ranks(_export_and_measure, 1, str(out), timeout=240)
    mib, largest = 2**20, MODEL.vocab_size * MODEL.hidden_size * 4
    assert result["model_bytes"] > 300 * 2**20
    print(f"model {result['model_bytes'] / mib:.0f} MiB, largest tensor {largest / mib:.0f} MiB, "
          f"export RSS increase {result['increase'] / mib:.0f} MiB")
    assert result["increase"] < 3 * largest, f"export held {result['increase'] / mib:.0f} MiB"

    from mopd.hf.mapping import expected_hf_shapes
    from mopd.hf.stream import HFReader

    reader = HFReader(out)
    assert set(reader.names()) == set(expected_hf_shapes(MODEL))
    expect = {"model.embed_tokens.weight": "embedding.word_embeddings.weight",
              "model.layers.5.mlp.down_proj.weight": "decoder.layers.5.mlp.linear_fc2.weight",
              "model.norm.weight": "decoder.final_layernorm.weight"}
    for hf_name, megatron_name in expect.items():
        got = reader.get(hf_name)
        want = result["params"][megatron_name][: got.shape[0]]  # the embedding's padded rows are dropped
        assert torch.equal(got, want), hf_name
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype" if "torch_dtype" in config else "dtype"] == "float32"
    assert not list(tmp_path.glob(".hf.partial-*")), "the temporary folder is gone once the export is complete"
    assert os.path.isdir(out)


def test_an_any_order_writer_places_each_tensor_at_its_offset_and_refuses_gaps_and_repeats(tmp_path):
    from mopd.errors import CheckpointError
    from mopd.hf.stream import HFReader, ShardedSafetensorsWriter, TensorSpec

    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7, 8], dtype=torch.int32),
               "c": torch.full((5,), 0.5, dtype=torch.bfloat16)}
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path / "ok", specs, max_shard_bytes=30, any_order=True)
    (tmp_path / "ok").mkdir()
    for name in ("c", "a", "b"):
        writer.write(name, tensors[name])
    writer.close()
    reader = HFReader(tmp_path / "ok")
    assert len(writer.files) > 1 and all(torch.equal(reader.get(n), t) for n, t in tensors.items())

    (tmp_path / "bad").mkdir()
    writer = ShardedSafetensorsWriter(tmp_path / "bad", specs, any_order=True)
    writer.write("b", tensors["b"])
    with pytest.raises(CheckpointError, match="'b' arrived twice"):
        writer.write("b", tensors["b"])
    with pytest.raises(CheckpointError, match="not among the 3 planned"):
        writer.write("z", tensors["b"])
    with pytest.raises(CheckpointError, match="stopped before 2 tensors were written"):
        writer.close()
