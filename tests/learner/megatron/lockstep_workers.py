"""Spawned ranks for test_lockstep.py (importable, as torch.multiprocessing's spawn requires)."""

from __future__ import annotations

import os
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

from learner.backends.megatron.lockstep import Commander, worker_loop
from protos.errors import FailedPrecondition


def handler(command):
    rank = dist.get_rank()
    if command.operation == "rank":
        return rank
    if command.operation == "reject_everywhere":
        raise FailedPrecondition("checkpoint does not fit")
    if command.operation == "fail_on_rank1_before_collective":
        if rank == 1:
            raise ValueError("rank 1 ran out of something")
        total = torch.ones(1)
        dist.all_reduce(total)  # rank 1 never arrives: times out instead of hanging
        return float(total)
    raise AssertionError(command.operation)


def run_rank(rank: int, world: int, port: int, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=5)
    )
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=120))
    layout = SimpleNamespace(rank=rank, world_size=world, control_group=control)
    if rank != 0:
        worker_loop(layout, handler)
        dist.destroy_process_group()
        return
    commander = Commander(layout, handler)
    outcomes = []
    for operation in ("rank", "reject_everywhere", "rank", "fail_on_rank1_before_collective", "rank"):
        try:
            outcomes.append((operation, "ok", commander.execute(operation)))
        except Exception as exc:
            outcomes.append((operation, type(exc).__name__, str(exc)))
    commander.shutdown()
    results.put(outcomes)
    dist.destroy_process_group()
