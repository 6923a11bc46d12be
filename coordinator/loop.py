"""The asynchronous RL actor loop: prompt feeder -> samplers -> (scoring) -> trainer, joined by queues.

    feeder    emits the prompts of batch b (problem indices b*G .. b*G+G-1, deterministic) once
              step b - max_off_policy_steps has been published: that is the staleness bound, and with
              a bound >= 1 the next batch is sampled while this one trains;
    samplers  a pool (asyncio-pool's AioPool) of at most `sampler_concurrency` tasks, one per prompt,
              each calling Sample (n = group_size) on a rollout replica and scoring every completion
              with the prompt's Env (a second pool bounds reward calls to `scoring_concurrency`);
    trainer   takes batch b's groups as they are scored (coordinator/step_inputs.py), drops any group
              whose oldest token was sampled by a version older than the bound (counted; an in-flight
              weight update can give one completion tokens of two versions, and the oldest decides),
              hands the fresh groups to the run's Objective (datums, loss and the forward/backward
              passes: coordinator/objectives/) - in passes of `groups_per_pass` while the rest are still
              sampled, when the objective allows - runs OptimStep, and publishes the new weights to
              every replica before releasing the next batch.

The loop never decides where services run or how state is stored: `on_step` receives each step's
metrics and `on_checkpoint` is asked to save after the steps it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
from asyncio_pool import AioPool

from coordinator.client.learner_api import LearnerSession
from coordinator.client.types import SampledSequence, SamplingParams
from coordinator.config import LoopConfig
from coordinator.envs.base import Env, Problem, ProblemSource
from coordinator.fleet.replica_set import ReplicaSet
from coordinator.objectives import ScoredGroup, make_objective
from coordinator.objectives.maths import sampler_learner_kl
from coordinator.step_inputs import BatchArrivals, merge_pass_metrics, sample_metrics, sampler_logprobs


@dataclass
class StepResult:
    step: int
    batch: int
    metrics: dict[str, float]
    problem_indices: list[int] = field(default_factory=list)
    """Every problem this step consumed (trained on, or dropped as stale)."""


class RLLoop:
    def __init__(
        self,
        config: LoopConfig,
        session: LearnerSession,
        rollout: ReplicaSet,
        source: ProblemSource,
        make_env: Callable[[Problem], Env],
        seed: int,
        start_batch: int,
        on_step: Callable[[StepResult], Awaitable[None] | None],
        on_checkpoint: Callable[[int, int], Awaitable[None]],
    ) -> None:
        self.config = config
        self.session = session
        self.rollout = rollout
        self.source = source
        self.make_env = make_env
        self.seed = seed
        self.start_batch = start_batch
        self.end_batch = config.steps
        self.on_step = on_step
        self.on_checkpoint = on_checkpoint
        self.objective = make_objective(config.objective)
        # The fleet publishes through this session: after each step, and to replicas that come back stale.
        rollout.publisher = lambda addresses, rewind=False: session.publish_weights(
            addresses,
            config.publish_transport,
            partial_ok=True,
            target_timeout_s=rollout.config.publish_timeout_s,
            rewind=rewind,
        )
        self.step = int(session.info.step)
        self._steps_before_rl = self.step - start_batch  # a supervised warmup's steps (coordinator/warmup.py)
        self._released = start_batch  # batches whose prompts may be sampled: < released + bound + 1
        self._released_changed = asyncio.Condition()

    # --- tasks --------------------------------------------------------------------------------------

    async def run(self) -> None:
        if self.start_batch >= self.end_batch:
            return
        scored: asyncio.Queue[ScoredGroup | Exception] = asyncio.Queue()
        samplers = AioPool(size=self.config.sampler_concurrency)
        scorers = AioPool(size=self.config.scoring_concurrency)
        feeder = asyncio.create_task(self._feed(samplers, scorers, scored))
        try:
            await self._train(scored)
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
            await samplers.cancel()
            await scorers.cancel()

    async def _feed(self, samplers: AioPool, scorers: AioPool, scored: asyncio.Queue) -> None:
        """Spawn one sampling task per prompt, in order; the pool holds `sampler_concurrency` in flight, so
        this waits for room (and for the staleness bound) before the next prompt."""
        size, bound = self.config.groups_per_batch, self.config.max_off_policy_steps
        try:
            for batch in range(self.start_batch, self.end_batch):
                async with self._released_changed:
                    await self._released_changed.wait_for(lambda b=batch: b <= self._released + bound)
                for offset in range(size):
                    problem = self.source.problem(batch * size + offset)
                    await samplers.spawn(self._sample(batch, problem, scorers, scored))
        except Exception as exc:  # a task source that fails must end the run, not leave the trainer waiting
            await scored.put(exc)

    async def _sample(self, batch: int, problem: Problem, scorers: AioPool, scored: asyncio.Queue) -> None:
        """Sample and score one group; a failure goes to the trainer, which ends the run with it."""
        try:
            group = await self._sample_and_score(batch, problem, scorers)
        except Exception as exc:
            await scored.put(exc)
            return
        await scored.put(group)

    async def _sample_and_score(self, batch: int, problem: Problem, scorers: AioPool) -> ScoredGroup:
        config = self.config
        env = self.make_env(problem)
        prompt = await env.prompt_tokens()
        params = SamplingParams(
            max_tokens=config.max_tokens,
            temperature=config.temperature,
            seed=group_seed(self.seed, batch, problem.index),
        )
        start = time.perf_counter()
        response = await self.rollout.sample(
            prompt, config.group_size, params, return_routed_experts=config.routing_replay
        )
        sample_s = time.perf_counter() - start
        # A group's completions are scored concurrently (a verifier that waits - a sandbox, a judge - costs
        # its latency once per group, not once per sample), at most `scoring_concurrency` calls in flight.
        pending = [await scorers.spawn(env.score(sequence.tokens)) for sequence in response.sequences]
        scores = [await score for score in pending]
        return ScoredGroup(
            batch=batch,
            problem=problem,
            prompt=prompt,
            sequences=response.sequences,
            rewards=[s.reward for s in scores],
            correct=[s.metrics.get("correct", float("nan")) for s in scores],
            sampler_version=oldest_token_version(response.sequences, response.weight_version),
            sample_s=sample_s,
        )

    async def _train(self, scored: asyncio.Queue) -> None:
        pending: defaultdict[int, list[ScoredGroup]] = defaultdict(list)
        for batch in range(self.start_batch, self.end_batch):
            step_start = time.perf_counter()
            arrivals = BatchArrivals(scored, pending, batch)
            result = await self._train_batch(batch, arrivals)
            result.metrics["time/wait_for_samples_s"] = arrivals.waited_s
            result.metrics["time/step_s"] = time.perf_counter() - step_start
            completion_tokens = result.metrics["tokens/completion"]
            result.metrics["tokens/per_s"] = completion_tokens / max(result.metrics["time/step_s"], 1e-9)
            async with self._released_changed:
                self._released = batch + 1
                self._released_changed.notify_all()
            maybe = self.on_step(result)
            if asyncio.iscoroutine(maybe):
                await maybe
            every = self.config.checkpoint_every
            if (every and self.step % every == 0) or batch + 1 == self.end_batch:
                await self.on_checkpoint(self.step, batch + 1)

    # --- one step -----------------------------------------------------------------------------------

    async def _train_batch(self, batch: int, arrivals: BatchArrivals) -> StepResult:
        """Forward/backward passes on the batch's groups as they arrive (a streaming objective: a pass
        once `groups_per_pass` are scored, taking every one scored by then; otherwise one pass on the
        whole batch), then OptimStep with the factor the whole batch shares, then the publication."""
        config, size = self.config, self.config.groups_per_batch
        streamed = self.objective.streams and config.groups_per_pass is not None
        per_pass = config.groups_per_pass if streamed else size
        groups: list[ScoredGroup] = []
        fresh: list[ScoredGroup] = []
        passes: list[dict[str, float]] = []
        sampler_parts: list[np.ndarray] = []
        learner_parts: list[np.ndarray | None] = []
        train_s = 0.0
        while len(groups) < size:
            part = await arrivals.take(min(per_pass, size - len(groups)))
            groups += part
            part = [g for g in part if self.step - g.sampler_version <= config.max_off_policy_steps]
            fresh += part
            if streamed and not part:
                continue
            train_start, pass_metrics = time.perf_counter(), {}
            accumulate = self.objective.accumulate_part if streamed else self.objective.accumulate_gradients
            learner_parts.append(await accumulate(self.session, part, pass_metrics))
            sampler_parts.append(sampler_logprobs(part))
            passes.append(pass_metrics)
            train_s += time.perf_counter() - train_start
        metrics = sample_metrics(groups, fresh, self.step)
        sampler_T = np.concatenate(sampler_parts) if sampler_parts else np.zeros(0)
        metrics["tokens/completion"] = float(sampler_T.size)
        metrics["entropy/sampler_estimate"] = float(-sampler_T.mean()) if sampler_T.size else 0.0
        if all(lp is not None or s.size == 0 for lp, s in zip(learner_parts, sampler_parts, strict=True)):
            learner_T = np.concatenate([np.zeros(0) if lp is None else lp for lp in learner_parts] or [np.zeros(0)])
            if learner_T.size == sampler_T.size and sampler_T.size:
                metrics["kl_sample_train/v1"], metrics["kl_sample_train/v2"] = sampler_learner_kl(sampler_T, learner_T)
        grad_scale = self.objective.batch_grad_scale(fresh) if streamed and fresh else 1.0
        metrics.update(merge_pass_metrics(passes, grad_scale))

        train_start = time.perf_counter()
        factor = learning_rate_factor(config.lr_schedule, self.step - self._steps_before_rl, config.steps)
        base = config.adam
        adam = dataclasses.replace(
            base, learning_rate=base.learning_rate * factor, grad_scale=base.grad_scale * grad_scale
        )
        metrics["optim/learning_rate"] = adam.learning_rate
        stepped = await self.session.optim_step(adam)
        self.step = int(stepped.step)
        metrics.update({f"optim/{k.split(':')[0]}": v for k, v in stepped.metrics.items()})
        metrics["time/train_s"] = train_s + time.perf_counter() - train_start

        sync_start = time.perf_counter()
        published = await self.rollout.publish(self.rollout.publisher, version=self.step)
        metrics["time/weight_sync_s"] = time.perf_counter() - sync_start
        metrics["weights/published_bytes"] = float(published.num_bytes) if published is not None else 0.0
        # What the learner itself sent, all replicas together (a relay sends the model once), per model.
        metrics["weights/egress_bytes"] = float(published.egress_bytes) if published is not None else 0.0
        metrics["weights/egress_per_model"] = (
            published.egress_bytes / published.num_bytes if published is not None and published.num_bytes else 0.0
        )
        metrics["weights/rollout_version_min"] = float(min(await self.rollout.versions(), default=-1))
        metrics.update(self.rollout.metrics())
        indices = sorted(g.problem.index for g in groups)
        return StepResult(step=self.step, batch=batch, metrics=metrics, problem_indices=indices)


def oldest_token_version(sequences: list[SampledSequence], default: int) -> int:
    """The staleness of a group is that of its oldest token: the version that produced it, per token when
    the replica labels tokens, else the response's version."""
    return min((v for s in sequences for v in s.token_weight_versions or []), default=default)


def group_seed(run_seed: int, batch: int, problem_index: int) -> int:
    """The sampling seed of one group: reproducible (a retried group samples the same completions), and
    drawn from a hash, because samplers seed a group's n samples with consecutive seeds (vLLM: seed + i).
    Consecutive group seeds - as `run_seed * k + problem_index` were - made problem p's sample i+1 and
    problem p+1's sample i share a seed, so a batch of 16 x 32 samples drew from ~47 noise vectors, the
    same ones every step: near-identical completions across prompts and steps, and a nearly uniform
    policy that found the right answer a fraction as often as independent draws would (issue 24)."""
    digest = hashlib.blake2b(f"anvil-group:{run_seed}:{batch}:{problem_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**62)  # + the sample index stays a positive int64


def learning_rate_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate for the optimizer step after `step` completed steps."""
    if schedule == "linear" and total_steps > 1:
        return 1.0 - 0.9 * min(step, total_steps - 1) / (total_steps - 1)
    return 1.0
