"""plan_layout is pure arithmetic in Megatron's rank order ("tp-cp-ep-dp-pp"); its errors name the keys.
The device choice is pure too: the GPU index (LOCAL_RANK, then SLURM_LOCALID), MOPD_FORCE_CPU, the
process-group timeout. (That init_parallel's groups agree with the plan, run on the CPU with CUDA hidden
and take the configured timeout is checked in test_student_parity.)"""

from __future__ import annotations

import pytest

from mopd.config import ParallelConfig
from mopd.errors import ConfigError
from mopd.parallel import plan_layout


def test_data_parallel_size_is_what_tensor_and_pipeline_leave():
    plan = plan_layout(ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 8)
    assert (plan.tp, plan.pp, plan.dp, plan.world_size) == (2, 2, 2, 8)


def test_stages_hold_contiguous_rank_blocks_with_tensor_rank_fastest():
    plan = plan_layout(ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 8)
    assert plan.ranks_per_stage == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert [plan.coordinates(r) for r in (0, 1, 2, 3, 4, 7)] == [
        (0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (1, 1, 1)]


def test_pure_data_parallel_puts_every_rank_in_the_single_stage():
    plan = plan_layout(ParallelConfig(), 3)
    assert plan.dp == 3 and plan.ranks_per_stage == ((0, 1, 2),)


def test_sizes_that_do_not_divide_the_world_name_both_keys():
    with pytest.raises(ConfigError, match=r"student\.parallel\.tensor_parallel=2 x student\.parallel\.pipeline_parallel=3"):
        plan_layout(ParallelConfig(tensor_parallel=2, pipeline_parallel=3), 8)


def test_a_non_positive_size_names_its_key():
    with pytest.raises(ConfigError, match=r"student\.parallel\.pipeline_parallel"):
        plan_layout(ParallelConfig(pipeline_parallel=0), 4)


def test_the_gpu_index_comes_from_local_rank_then_slurm_localid_then_zero():
    from mopd.parallel.layout import local_device_index

    assert local_device_index({"LOCAL_RANK": "3", "SLURM_LOCALID": "0"}) == 3  # torchrun under srun
    assert local_device_index({"SLURM_LOCALID": "5"}) == 5  # plain srun, one task per GPU
    assert local_device_index({}) == 0
    with pytest.raises(ConfigError, match="SLURM_LOCALID='x'"):
        local_device_index({"SLURM_LOCALID": "x"})


def test_force_cpu_hides_the_devices_before_cuda_starts_and_refuses_once_it_has():
    from mopd.parallel.layout import use_cuda

    env = {"MOPD_FORCE_CPU": "1"}
    visible = {"n": 1}
    # CUDA reads CUDA_VISIBLE_DEVICES when it initialises: a process that has not started it sees none.
    assert use_cuda(env, lambda: visible["n"] > 0 and env.get("CUDA_VISIBLE_DEVICES") != "") is False
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    with pytest.raises(ConfigError, match="MOPD_FORCE_CPU=1 but CUDA was initialised"):
        use_cuda({"MOPD_FORCE_CPU": "1"}, lambda: True)
    assert use_cuda({}, lambda: True) is True and use_cuda({"MOPD_FORCE_CPU": "0"}, lambda: True) is True
    assert use_cuda({}, lambda: False) is False


def test_the_default_timeout_fits_a_70b_step_and_is_configurable():
    from mopd.config import load_config

    assert ParallelConfig().distributed_timeout_minutes == 120.0
    cfg = load_config(None, ["student.parallel.distributed_timeout_minutes=240"])
    assert cfg.student.parallel.distributed_timeout_minutes == 240.0
    with pytest.raises(ConfigError, match=r"student\.parallel\.distributed_timeout_minutes"):
        load_config(None, ["student.parallel.distributed_timeout_minutes=0"])
