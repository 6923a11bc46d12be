"""Routing replay's effect on the sampler/learner mismatch, measured paired: the same batches scored by the
learner with its own routing and with the sampler's routes replayed.

anvil-tiny-moe (Qwen3-MoE) on the main job's `reverse` task: the real torch engine samples (recording each
position's experts) and the real torch learner trains, in process, after a short supervised warmup. The
engine is kept one step behind the learner, as the asynchronous loop's default (`max_off_policy_steps = 1`)
has it: at each step the learner, a step ahead, scores the batch twice (Forward without and with the
routes), then trains on it (its own routing: the measurement leaves the trajectory alone). Reported per
step and as means: Tinker's `kl_sample_train` v1 (mean of sampler minus learner logprob) and v2 (half the
mean squared difference), over completion tokens, and the fraction of routes the learner's own routers
would have changed. The batches travel the Arrow path (datum rows, IPC, the learner's ingestion). Each
Forward is timed too (replay turns prefix sharing off and adds the route bookkeeping).

    python -m bench.routing_replay            # 30 warmup + 40 RL steps, 16 prompts x 8 samples
    python -m bench.routing_replay --quick    # 2 + 3 steps (the smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np
from transformers import AutoTokenizer

from bench.common import Ratio, Timing, base_parser, console, run_main, write_results
from coordinator.client.convert import datum_row
from coordinator.envs import build_source
from coordinator.envs.answer_env import AnswerEnv
from coordinator.models import resolve_model
from coordinator.objectives.maths import group_advantages, policy_datum, sampler_learner_kl
from coordinator.warmup import warmup_data
from learner.backends.torch_backend import TorchBackend
from learner.batch import TrainingBatch, batch_from_arrow
from learner.config import TorchBackendConfig
from learner.losses import LOSSES
from protos.adam import AdamParams
from protos.arrow_schemas import encode_batch, make_batch
from rollout.config import TorchEngineConfig
from rollout.engines.base import PromptScoring, SamplingSpec
from rollout.engines.torch_engine import TorchEngine

MODEL = "anvil-tiny-moe"


def to_batch(data: list, vocab: int) -> TrainingBatch:
    return batch_from_arrow(encode_batch(make_batch([datum_row(d, i) for i, d in enumerate(data)])), vocab)


def without_routes(batch: TrainingBatch) -> TrainingBatch:
    return TrainingBatch([replace(d, routed_experts=None) for d in batch.data], batch.input_names)


def completion_logprobs(logprobs: list[np.ndarray], completion_lengths: list[int]) -> np.ndarray:
    return np.concatenate([row[len(row) - n :] for row, n in zip(logprobs, completion_lengths, strict=True)])


async def warm_up(backend: TorchBackend, envs: list[AnswerEnv], steps: int, vocab: int) -> None:
    """Supervised steps on right answers (coordinator/warmup.py's data, 64 problems a step, lr 1e-3: the main
    job's warmup settings), so RL has rewards to learn from."""
    loss = LOSSES["cross_entropy"]
    for step in range(steps):
        data = await warmup_data(envs[(step * 64) % len(envs) :][:64])
        backend.forward(to_batch(data, vocab), loss, dict(loss.defaults), backward=True)
        backend.optim_step(AdamParams(learning_rate=1e-3, eps=1e-8, grad_clip_norm=1.0))


async def main(args: argparse.Namespace) -> None:
    warmup_steps, rl_steps, groups, group_size = (2, 3, 4, 4) if args.quick else (30, args.steps, 16, 8)
    model_dir = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = TorchEngine(model_dir, TorchEngineConfig(device="cpu"))
    backend = TorchBackend(model_dir, TorchBackendConfig(device="cpu"), seed=0)
    vocab = backend.description.vocab_size
    source = build_source("reverse", None, 0)
    envs = [AnswerEnv(source.problem(i), tokenizer) for i in range(max(64 * warmup_steps, groups * rl_steps))]
    await warm_up(backend, envs, warmup_steps, vocab)
    ppo = LOSSES["ppo"]
    rows = []
    forward_s: dict[str, list[float]] = {"own": [], "replay": []}
    snapshot = {name: tensor.detach().clone() for name, tensor in backend.named_weights()}
    for step in range(rl_steps):
        await engine.load_weights(snapshot)  # the weights before the learner's last step: one step stale
        problems = envs[step * groups : (step + 1) * groups]
        data, lengths, sampler, step_rewards = [], [], [], []
        for env_index, env in enumerate(problems):
            prompt = await env.prompt_tokens()
            spec = SamplingSpec(8, 1.0, 1.0, -1, args.seed * 100_003 + step * groups + env_index, (), (), False, True)
            result = await engine.sample(prompt, group_size, spec, PromptScoring())
            rewards = [(await env.score(s.tokens)).reward for s in result.sequences]
            step_rewards += rewards
            for sequence, advantage in zip(result.sequences, group_advantages(rewards, True), strict=True):
                routes = sequence.routed_experts.numpy()
                data.append(policy_datum(prompt, sequence.tokens, sequence.logprobs, advantage, None, routes))
                lengths.append(len(sequence.tokens))
                sampler.append(np.asarray(sequence.logprobs))
        batch = to_batch(data, vocab)
        sampler_T = np.concatenate(sampler)
        began = time.perf_counter()
        own = backend.forward(without_routes(batch), ppo, dict(ppo.defaults), backward=False)
        forward_s["own"].append(time.perf_counter() - began)
        began = time.perf_counter()
        replayed = backend.forward(batch, ppo, dict(ppo.defaults), backward=False)
        forward_s["replay"].append(time.perf_counter() - began)
        own_kl = sampler_learner_kl(sampler_T, completion_logprobs(own.logprobs, lengths))
        replay_kl = sampler_learner_kl(sampler_T, completion_logprobs(replayed.logprobs, lengths))
        snapshot = {name: tensor.detach().clone() for name, tensor in backend.named_weights()}
        backend.forward(without_routes(batch), ppo, dict(ppo.defaults), backward=True)
        backend.optim_step(AdamParams(learning_rate=3e-4, eps=1e-8, grad_clip_norm=1.0))
        row = {
            "step": step + 1, "staleness": 0 if step == 0 else 1,
            "reward": float(np.mean(step_rewards)),
            "kl_v1_own": own_kl[0], "kl_v2_own": own_kl[1], "kl_v1_replay": replay_kl[0], "kl_v2_replay": replay_kl[1],
            "routes_changed": replayed.metrics.get("learner/routing_replay_changed:mean", 0.0),
        }  # fmt: skip
        rows.append(row)
        console.print(
            f"step {row['step']:3d}  reward {row['reward']:.3f}  kl v2 own {row['kl_v2_own']:.5f}  "
            f"replay {row['kl_v2_replay']:.5f}  routes changed {row['routes_changed']:.3f}"
        )
    stale = [r for r in rows if r["staleness"] == 1] or rows
    own_v2 = statistics.mean(r["kl_v2_own"] for r in stale)
    replay_v2 = statistics.mean(r["kl_v2_replay"] for r in stale)
    ratios = [
        Ratio(
            "kl_sample_train v2: replay / own routing", replay_v2 / own_v2 if own_v2 else float("nan"),
            "the learner's mismatch with the sampler (half the mean squared logprob difference, one step stale) "
            "with the sampler's routes replayed over with its own routing (no target: < 1 is what replay is for)",
        )
    ]  # fmt: skip
    write_results(
        "routing_replay", args.out,
        {"model": MODEL, "task": "reverse", "warmup_steps": warmup_steps, "rl_steps": rl_steps, "groups": groups,
         "group_size": group_size, "seed": args.seed},
        [Timing("learner Forward, own routing", forward_s["own"]),
         Timing("learner Forward, routes replayed", forward_s["replay"])],
        ratios,
        extra={"per_step": rows, "means_stale_steps": {
            "kl_v1_own": statistics.mean(r["kl_v1_own"] for r in stale), "kl_v2_own": own_v2,
            "kl_v1_replay": statistics.mean(r["kl_v1_replay"] for r in stale), "kl_v2_replay": replay_v2,
            "routes_changed": statistics.mean(r["routes_changed"] for r in stale)}},
    )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser("routing_replay", __doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="RL steps")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
