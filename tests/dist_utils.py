"""Run one function on N gloo ranks, once per group of checks.

``run_on_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, initialises the default
gloo process group in each (free port, ``OMP_NUM_THREADS=1``, RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*
set as torchrun would), calls ``fn(rank, world_size, *args)`` and returns every rank's return value
in rank order. A worker's exception comes back as ``WorkerError`` carrying its traceback; a worker
that dies or hangs past ``timeout`` seconds stops the whole group. ``fn`` must be a module-level
function (spawned children import it by name) and its return value picklable (CPU tensors are fine).
Importing torch + megatron costs ~7.5 s per process, so put several cases into one ``fn``.

The ranks are CPU ranks even on a GPU node: each child starts with ``CUDA_VISIBLE_DEVICES=""`` and
``MOPD_FORCE_CPU=1`` in its environment (before its interpreter, and so torch, starts), so
``init_parallel`` takes the gloo/cpu_compat path there exactly as on a CPU machine.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch.multiprocessing as mp


class WorkerError(RuntimeError):
    """A rank raised, died or timed out; the message holds its traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    # Own process group: the parent can then stop helpers this rank started (checkpoint writers).
    os.setpgrp()
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            out = fn(rank, world_size, *args)
        finally:
            _teardown()
        # Plain pickle copies tensors: torch's shared-memory reduction breaks once the child exits.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def _teardown() -> None:
    import torch.distributed as dist

    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except ImportError:
        pass
    if dist.is_initialized():
        dist.destroy_process_group()


CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": "", "MOPD_FORCE_CPU": "1"}


@contextlib.contextmanager
def _cpu_only_children() -> Iterator[None]:
    """Processes started inside inherit CPU_ONLY_ENV; this process's environment is restored after."""
    saved = {key: os.environ.get(key) for key in CPU_ONLY_ENV}
    os.environ.update(CPU_ONLY_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, one process each."""
    # Not daemonic: dist_checkpointing's writer starts a multiprocessing manager in each rank.
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results))
             for r in range(world_size)]
    with _cpu_only_children():
        for p in procs:
            p.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size:
            try:
                rank, ok, payload = results.get(timeout=1.0)
            except queue.Empty:
                _check_alive(procs, outputs, deadline, timeout)
                continue
            if not ok:
                raise WorkerError(f"rank {rank} of {world_size} raised:\n{payload}")
            outputs[rank] = pickle.loads(payload)
    finally:
        # On failure the other ranks are likely blocked in a collective: stop them at once.
        grace = 10.0 if len(outputs) == world_size else 0.0
        for p in procs:
            p.join(timeout=grace)
            _kill_group(p.pid)
            p.join()
    return [outputs[r] for r in range(world_size)]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _check_alive(procs: list, outputs: dict, deadline: float, timeout: float) -> None:
    for rank, p in enumerate(procs):
        if rank not in outputs and not p.is_alive() and p.exitcode != 0:
            raise WorkerError(f"rank {rank} died with exit code {p.exitcode} before reporting")
    if time.monotonic() > deadline:
        missing = sorted(set(range(len(procs))) - set(outputs))
        raise WorkerError(f"ranks {missing} did not finish within {timeout:.0f} s")


def full_logits(model, ids, layout, vocab_size: int):
    """[B, S, vocab_size] logits of an unwrapped GPTModel at any TP/PP, on the last stage (None elsewhere).

    A plain forward: activations go stage to stage point-to-point, and the last stage gathers its
    vocabulary shards over TP and drops the padded columns. Every rank of the model must call it.
    """
    import torch
    import torch.distributed as dist

    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        if not layout.is_first_stage:
            hidden = torch.empty(ids.shape[1], ids.shape[0], model.config.hidden_size)
            dist.recv(hidden, group=layout.pp_group, group_src=layout.pp_rank - 1)
            model.set_input_tensor(hidden)
        out = model(ids, positions, None)
        if not layout.is_last_stage:
            dist.send(out.contiguous(), group=layout.pp_group, group_dst=layout.pp_rank + 1)
            return None
    shards = [torch.empty_like(out) for _ in range(layout.tp)]
    dist.all_gather(shards, out.contiguous(), group=layout.tp_group)
    return torch.cat(shards, dim=-1)[..., :vocab_size]
