"""RunConfig: one RL run, loaded from TOML (`anvil run configs/tiny.toml`), written resolved into the run
directory. It composes what the coordinator decides (task, loop) with how the services are reached or
launched; the launcher turns it into per-process `--set` overrides for the learner and rollout."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from coordinator.cluster.config import ClusterConfig
from coordinator.fleet.config import FleetConfig
from coordinator.objectives import ObjectiveConfig
from coordinator.objectives.policy_gradient import PolicyGradientConfig
from learner.config import BackendConfig, TorchBackendConfig
from protos.adam import AdamParams
from rollout.config import EngineConfig, default_engine_config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class TaskConfig(_Strict):
    name: str = "copy_digit"
    """Built-in task: copy_digit, next_digit, addition or reverse (ignored when `dataset` is set)."""
    dataset: Path | None = None
    """A .jsonl or .parquet file with `prompt` and `answer` columns, instead of a built-in task."""
    seed: int = 0
    """Seed of the generated problems."""


class WarmupConfig(_Strict):
    """A supervised phase before RL, through the same learner session (coordinator/warmup.py): a model that
    never emits the answer's shape gets no reward to learn from, so a few cross-entropy steps on right
    answers give RL a policy that sometimes does. Kept short on purpose: RL does the learning after it."""

    steps: int = Field(default=0, ge=0)
    """Supervised optimizer steps before the first RL step (0: none). They count as learner steps: the first
    RL step is `steps + 1`, and the rollout serves the warmed-up weights as that version before sampling."""
    batch_size: int = Field(default=64, ge=1)
    """Problems (prompt and right answer) per supervised step."""
    learning_rate: float = Field(default=1e-3, gt=0)
    """Adam's learning rate in this phase (the other Adam settings are loop.adam's)."""
    seed: int = 1
    """Seed of the warmup's generated problems: another draw of the task than RL's (a small task repeats
    prompts: `reverse` has 1000, most of which both phases see; the warmup is kept too short to learn
    them - the main job's leaves 1 % of answers exact)."""
    dataset: Path | None = None
    """A .jsonl or .parquet file with `prompt` and `answer` columns for this phase; unset: the task's own
    problems (generated with `seed`, or task.dataset's rows when the task reads a file)."""


class LoopConfig(_Strict):
    steps: int = Field(default=100, ge=1)
    """Optimizer steps (one batch of groups each)."""
    groups_per_batch: int = Field(default=8, ge=1)
    """Prompts per batch; each becomes a group of `group_size` samples."""
    group_size: int = Field(default=8, ge=1)
    """Samples per prompt; advantages are relative to the group."""
    max_tokens: int = Field(default=8, ge=1)
    """Longest completion."""
    temperature: float = Field(default=1.0, ge=0)
    """Sampling temperature."""
    max_off_policy_steps: int = Field(default=1, ge=0)
    """Staleness bound: a sample made by weights v may train step s only if s - v <= this (0 = synchronous).
    Batch b is sampled as soon as step b - max_off_policy_steps has been published, so rollout of the next
    batch overlaps training of this one when this is >= 1."""
    sampler_concurrency: int = Field(default=16, ge=1)
    """Sample calls in flight at once."""
    groups_per_pass: int | None = Field(default=4, ge=1)
    """Train while the batch is still being sampled: a forward/backward pass starts once this many of the
    batch's groups are scored (taking every one scored by then), the optimizer step once all are in. The
    sum of the passes' gradients is the whole batch's (the factor a loss normalisation needs from the
    whole batch is OptimStep's grad_scale), so only the time changes: on-policy, the learner trains the
    first groups while vLLM decodes the rest. None: one pass on the whole batch. Objectives whose
    datums need the whole batch (dpo, custom, a batch advantage baseline) always take one pass."""
    routing_replay: bool = False
    """Routing replay (R3) for Mixture-of-Experts models: the rollout returns the experts each token was routed
    to and the learner routes exactly so (protos/moe_routing.py). Needs an MoE model and a rollout engine that
    records routes (the torch engine; vLLM only on GPUs)."""
    scoring_concurrency: int = Field(default=64, ge=1)
    """Reward-function calls in flight at once, across groups (a group's samples are scored concurrently)."""
    objective: ObjectiveConfig = Field(default_factory=PolicyGradientConfig)
    """What each step trains: `type` = importance_sampling, ppo or cispo (a built-in policy-gradient loss
    on group-relative advantages), dpo (online DPO), or custom (a loss function of yours); the other keys
    are that objective's settings (coordinator/objectives/)."""
    adam: AdamParams = Field(default_factory=AdamParams)
    """Optimizer (Tinker's AdamParams and defaults); the learning rate is scaled by `lr_schedule`."""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """"linear" decays the learning rate from adam.learning_rate at step 1 to 10% of it at the last step."""
    publish_transport: Literal["stream", "direct", "checkpoint", "shm", "auto"] = "stream"
    """How new weights reach rollout after each step: "stream" sends them once and replicas relay them down
    a chain; "direct" streams to each replica; "shm"/"auto" use shared memory on the learner's host."""
    checkpoint_every: int = Field(default=0, ge=0)
    """Save the full state every this many steps (0: only at the end)."""


class LearnerWatchConfig(_Strict):
    """How `anvil run` supervises its learner (coordinator/learner_watch.py)."""

    restarts: int = Field(default=3, ge=0)
    """How many times a run restarts a failed learner (one it started) or waits for a remote one to come
    back, each time resuming from the last checkpoint; 0 ends the run at the first learner failure."""
    probe_interval_s: float = Field(default=5.0, gt=0)
    """How often the learner's health is checked while the run trains."""
    probe_timeout_s: float = Field(default=5.0, gt=0)
    """A health check not answered within this counts as failed."""
    failures_to_dead: int = Field(default=3, ge=1)
    """Consecutive failed health checks after which the learner is declared stopped (and, if this run
    started it, killed and restarted)."""
    recovery_timeout_s: float = Field(default=300.0, gt=0)
    """How long to wait for a remote learner to answer again before the run gives up."""


class ServicesConfig(_Strict):
    learner_address: str | None = None
    """A running learner (host:port); None starts one on loopback."""
    rollout_addresses: list[str] = Field(default_factory=list)
    """Running rollout replicas; empty starts `rollout_replicas` on loopback."""
    rollout_replicas: int = Field(default=1, ge=1)
    """Replicas to start when none are given."""
    rollout_engine: EngineConfig = Field(default_factory=default_engine_config)
    """Engine of the rollout replicas this run starts."""
    learner_backend: BackendConfig = Field(default_factory=TorchBackendConfig)
    """Backend and layout of the learner this run starts: the torch backend (`device`, micro-batch budget,
    ...), or `{type = "megatron", tp, pp, dp, ...}`, started as a torchrun group of tp * pp * dp ranks on
    this machine (`dp` unset: 1 on CPU, the GPUs left over on CUDA)."""
    separate_cores: bool = True
    """When this run starts vLLM replicas and a torch learner on this machine, the learner runs on the
    cores the replicas are not bound to (if any are left), with as many threads: otherwise one learner
    thread shares a replica's core and every parallel region waits for it (servicekit/cpus.py)."""
    api_key: str | None = None
    """Key of running services; a fresh random key protects the services this run starts."""
    startup_timeout_s: float = Field(default=300.0, gt=0)
    """How long to wait for a started service to listen."""
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    """How the rollout replicas are watched, routed across, failed over and restarted (docs/fleet.md)."""
    learner_watch: LearnerWatchConfig = Field(default_factory=LearnerWatchConfig)
    """How `anvil run` watches the learner, and how often it restarts a failed one (resuming from the last
    checkpoint) before the run ends."""

    @model_validator(mode="before")
    @classmethod
    def _learner_device(cls, data: object) -> object:
        """`learner_device = "cpu"` (before `learner_backend`) still sets the torch learner's device."""
        if isinstance(data, dict) and "learner_device" in data:
            data = dict(data)
            backend = dict(data.get("learner_backend") or {})
            backend.setdefault("device", data.pop("learner_device"))
            data["learner_backend"] = backend
        return data


class RunConfig(_Strict):
    model: str = "anvil-tiny"
    """Built-in model name or Hugging Face model directory."""
    seed: int = 0
    """Seed of the learner session and of sampling."""
    task: TaskConfig = Field(default_factory=TaskConfig)
    """What the policy is trained on."""
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    """An optional supervised phase on the task's right answers before RL starts."""
    loop: LoopConfig = Field(default_factory=LoopConfig)
    """The RL loop."""
    services: ServicesConfig = Field(default_factory=ServicesConfig)
    """Where learner and rollout run."""
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """Which machines the services this run starts are placed on: this one, or a Ray cluster's nodes."""

    @model_validator(mode="before")
    @classmethod
    def _learner_table(cls, data: object) -> object:
        """`[learner] backend = "megatron", tp = 2` is short for `[services.learner_backend] type = "megatron",
        tp = 2`: the learner this run starts (`anvil run ... --set learner.backend="megatron"`)."""
        if isinstance(data, dict) and "learner" in data:
            data = dict(data)
            table = dict(data.pop("learner"))
            services = dict(data.get("services") or {})
            backend = dict(services.get("learner_backend") or {})
            backend.update({("type" if key == "backend" else key): value for key, value in table.items()})
            services["learner_backend"] = backend
            data["services"] = services
        return data

    @model_validator(mode="after")
    def _dpo_needs_pairs(self) -> RunConfig:
        if self.loop.objective.type == "dpo" and self.loop.group_size < 2:
            raise ValueError("loop.objective.type = 'dpo' pairs samples within a group: set loop.group_size >= 2")
        objective = self.loop.objective
        if getattr(objective, "loss_normalization", None) == "constant" and objective.constant_tokens is None:
            objective.constant_tokens = self.loop.max_tokens  # Dr. GRPO's constant: the generation budget
        if self.loop.routing_replay and self.services.rollout_engine.type != "torch":
            raise ValueError(
                "loop.routing_replay needs a rollout engine that records routed experts: set "
                'services.rollout_engine.type = "torch" (vLLM records them only on GPUs, not in this build)'
            )
        return self
