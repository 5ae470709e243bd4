"""plan_layout is pure arithmetic in Megatron's rank order ("tp-cp-ep-dp-pp"); its errors name the keys.
(That init_parallel's process groups agree with the plan is checked in test_student_parity.)"""

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
