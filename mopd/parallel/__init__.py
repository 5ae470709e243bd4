"""Parallel layout from config, Megatron initialisation, and the CPU/gloo compatibility layer."""

from mopd.parallel.layout import LayoutPlan, ParallelLayout, destroy_parallel, init_parallel, plan_layout, seed_rngs

__all__ = ["LayoutPlan", "ParallelLayout", "destroy_parallel", "init_parallel", "plan_layout", "seed_rngs"]
