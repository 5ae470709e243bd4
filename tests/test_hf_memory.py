"""Import and export stream: a fresh process converting a ~400 MB model never holds much of it.

The child process runs the CLI entry point (`mopd.hf.cli.main`) and samples its own RSS with psutil
every 2 ms; the peak increase over the RSS just before each conversion must stay under 0.5x the
checkpoint size and under 4x its largest tensor (the bound stated in mopd/hf/convert.py).

The child runs with a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_): glibc's dynamic threshold
otherwise keeps freed tensors of up to 32 MiB on the heap, which makes RSS swing by ~80 MiB from run
to run and measures the allocator rather than what the converter holds. Tensors above 32 MiB (every
large tensor of a real model) are mmap-allocated and returned on free either way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mopd.config import Family, ModelConfig
from mopd.hf import import_hf
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


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("big") / "hf"
    return folder, _write_hf(folder)


def test_import_and_export_peak_memory_stays_far_below_the_checkpoint_size(big_hf, tmp_path):
    hf, size = big_hf
    assert size > 350 * 2**20
    argv = ["import", "--hf-dir", str(hf), "--megatron-dir", str(tmp_path / "meg"),
            "export", "--megatron-dir", str(tmp_path / "meg"), "--hf-dir", str(tmp_path / "out"),
            "--max-shard-gb", "0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, env=env,
                          timeout=200, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    mib = 2**20
    print(f"checkpoint {size / mib:.0f} MiB; peak RSS increase: import {result['import']['increase'] / mib:.0f} MiB "
          f"({result['import']['seconds']:.1f} s), export {result['export']['increase'] / mib:.0f} MiB "
          f"({result['export']['seconds']:.1f} s)")
    largest = CFG.vocab_size * CFG.hidden_size * 4
    for phase in ("import", "export"):
        held = result[phase]["increase"]
        assert held < 0.5 * size and held < 4 * largest, f"{phase} held {held / mib:.0f} MiB"
    # the export reproduces the input (streaming did not drop or reorder anything)
    from safetensors import safe_open

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.7.mlp.up_proj.weight"
    with safe_open(tmp_path / "out" / index[name], framework="pt") as f_out:
        src_index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(hf / src_index[name], framework="pt") as f_in:
            assert torch.equal(f_out.get_tensor(name), f_in.get_tensor(name))


def test_a_killed_import_leaves_no_output_folder_and_a_rerun_succeeds(big_hf, tmp_path):
    hf, _ = big_hf
    out = tmp_path / "meg"
    cmd = [sys.executable, "tools/convert_hf.py", "import", "--hf-dir", str(hf), "--megatron-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[1]
    # Its own session, so the kill takes the whole job (dist_checkpointing's writer child too).
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            partial = list(tmp_path.glob(".meg.partial-*/*.distcp"))
            if len(partial) >= 3:  # mid-write: some chunks on disk, not all
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the import finished before it could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not out.exists()
    leftovers = list(tmp_path.glob(".meg.partial-*"))
    assert leftovers and not (leftovers[0] / "mopd_model.yaml").exists()
    import_hf(hf, out)  # a leftover partial folder of a dead process does not get in the way
    assert (out / "metadata.json").is_file() and (out / "mopd_checkpoint.json").is_file()
