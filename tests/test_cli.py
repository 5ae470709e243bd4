"""The `mopd` command line: `plan` prints a layout or the reason it is invalid (exit 1)."""

import subprocess
import sys
from pathlib import Path

from mopd.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "llama3_70b_mopd.yaml"


def test_plan_prints_the_layout_and_ranks_per_stage(capsys):
    assert main(["plan", str(RECIPE), "--world-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "TP=8 x PP=4 x DP=2" in out
    assert "pipeline stage 0: ranks (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)" in out
    assert "pipeline stage 3: ranks (48," in out
    assert "padded vocabulary: 128256" in out  # already a multiple of lcm(128, 8)
    assert "micro-batches per step per DP rank: 256" in out  # 512 / (1 x 2)


def test_plan_for_a_world_size_the_layout_does_not_divide_exits_1_with_the_reason(capsys):
    assert main(["plan", str(RECIPE), "--world-size", "48"]) == 1
    err = capsys.readouterr().err
    assert "student.parallel.tensor_parallel=8" in err and "48" in err


def test_plan_reports_a_batch_that_does_not_split_over_data_parallel_ranks(capsys):
    assert main(["plan", str(RECIPE), "--world-size", "96", "student.train.global_batch_size=100"]) == 1
    assert "student.train.global_batch_size=100" in capsys.readouterr().err


def test_plan_applies_overrides_and_reports_bad_keys(capsys):
    assert main(["plan", str(RECIPE), "--world-size", "32", "student.parallel.pipeline_parallel=2",
                 "student.parallel.tensor_parallel=4"]) == 0
    assert "TP=4 x PP=2 x DP=4" in capsys.readouterr().out
    assert main(["plan", str(RECIPE), "--world-size", "32", "student.paralel.tensor_parallel=4"]) == 1
    assert "student.paralel" in capsys.readouterr().err


def test_the_console_entry_point_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "mopd.cli", "plan", str(RECIPE), "--world-size", "8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "does not divide the world size 8" in proc.stderr


def test_plan_counts_activations_per_stage_and_the_recipe_fits_an_h100_with_selective_recompute(capsys):
    """Stage 0 of the 70B recipe (TP=8 SP, PP=4, s=16384, b=1, bf16), computed by hand."""
    assert main(["plan", str(RECIPE), "--world-size", "64"]) == 0
    out = capsys.readouterr().out
    gib, tokens, layers, in_flight = 2**30, 16384, 20, 4
    # bytes per token per layer / TP: attention 2*2h + 2*(a+2g)d + 2*a*d + 4a; MLP 2*2h + 3*2f
    no_recompute = (2 * 2 * 8192 + 2 * 80 * 128 + 2 * 64 * 128 + 4 * 64 + 2 * 2 * 8192 + 3 * 2 * 28672) / 8
    selective = (2 * 2 * 8192 + 2 * 80 * 128 + 2 * 64 * 128 + 4 * 64 + 2 * 8192) / 8  # the MLP keeps its input
    assert (no_recompute, selective) == (34336, 10784)
    linear = 8192 * 128 * 80 + 64 * 128 * 8192 + 3 * 8192 * 28672
    stage0_params = (layers * (linear + 2 * 8192) + 128256 * 8192) / 8
    model_state = stage0_params * (2 + 4 + 12 / 2) / gib  # bf16 weight, fp32 grad, Adam sharded over DP=2
    fp8_weights = 2 * layers * linear / 8 / gib
    act = selective * tokens * layers * in_flight / gib
    total = act + model_state + fp8_weights + 6.0
    assert (round(act, 2), round(model_state, 2), round(fp8_weights, 2), round(total, 2)) == (13.16, 25.37, 3.98, 48.52)
    assert (f"stage 0: activations {act:.2f} GiB (20 layers x 4 in flight) + model state {model_state:.2f} GiB "
            f"+ fp8 weights {fp8_weights:.2f} GiB = {total:.2f} GiB") in out
    assert "stage 3: activations" in out and "(20 layers x 1 in flight)" in out
    assert f"peak {total:.2f} of 79.6 GiB (H100 80 GB): fits (margin {81559 / 1024 - total:.1f} GiB)" in out
    peak_none = no_recompute * tokens * layers * in_flight / gib + model_state + fp8_weights + 6.0
    assert f"none {peak_none:.2f} GiB, tight (margin {81559 / 1024 - peak_none:.1f} GiB)" in out


def test_plan_says_when_a_layout_does_not_fit(capsys):
    assert main(["plan", str(RECIPE), "--world-size", "64", "student.train.recompute=none",
                 "student.train.max_seq_len=32768"]) == 0
    assert "does NOT fit (short by" in capsys.readouterr().out


def test_activation_bytes_without_sequence_parallel_and_under_full_recompute_match_the_formulas():
    from mopd.config import ModelConfig, ParallelConfig, StudentConfig
    from mopd.config.model import Recompute
    from mopd.plan import layer_activation_bytes_per_token

    student = StudentConfig(model=ModelConfig(hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                              ffn_hidden_size=256),
                            parallel=ParallelConfig(tensor_parallel=2))  # fp32: 4 bytes, head_dim 16
    # the four [s, b, h] tensors are replicated without SP; q,k,v = (4 + 2*2) * 16, out = 4 * 16
    want = 4 * 64 * 4 + (4 * 128 + 4 * 64 + 4 * 4) / 2 + 3 * 4 * 256 / 2
    assert layer_activation_bytes_per_token(student, Recompute.none) == want
    assert layer_activation_bytes_per_token(student, Recompute.full) == 4 * 64
    assert layer_activation_bytes_per_token(student, Recompute.selective, ("mlp",)) == want - 2 * 4 * 64 - 3 * 4 * 256 / 2 + 4 * 64


def test_the_cli_hides_cuda_first_when_cpu_is_forced(monkeypatch, capsys):
    monkeypatch.setenv("MOPD_FORCE_CPU", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # restored after the test
    assert main(["plan", str(RECIPE), "--world-size", "64"]) == 0
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_plan_says_mxfp8_does_not_run_on_an_h100(capsys):
    assert main(["plan", str(RECIPE), "--world-size", "64", "student.precision.fp8=mxfp8"]) == 0
    assert "on an H100: student.precision.fp8=mxfp8 needs a Blackwell (sm_100) or newer GPU" in capsys.readouterr().out
