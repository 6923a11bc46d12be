"""Three "hosts" on one machine, and a run placed across them by Ray.

Linux network namespaces A, B and C, each with one address on one Ethernet segment (veth pairs on a
bridge with no address: test traffic stays on these links). A runs the Ray head and `anvil run` (the Ray
driver); B and C join as Ray workers labelled `host_b` / `host_c`. The run's `[cluster]` puts the learner
on B and a vLLM rollout replica on C, so batches cross A -> B, weights B -> C and samples A -> C. Then the
replica is killed (kill -9) on C: the fleet's supervisor sees its actor report the exit, Ray places the
replacement on C again, it rejoins at the learner's version, and the run finishes every step.

Skips (with the reason) only where namespaces cannot be made: not root, or no `ip`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.coordinator.fleet.test_fleet_run import wait_for
from tests.coordinator.test_run import REPO_ROOT, rows, wait_gone

BIN = Path(sys.executable).parent
TAG = f"anv{os.getpid() % 100000}"
SUBNET = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
HOSTS = {"a": f"{SUBNET}.1", "b": f"{SUBNET}.2", "c": f"{SUBNET}.3"}
RAY_PORT = 6391
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
STEPS = 12


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def in_host(host: str, *command: str) -> list[str]:
    return ["ip", "netns", "exec", f"{TAG}{host}", *command]


@pytest.fixture(scope="module")
def hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("making network namespaces needs root and iproute2's `ip`")
    bridge = f"{TAG}br"
    try:
        ip("link", "add", bridge, "type", "bridge")
        ip("link", "set", bridge, "up")
        for host, address in HOSTS.items():
            namespace, outside, inside = f"{TAG}{host}", f"{TAG}{host}o", f"{TAG}{host}i"
            ip("netns", "add", namespace)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", namespace)
            ip("link", "set", outside, "master", bridge)
            ip("link", "set", outside, "up")
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
            ip("-n", namespace, "link", "set", inside, "up")
            ip("-n", namespace, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        _remove_hosts(bridge)
        pytest.skip(f"cannot make network namespaces here: {' '.join(exc.cmd)}: {exc.stderr.strip()}")
    yield HOSTS
    _remove_hosts(bridge)


def _remove_hosts(bridge: str) -> None:
    for host in HOSTS:
        subprocess.run(["ip", "netns", "del", f"{TAG}{host}"], capture_output=True)  # takes its veth end along
    subprocess.run(["ip", "link", "del", bridge], capture_output=True)


@pytest.fixture(scope="module")
def ray_cluster(hosts, tmp_path_factory):
    """A Ray head on A and workers on B and C (labelled host_b / host_c), each its own process group."""
    logs = tmp_path_factory.mktemp("ray")
    head = f"{hosts['a']}:{RAY_PORT}"
    common = ["--block", "--disable-usage-stats"]
    started = []

    def start(host: str, *arguments: str) -> None:
        command = in_host(host, str(BIN / "ray"), "start", *common, f"--node-ip-address={hosts[host]}", *arguments)
        with (logs / f"ray-{host}.log").open("w") as log:
            started.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=RAY_ENV, start_new_session=True)
            )

    try:
        start("a", "--head", f"--port={RAY_PORT}", "--num-cpus=1", "--include-dashboard=false")
        wait_nodes(head, 1)
        start("b", f"--address={head}", "--num-cpus=1", '--resources={"host_b": 10}')
        wait_nodes(head, 2)  # one at a time: two raylets starting at once on one machine time out
        start("c", f"--address={head}", "--num-cpus=1", '--resources={"host_c": 10}')
        wait_nodes(head, 3)
        yield head
    finally:
        for process in reversed(started):
            with _quiet():
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(started):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            with _quiet():
                os.killpg(process.pid, signal.SIGKILL)


def _quiet():
    return contextlib.suppress(ProcessLookupError, PermissionError)


def wait_nodes(head: str, count: int, timeout_s: float = 180) -> None:
    probe = f"import ray; ray.init(address='{head}', log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = subprocess.run(in_host("a", sys.executable, "-c", probe), capture_output=True, text=True, env=RAY_ENV)
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise AssertionError(f"the Ray cluster did not reach {count} node(s)")


def link_bytes(host: str) -> dict[str, int]:
    """Bytes host sent and received on its link: the counters of its veth's bridge end (sent = that end's rx)."""
    stats = Path("/sys/class/net") / f"{TAG}{host}o" / "statistics"
    return {"sent": int((stats / "rx_bytes").read_text()), "received": int((stats / "tx_bytes").read_text())}


def ended(process: psutil.Process) -> bool:
    """Gone or a zombie (this machine's init does not reap what is reparented to it)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def services(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "services.json").read_text())
    except (OSError, ValueError):
        return {}


def test_a_run_across_three_hosts_survives_losing_its_remote_replica(ray_cluster, hosts, tmp_path, anvil_home):
    run_dir = tmp_path / "across"
    settings = [
        f"loop.steps={STEPS}",
        "loop.groups_per_batch=4",
        "loop.group_size=4",
        "loop.checkpoint_every=0",
        'cluster.type="ray"',
        f'cluster.address="{ray_cluster}"',
        "cluster.learner_resources={host_b = 1}",
        "cluster.rollout_resources={host_c = 1}",
        "services.fleet.restart_backoff_s=0.5",
    ]
    command = in_host("a", str(BIN / "anvil"), "run", "configs/copy_digit.toml", "--run-dir", str(run_dir))
    command += [a for setting in settings for a in ("--set", setting)]
    log = (tmp_path / "run.log").open("w")
    before = {host: link_bytes(host) for host in hosts}
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=RAY_ENV)
    try:
        wait_for(lambda: (rows(run_dir) if (run_dir / "metrics.jsonl").exists() else [])[-1:], "step 1", process, 600)
        placed = services(run_dir)
        assert placed["learner"]["address"].startswith(hosts["b"] + ":"), placed
        assert placed["rollout-0"]["address"].startswith(hosts["c"] + ":"), placed
        killed = placed["rollout-0"]["pid"]
        left_behind = psutil.Process(killed).children(recursive=True)  # vLLM's engine core and worker
        assert left_behind, "a vLLM replica runs its engine in child processes"
        os.kill(killed, signal.SIGKILL)  # one pid namespace: the "remote" replica is killable from here
        replaced = lambda: services(run_dir).get("rollout-0", {}).get("pid", killed) != killed and services(run_dir)  # noqa: E731
        moved = wait_for(replaced, "the replacement replica", process, 600)
        assert moved["rollout-0"]["address"].startswith(hosts["c"] + ":"), "Ray placed it on host C again"
        deadline = time.monotonic() + 30
        while (alive := [p for p in left_behind if not ended(p)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive, f"the killed replica's engine processes outlived it: {alive}"
        assert process.wait(timeout=900) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    crossed = {host: {k: v - before[host][k] for k, v in link_bytes(host).items()} for host in hosts}
    print(f"\nrun across hosts: {time.monotonic() - started:.0f} s; bytes over each host's link: {crossed}")
    metrics = rows(run_dir)
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    weights_sent = sum(r["weights/egress_bytes"] for r in metrics)
    assert weights_sent > 0 and crossed["b"]["sent"] >= weights_sent, "the learner's weights left host B on its link"
    assert crossed["c"]["received"] >= weights_sent, "and reached the replica on host C"
    assert metrics[-1]["fleet/replica-0/restarts"] == 1
    assert metrics[-1]["weights/rollout_version_min"] == STEPS, "the replacement serves the learner's weights"
    assert wait_gone([s["pid"] for s in services(run_dir).values()], timeout_s=60) == []
