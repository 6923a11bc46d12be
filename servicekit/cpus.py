"""Which cores a service runs on: a core-list syntax shared by vLLM's VLLM_CPU_OMP_THREADS_BIND and
Anvil's ANVIL_CPUS, and the affinity a service takes from ANVIL_CPUS when it starts.

Why: on a small machine a local learner and a local vLLM replica otherwise fight for the same core.
vLLM binds its model thread to one core; a torch learner left on every core then runs one of its
OpenMP threads on that core too, and each parallel region waits for it. `anvil run` gives the learner
the cores the replicas do not use (coordinator/services.py), through ANVIL_CPUS and OMP_NUM_THREADS.
"""

from __future__ import annotations

import os

CPUS_ENV = "ANVIL_CPUS"


def parse_cpu_list(spec: str) -> list[int] | None:
    """ "0", "0-3", "0,2,4-5" -> core ids; None for vLLM's words that name no cores ("auto", "all",
    "nobind"), an empty string, or per-rank lists ("0-1|2-3")."""
    spec = spec.strip()
    if not spec or spec in ("auto", "all", "nobind") or "|" in spec:
        return None
    cores: list[int] = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        cores.extend(range(int(low), int(high or low) + 1))
    return cores


def format_cpu_list(cores: list[int]) -> str:
    return ",".join(str(core) for core in sorted(cores))


def apply_cpus_from_env() -> list[int] | None:
    """Restrict this process to the cores ANVIL_CPUS names (those that exist here); what it applied."""
    cores = parse_cpu_list(os.environ.get(CPUS_ENV, ""))
    if not cores:
        return None
    usable = [core for core in cores if core in os.sched_getaffinity(0)]
    if usable:
        os.sched_setaffinity(0, usable)
    return usable or None
