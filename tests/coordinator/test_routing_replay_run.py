"""`loop.routing_replay` end to end: `anvil run` on the Mixture-of-Experts built-in with the torch engine
recording each position's experts, the routes riding the trajectory batch, and the learner routing exactly
so (reporting how many routes its own routers would have changed); refused up front with vLLM."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coordinator.client.convert import datum_row
from coordinator.config import RunConfig
from coordinator.objectives.maths import policy_datum
from protos.arrow_schemas import encode_batch, make_batch
from protos.errors import InvalidArgument
from servicekit.config import load_config
from tests.coordinator.test_run import anvil_run, rows

STEPS = 6


def test_an_moe_run_with_routing_replay_trains_on_the_samplers_routes(tmp_path):
    run_dir = tmp_path / "replay"
    overrides = [
        f"loop.steps={STEPS}", "loop.checkpoint_every=0", "loop.routing_replay=true", "warmup.steps=4",
        "loop.groups_per_batch=8", "loop.group_size=8", 'services.rollout_engine.type="torch"',
    ]  # fmt: skip
    result = anvil_run(
        "configs/tiny-moe.toml", "--run-dir", str(run_dir), *[a for o in overrides for a in ("--set", o)]
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((run_dir / "config.json").read_text())["loop"]["routing_replay"] is True
    metrics = rows(run_dir)
    assert len(metrics) == STEPS
    changed = [r["learner/routing_replay_changed"] for r in metrics]  # present only when routes were replayed
    assert all(0.0 <= c < 0.5 for c in changed), changed
    # One step stale: the learner is a step ahead of the weights that routed the batch, so its own routers
    # would pick other experts for some positions (replay keeps the sampler's).
    assert any(r["staleness/mean"] > 0 and c > 0 for r, c in zip(metrics, changed, strict=True)), changed
    assert all(abs(r["kl_sample_train/v1"]) < 0.05 for r in metrics)


def test_routes_go_into_the_datum_and_its_arrow_row():
    routes = np.arange(4 * 3 * 2, dtype=np.int32).reshape(4, 3, 2)  # prompt 3 + completion 2 - 1 positions
    datum = policy_datum([1, 2, 3], [4, 5], [-0.5, -0.7], 1.0, [7, 7], routes)
    assert datum.loss_fn_inputs["routed_experts"].shape == [4, 3, 2]
    row = datum_row(datum)
    assert row["routed_experts"].dtype == np.int32
    np.testing.assert_array_equal(row["routed_experts"], routes.reshape(-1))
    assert encode_batch(make_batch([row]))


def test_routing_replay_with_vllm_is_refused_at_load():
    with pytest.raises(InvalidArgument, match=r'rollout_engine\.type = "torch"'):
        load_config(RunConfig, None, ["loop.routing_replay=true", 'services.rollout_engine.type="vllm"'])
    config = load_config(RunConfig, None, ["loop.routing_replay=true", 'services.rollout_engine.type="torch"'])
    assert config.loop.routing_replay
