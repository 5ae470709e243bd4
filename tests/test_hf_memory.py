"""Import and export stream: a fresh process converting a ~400 MB model never holds much of it.

The child process runs the CLI entry point (`mopd.hf.cli.main`) and samples its own RSS with psutil
every 2 ms; the peak increase over the RSS just before each conversion must stay under 0.5x the
checkpoint size (the docstring bound is ~3x one layer's largest fused tensor, here ~50 MB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mopd.config import Family, ModelConfig
from mopd.hf.families import hf_config_from_model
from mopd.hf.mapping import expected_hf_shapes
from mopd.hf.stream import ShardedSafetensorsWriter, TensorSpec

pytestmark = pytest.mark.timeout(240)

CFG = ModelConfig(family=Family.llama, num_layers=8, hidden_size=1024, num_attention_heads=8, num_query_groups=8,
                  ffn_hidden_size=2048, vocab_size=8192, tie_word_embeddings=False)

_CHILD = textwrap.dedent("""
    import json, sys, threading, time
    import psutil
    import torch, megatron.core.dist_checkpointing  # import cost is not conversion memory
    from mopd.hf.cli import main

    proc = psutil.Process()
    peak = [0]
    def sample():
        while True:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)
    threading.Thread(target=sample, daemon=True).start()

    out = {}
    for name, argv in (("import", sys.argv[1:6]), ("export", sys.argv[6:])):
        time.sleep(0.05)
        base = proc.memory_info().rss
        peak[0] = base
        t0 = time.perf_counter()
        assert main(argv) == 0
        time.sleep(0.05)
        out[name] = {"increase": peak[0] - base, "seconds": time.perf_counter() - t0}
    print("RESULT" + json.dumps(out))
""")


def _write_hf(folder: Path) -> int:
    """A random HF Llama checkpoint in 100 MB shards, written tensor by tensor; returns its byte size."""
    folder.mkdir()
    shapes = expected_hf_shapes(CFG)
    specs = [TensorSpec(name, shape, torch.float32) for name, shape in shapes.items()]
    writer = ShardedSafetensorsWriter(folder, specs, max_shard_bytes=100 * 2**20)
    gen = torch.Generator().manual_seed(0)
    for spec in specs:
        writer.write(spec.name, torch.randn(spec.shape, generator=gen) * 0.02)
    writer.close()
    (folder / "config.json").write_text(json.dumps(hf_config_from_model(CFG, dtype="float32")))
    return sum(spec.nbytes for spec in specs)


def test_import_and_export_peak_memory_stays_far_below_the_checkpoint_size(tmp_path):
    size = _write_hf(tmp_path / "hf")
    assert size > 350 * 2**20
    argv = ["import", "--hf-dir", str(tmp_path / "hf"), "--megatron-dir", str(tmp_path / "meg"),
            "export", "--megatron-dir", str(tmp_path / "meg"), "--hf-dir", str(tmp_path / "out"),
            "--max-shard-gb", "0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, env=env,
                          timeout=200, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    mib = 2**20
    print(f"checkpoint {size / mib:.0f} MiB; peak RSS increase: import {result['import']['increase'] / mib:.0f} MiB "
          f"({result['import']['seconds']:.1f} s), export {result['export']['increase'] / mib:.0f} MiB "
          f"({result['export']['seconds']:.1f} s)")
    for phase in ("import", "export"):
        assert result[phase]["increase"] < 0.5 * size, f"{phase} held {result[phase]['increase'] / mib:.0f} MiB"
    # the export reproduces the input (streaming did not drop or reorder anything)
    from safetensors import safe_open

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.7.mlp.up_proj.weight"
    with safe_open(tmp_path / "out" / index[name], framework="pt") as f_out:
        src_index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(tmp_path / "hf" / src_index[name], framework="pt") as f_in:
            assert torch.equal(f_out.get_tensor(name), f_in.get_tensor(name))
