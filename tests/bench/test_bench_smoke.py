"""Each benchmark runs end to end in its smallest mode (`--quick`) and writes the JSON the README promises.

No timing is asserted (these machines are noisy); only that every script runs on real parts and reports
its ratios, baselines and machine description.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from bench import (
    checkpoint_stall,
    data_plane,
    gateway_durability,
    learner_overhead,
    load,
    loop,
    peers,
    rollout,
    routing_replay,
    stream_chunking,
    weight_sync,
)

TOP_LEVEL_KEYS = {"benchmark", "date", "git", "machine", "command", "config", "timings", "ratios", "notes"}
MACHINE_KEYS = {"cpu_model", "cores", "ram_gib", "python", "versions"}


def run_quick(module, tmp_path: Path, extra: list[str] | None = None) -> dict:
    out = tmp_path / f"{module.__name__.rsplit('.', 1)[-1]}.json"
    args = module.parse_args(["--quick", "--out", str(out), *(extra or [])])
    asyncio.run(module.main(args))
    return json.loads(out.read_text())


def check_common(result: dict, name: str, ratio_names: set[str]) -> None:
    assert set(result) >= TOP_LEVEL_KEYS
    assert result["benchmark"] == name
    assert set(result["machine"]) >= MACHINE_KEYS
    assert {"torch", "grpcio"} <= set(result["machine"]["versions"])
    assert result["timings"] and all(t["samples_s"] for t in result["timings"])
    ratios = {r["name"]: r for r in result["ratios"]}
    assert ratio_names <= set(ratios), sorted(ratios)
    for ratio in ratios.values():
        assert math.isfinite(ratio["value"])
        assert {"target", "met", "meaning", "higher_is_better"} <= set(ratio)


def test_weight_sync(tmp_path):
    result = run_quick(weight_sync, tmp_path)
    check_common(
        result,
        "weight_sync",
        {
            "synthetic stream e2e / raw gRPC",
            "synthetic checkpoint(tmpfs) e2e / memcpy",
            "anvil-tiny → torch stream e2e / raw gRPC",
            "stream publish N=3 / N=1",
            "stream egress N=3 / model",
            "delta bytes per sync / model",
        },
    )
    egress = {r["name"]: r["value"] for r in result["ratios"]}
    assert egress["stream egress N=3 / model"] == 1.0, "the relay sends the model once"
    assert egress["direct egress N=3 / model"] == 3.0
    assert 0 < egress["delta bytes per sync / model"] < 1, "after a step, deltas send less than the model"
    names = {t["name"] for t in result["timings"]}
    assert any(name.endswith("· serialize") for name in names)
    assert any(name.endswith("· swap") for name in names)
    assert any(name.endswith("baseline: memcpy") for name in names)
    assert any(name.endswith("baseline: loopback TCP") for name in names)


def test_data_plane(tmp_path):
    result = run_quick(data_plane, tmp_path)
    check_common(result, "data_plane", {"anvil / raw gRPC (time)"})
    assert any("gateway" in note for note in result["notes"]) or any("REST" in t["name"] for t in result["timings"])


def test_stream_chunking(tmp_path):
    result = run_quick(stream_chunking, tmp_path)
    check_common(result, "stream_chunking", {"full+remainder / equal pieces (time)"})
    counts = [len(t["samples_s"]) for t in result["timings"]]
    assert counts == [2, 2], "both cuts timed in each ABBA pair"


def test_learner_overhead(tmp_path):
    result = run_quick(learner_overhead, tmp_path)
    check_common(result, "learner_overhead", {"service / in-process (time)"})


def test_rollout(tmp_path):
    result = run_quick(rollout, tmp_path)
    check_common(result, "rollout", {"torch: service / direct (tokens/s)"})
    assert all(t["tokens_per_s"] > 0 for t in result["timings"])


@pytest.mark.timeout(300)
def test_loop(tmp_path):
    result = run_quick(loop, tmp_path)
    check_common(result, "loop", {"async / sync (steps per minute)"})
    assert set(result["modes"]) == {"sync", "async"}
    assert 0 <= result["modes"]["sync"]["learner_idle_fraction"] <= 1


def test_load(tmp_path, anvil_home):
    result = run_quick(load, tmp_path)
    check_common(result, "load", {"p50 under load / idle p50"})
    figures = result["figures"]
    assert figures["errors"] == 0, figures["error_examples"]
    assert figures["requests"] == 40 and figures["training_steps"] > 0
    assert figures["gateway_rss_after_mib"] > 0


def test_gateway_durability(tmp_path, anvil_home):
    result = run_quick(gateway_durability, tmp_path)
    check_common(result, "gateway_durability", {"step with durable states / without"})
    assert [len(t["samples_s"]) for t in result["timings"]] == [4, 4]  # 6 steps, 2 of them warm-up


def test_checkpoint_stall(tmp_path):
    result = run_quick(checkpoint_stall, tmp_path)
    check_common(result, "checkpoint_stall", {"background / none (time)", "background / sync SaveState answer (time)"})


@pytest.mark.timeout(300)
def test_peers(tmp_path):
    result = run_quick(peers, tmp_path)
    check_common(result, "peers", {"steps per minute: anvil / trl"})
    assert [r["seed"] for r in result["per_seed"]] == [0], "--quick races one seed"
    summaries = {system: result["per_seed"][0][system] for system in ("trl", "anvil")}
    assert set(summaries) == {"trl", "anvil"} and all(s["steps_run"] == 6 for s in summaries.values())
    assert all(0 <= s["learner_idle_fraction"] <= 1 for s in summaries.values())
    assert all(0 <= row["reward"] <= 1 for rows in result["curves"].values() for row in rows)
    assert result["config"]["trl"]["lr_scheduler_type"] == "constant"
    assert (tmp_path / "peers.png").stat().st_size > 0


def test_routing_replay(tmp_path, anvil_home):
    result = run_quick(routing_replay, tmp_path)
    check_common(result, "routing_replay", {"kl_sample_train v2: replay / own routing"})
    steps = result["per_step"]
    assert steps[0]["staleness"] == 0 and steps[0]["kl_v2_own"] == pytest.approx(0.0, abs=1e-10), "same weights"
    assert all(0.0 <= step["routes_changed"] <= 1.0 for step in steps)
