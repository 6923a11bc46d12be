"""Core lists and the learner/replica core split `anvil run` makes on one machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from coordinator.config import ServicesConfig
from coordinator.services import learner_cores_env, place_locally
from servicekit.cpus import CPUS_ENV, format_cpu_list, parse_cpu_list


@pytest.mark.parametrize(
    ("spec", "cores"),
    [("0", [0]), ("0-3", [0, 1, 2, 3]), ("0,2,4-5", [0, 2, 4, 5]), (" 1 ", [1]),
     ("auto", None), ("all", None), ("nobind", None), ("", None), ("0-1|2-3", None)],
)  # fmt: skip
def test_core_lists_parse_as_vllm_writes_them(spec, cores):
    assert parse_cpu_list(spec) == cores
    if cores:
        assert parse_cpu_list(format_cpu_list(cores)) == cores


def test_a_service_started_with_anvil_cpus_runs_on_those_cores_only():
    """The entry point every service shares applies ANVIL_CPUS before anything else runs."""
    code = (
        "import os; from servicekit.cpus import apply_cpus_from_env; "
        "print(apply_cpus_from_env(), sorted(os.sched_getaffinity(0)))"
    )
    last = max(os.sched_getaffinity(0))
    env = {**os.environ, CPUS_ENV: f"{last},{last + 64}"}  # a core this machine lacks is left out
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [f"[{last}]", f"[{last}]"]


def test_the_local_learner_gets_the_cores_no_vllm_replica_is_bound_to(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv(CPUS_ENV, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    vllm = {"type": "vllm"}
    config = ServicesConfig(rollout_engine=vllm, rollout_replicas=1)
    assert learner_cores_env(config, place_locally) == {CPUS_ENV: "1,2,3", "OMP_NUM_THREADS": "3"}
    config = ServicesConfig(rollout_engine=vllm, rollout_replicas=2)
    assert learner_cores_env(config, place_locally) == {CPUS_ENV: "2,3", "OMP_NUM_THREADS": "2"}
    # no split: every core has a replica; torch engine; remote placement; opted out; the user bound vLLM
    assert learner_cores_env(ServicesConfig(rollout_engine=vllm, rollout_replicas=4), place_locally) == {}
    assert learner_cores_env(ServicesConfig(rollout_engine={"type": "torch"}), place_locally) == {}
    assert learner_cores_env(ServicesConfig(rollout_engine=vllm), object()) == {}
    assert learner_cores_env(ServicesConfig(rollout_engine=vllm, separate_cores=False), place_locally) == {}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    assert learner_cores_env(ServicesConfig(rollout_engine=vllm), place_locally) == {}
