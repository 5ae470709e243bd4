"""dist_checkpointing round trips of the student, across layouts, and atomic saves.

One 4-rank spawn: train 1 step at TP=2xPP=2 and save (model, distributed-optimizer state,
scheduler, RNG, extra), keep training 2 steps as the uninterrupted run, and crash a second save
half-way. Then reload the step-1 checkpoint at TP=1 (DP=4) and at TP=2xPP=2 and resume.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_utils import run_on_ranks
from test_student_parity import cross_entropy_loss, global_batch, shard, stack, student_config

from mopd.config import LrSchedule, OptimizerConfig

REL_TOL = 1e-5


def _config(tp: int, pp: int):
    from dataclasses import replace

    cfg = student_config(tp, pp)
    # Warmup makes the learning rate differ per step, so a lost scheduler state shows in the loss.
    return replace(cfg, optimizer=OptimizerConfig(lr=3e-3, warmup_steps=2, lr_schedule=LrSchedule.cosine,
                                                  use_distributed_optimizer=True))


def probe_logits(chunks, layout) -> torch.Tensor | None:
    """Full-vocabulary logits [B, S, V] of a fixed batch on the last stage (None elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch = stack(global_batch(99)[:2])

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b.tokens, b.position_ids, None)
        return out, lambda o: (o.sum() * 0, {"logits": gather_from_tensor_model_parallel_region(o).detach()})

    store = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([batch]), model=chunks, num_microbatches=1,
        seq_length=batch.tokens.shape[1], micro_batch_size=batch.tokens.shape[0], forward_only=True)
    return store[0]["logits"].clone() if layout.is_last_stage else None


def _step(chunks, optimizer, scheduler, layout, step: int):
    from mopd.student import train_step

    r = train_step(chunks, optimizer, scheduler, shard(global_batch(step), layout.dp, layout.dp_rank),
                   cross_entropy_loss, layout, step=step)
    return r.loss, r.lr


def _build(tp: int, pp: int, with_optimizer: bool = True):
    from mopd.parallel import init_parallel
    from mopd.student import build_model, build_optimizer

    cfg = _config(tp, pp)
    layout = init_parallel(cfg.parallel, seed=11)
    chunks = build_model(cfg, layout)
    optimizer, scheduler = build_optimizer(cfg, chunks) if with_optimizer else (None, None)
    return layout, chunks, optimizer, scheduler


def _crash_a_save(chunks, optimizer, scheduler, root: Path) -> str | None:
    """A save that dies after writing part of its files must leave the older checkpoint current."""
    from megatron.core import dist_checkpointing

    from mopd.student import save_checkpoint

    real_save = dist_checkpointing.save

    def dying_save(state, directory, *args, **kwargs):
        (Path(directory) / f"partial_{torch.distributed.get_rank()}").write_text("half")
        raise OSError("disk full")

    dist_checkpointing.save = dying_save
    try:
        save_checkpoint(root / "step_3", chunks, optimizer, scheduler, step=3, extra={})
        return None
    except OSError as e:
        return str(e)
    finally:
        dist_checkpointing.save = real_save
        torch.distributed.barrier()


def _worker(rank: int, world: int, root: str) -> dict:
    from mopd.parallel import destroy_parallel
    from mopd.student import latest_checkpoint, load_checkpoint, save_checkpoint

    root, out = Path(root), {}
    layout, chunks, optimizer, scheduler = _build(2, 2)
    out["saved_step0"] = _step(chunks, optimizer, scheduler, layout, 0)
    save_checkpoint(root / "step_1", chunks, optimizer, scheduler, step=1, extra={"data_position": 17})
    out["rng_at_save"] = torch.get_rng_state()
    out["logits_tp2pp2"] = probe_logits(chunks, layout)
    out["uninterrupted"] = [_step(chunks, optimizer, scheduler, layout, s) for s in (1, 2)]
    out["crash"] = _crash_a_save(chunks, optimizer, scheduler, root)
    out["latest_after_crash"] = str(latest_checkpoint(root))
    destroy_parallel()

    layout, chunks, optimizer, scheduler = _build(1, 1)
    out["extra_tp1"] = load_checkpoint(root / "step_1", chunks, optimizer, scheduler)
    out["logits_tp1"] = probe_logits(chunks, layout)
    out["resumed_tp1"] = [_step(chunks, optimizer, scheduler, layout, s) for s in (1, 2)]
    destroy_parallel()

    layout, chunks, optimizer, scheduler = _build(2, 2)
    torch.manual_seed(12345)  # load must bring the saved RNG state back at the saved layout
    load_checkpoint(root / "step_1", chunks, optimizer, scheduler)
    out["rng_after_load"] = torch.get_rng_state()
    out["resumed_tp2pp2"] = [_step(chunks, optimizer, scheduler, layout, s) for s in (1, 2)]
    destroy_parallel()

    # Control: weights without the optimizer state must NOT reproduce the run (the test can fail).
    layout, chunks, _, _ = _build(2, 2, with_optimizer=False)
    load_checkpoint(root / "step_1", chunks)
    from mopd.student import build_optimizer

    optimizer, scheduler = build_optimizer(_config(2, 2), chunks)
    out["fresh_optimizer"] = [_step(chunks, optimizer, scheduler, layout, s) for s in (1, 2)]
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return root, run_on_ranks(_worker, 4, str(root), timeout=420)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_a_tp2_pp2_checkpoint_loads_at_tp1_with_the_same_logits(runs):
    _, results = runs
    saved = [r["logits_tp2pp2"] for r in results if r["logits_tp2pp2"] is not None]
    assert len(saved) == 2, "the two last-stage ranks hold the logits"
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["logits_tp1"], saved[0], rtol=1e-5, atol=1e-5, msg=f"rank {rank}")
    assert saved[0].shape[-1] == 128


def test_resuming_at_the_saved_layout_repeats_the_uninterrupted_losses_and_rng(runs):
    _, results = runs
    for rank, r in enumerate(results):
        for (loss, lr), (want_loss, want_lr) in zip(r["resumed_tp2pp2"], r["uninterrupted"]):
            assert _rel(loss, want_loss) < 1e-6 and lr == want_lr, (rank, loss, want_loss, lr, want_lr)
        assert torch.equal(r["rng_after_load"], r["rng_at_save"]), f"rank {rank}: RNG state not restored"


def test_resuming_at_tp1_reshards_the_optimizer_state_and_repeats_the_losses(runs):
    _, results = runs
    for rank, r in enumerate(results):
        assert r["extra_tp1"] == {"data_position": 17, "step": 1}
        for (loss, lr), (want_loss, want_lr) in zip(r["resumed_tp1"], r["uninterrupted"]):
            assert _rel(loss, want_loss) < REL_TOL and lr == want_lr, (rank, loss, want_loss)


def test_a_fresh_optimizer_after_loading_weights_gives_a_different_second_step(runs):
    """Control for the resume tests: Adam moments and the warmup position do matter here."""
    _, results = runs
    r = results[0]
    assert _rel(r["fresh_optimizer"][0][0], r["uninterrupted"][0][0]) < REL_TOL  # same weights, same loss
    assert _rel(r["fresh_optimizer"][1][0], r["uninterrupted"][1][0]) > 1e-4


def test_a_crash_mid_save_leaves_the_previous_checkpoint_current(runs):
    root, results = runs
    for r in results:
        assert r["crash"] == "disk full"
        assert r["latest_after_crash"] == str(root / "step_1")
    assert (root / ".step_3.tmp").is_dir() and not (root / "step_3").exists()


def test_loading_a_folder_that_is_not_a_complete_checkpoint_names_it(tmp_path):
    from mopd.errors import CheckpointError
    from mopd.student import latest_checkpoint, load_model_weights

    (tmp_path / "step_9").mkdir()
    with pytest.raises(CheckpointError, match="step_9"):
        load_model_weights(tmp_path / "step_9", [])
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
