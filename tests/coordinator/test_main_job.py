"""The README's main job (`anvil run configs/tiny.toml`), shortened to its warmup and 12 RL steps: the
supervised warmup runs first and only briefly (the first RL step still scores low: RL does the learning),
RL steps are numbered after it with the rollout serving each step's weights, completions are multi-token
answers ending in EOS, and the reward rises within the 12 steps."""

from __future__ import annotations

import json

from tests.coordinator.test_run import anvil_run, rows

RL_STEPS = 12


def test_main_job_warms_up_then_learns_multi_token_answers_by_rl(tmp_path):
    run_dir = tmp_path / "main-job"
    overrides = [f"loop.steps={RL_STEPS}", "loop.checkpoint_every=0"]
    result = anvil_run("configs/tiny.toml", "--run-dir", str(run_dir), *[a for o in overrides for a in ("--set", o)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["task"]["name"] == "reverse" and config["loop"]["max_tokens"] >= 6
    warmup_steps = config["warmup"]["steps"]
    assert 0 < warmup_steps <= 50, "a short warmup: RL does the learning"

    warmup = rows(run_dir, "warmup.jsonl")
    assert [r["step"] for r in warmup] == list(range(1, warmup_steps + 1))
    assert warmup[-1]["loss/mean_nll"] < 0.5 * warmup[0]["loss/mean_nll"]
    assert f"RL starts at step {warmup_steps + 1}" in result.stdout

    metrics = rows(run_dir)
    assert [r["step"] for r in metrics] == list(range(warmup_steps + 1, warmup_steps + RL_STEPS + 1))
    assert all(r["weights/rollout_version_min"] == r["step"] for r in metrics)
    assert metrics[0]["reward/mean"] < 0.3, "the warmup alone does not solve the task"
    tokens_per_sequence = metrics[-1]["tokens/completion"] / (
        config["loop"]["groups_per_batch"] * config["loop"]["group_size"]
    )
    assert tokens_per_sequence >= 3, "answers of several tokens"
    first = sum(r["reward/mean"] for r in metrics[:4]) / 4
    last = sum(r["reward/mean"] for r in metrics[-4:]) / 4
    assert last > 1.3 * first, (first, last)


def test_main_job_on_the_mixture_of_experts_model_learns(tmp_path):
    """configs/tiny-moe.toml: the same job on anvil-tiny-moe (Qwen3-MoE), with vLLM's CPU MoE kernel
    sampling every step's weights (the experts published per expert, repacked on reload)."""
    run_dir = tmp_path / "moe-job"
    overrides = [f"loop.steps={RL_STEPS}", "loop.checkpoint_every=0"]
    result = anvil_run(
        "configs/tiny-moe.toml", "--run-dir", str(run_dir), *[a for o in overrides for a in ("--set", o)]
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "anvil-tiny-moe" and config["services"]["rollout_engine"]["type"] == "vllm"
    metrics = rows(run_dir)
    assert len(metrics) == RL_STEPS
    assert all(r["weights/rollout_version_min"] == r["step"] for r in metrics)
    assert all(abs(r["kl_sample_train/v1"]) < 0.05 for r in metrics), "sampler and learner agree"
    first = sum(r["reward/mean"] for r in metrics[:4]) / 4
    last = sum(r["reward/mean"] for r in metrics[-4:]) / 4
    assert last > 1.2 * first, (first, last)
