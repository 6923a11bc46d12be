"""vLLM's CPU build with its model worker inside the engine-core process, bound to the replica's cores.

By default vLLM's CPU platform forces the multiprocess executor: the model runs in a separate worker
process, and the engine core hands it each step through a shared-memory queue whose reader *spins*
(`sched_yield`) for a second after every read. An RL loop asks for a batch more often than once a
second, so the worker never sleeps: measured on the 2-core VM (`anvil run configs/copy_digit.toml`,
on-policy), the worker burned 0.75 core-seconds per step although sampling took 0.22 s, and the
learner, sharing the cores, took 0.44 s to train instead of 0.26 s.

`VLLM_ENABLE_V1_MULTIPROCESSING=0` lets the "uni" executor stand: the worker runs inside the engine
core (still a process of its own: the async engine always starts one), with nothing spinning. vLLM
then no longer applies `VLLM_CPU_OMP_THREADS_BIND` (it binds a multiprocess worker's threads when it
starts), so this module does it: the engine core is started with the CPU affinity and OpenMP thread
count of those cores (a child process inherits both), and the rollout process gets its own back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from servicekit.cpus import parse_cpu_list


@contextlib.contextmanager
def engine_core_on_bound_cores() -> Iterator[None]:
    """While the engine core is started (vLLM's CPU build only): single-process worker, and the
    affinity and thread count that VLLM_CPU_OMP_THREADS_BIND names."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        yield
        return
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cores = parse_cpu_list(os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""))
    usable = set(os.sched_getaffinity(0))
    cores = [core for core in cores or [] if core in usable]
    if not cores:
        yield
        return
    saved_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(len(cores))
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, usable)
        if saved_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_threads
