"""`anvil run`: one RL run from a RunConfig, in a run directory, on local or remote services.

The run directory holds config.json (the resolved config), metrics.jsonl, consumed.jsonl,
checkpoints.jsonl (one line per SaveState: step, next batch, path), logs/ of started services,
learner/ (the learner's checkpoints when this run started it), tensorboard/ and curves.png.

Resume (`anvil run --resume RUN_DIR`): the latest checkpoint is loaded with its optimizer state, the
data cursor stored in it (the next batch) tells the loop where to continue, metrics and consumption
logs are cut back to that step, and the restored weights are published to rollout before sampling
resumes - so no prompt is lost and none is trained twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from coordinator.client.learner_api import LearnerSession
from coordinator.client.rollout_api import RolloutPool
from coordinator.config import RunConfig, ServicesConfig
from coordinator.envs import build_source
from coordinator.envs.answer_env import AnswerEnv
from coordinator.launcher import ServiceProcess, start_service, toml_value
from coordinator.loop import RLLoop
from coordinator.models import resolve_model
from coordinator.recorder import CONSUMED_FILE, METRICS_FILE, Recorder, read_jsonl, truncate_to_step
from protos.channels import open_channel
from protos.errors import NotFound

CONFIG_FILE = "config.json"
CHECKPOINTS_FILE = "checkpoints.jsonl"
SERVICES_FILE = "services.json"


@dataclass
class Services:
    learner_address: str
    rollout_addresses: list[str]
    api_key: str | None
    processes: list[ServiceProcess] = field(default_factory=list)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


async def launch_services(config: RunConfig, model_dir: Path, run_dir: Path) -> Services:
    """Connect to the run's services, starting on loopback whichever are not given."""
    return await start_services(config.services, config.model, model_dir, run_dir)


async def start_services(
    services_config: ServicesConfig,
    model: str,
    model_dir: Path,
    run_dir: Path,
    learner_overrides: tuple[str, ...] = (),
) -> Services:
    """Connect to the configured services, starting on loopback whichever are not given."""
    api_key = services_config.api_key or os.environ.get("ANVIL_API_KEY")
    started = Services(services_config.learner_address or "", list(services_config.rollout_addresses), api_key)
    if services_config.learner_address and services_config.rollout_addresses:
        return started
    if not started.api_key and not (services_config.learner_address or services_config.rollout_addresses):
        # Everything is local: a fresh key protects it. (With a remote service and no configured key,
        # the local ones run without auth too, since the learner sends its own key when it publishes.)
        started.api_key = secrets.token_urlsafe(16)
    env = {"HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    if started.api_key:
        env["ANVIL_API_KEY"] = started.api_key
    logs, timeout = run_dir / "logs", services_config.startup_timeout_s
    try:
        if not services_config.rollout_addresses:
            engine = services_config.rollout_engine.model_dump(exclude_none=True)
            overrides = [f"model={toml_value(model_dir)}", f"model_name={toml_value(model)}"]
            overrides += [f"engine.{key}={toml_value(value)}" for key, value in engine.items()]
            for replica in range(services_config.rollout_replicas):
                process = await start_service(f"rollout-{replica}", "rollout", overrides, logs, env, timeout)
                started.processes.append(process)
                started.rollout_addresses.append(process.address)
        if not services_config.learner_address:
            overrides = [
                f"checkpoint_dir={toml_value(run_dir / 'learner')}",
                'backend.type="torch"',
                f"backend.device={toml_value(services_config.learner_device)}",
                *learner_overrides,
            ]
            process = await start_service("learner", "learner", overrides, logs, env, timeout)
            started.processes.append(process)
            started.learner_address = process.address
    except BaseException:
        started.stop()
        raise
    (run_dir / SERVICES_FILE).write_text(
        json.dumps({p.name: {"pid": p.pid, "address": p.address} for p in started.processes}, indent=1)
    )
    return started


def latest_checkpoint(run_dir: Path) -> dict:
    checkpoints = read_jsonl(run_dir / CHECKPOINTS_FILE)
    if not checkpoints:
        raise NotFound(f"{run_dir} has no checkpoint to resume from ({CHECKPOINTS_FILE} is empty or missing)")
    return checkpoints[-1]


async def run(config: RunConfig, run_dir: Path, resume: bool = False, console: Console | None = None) -> list[dict]:
    """Run (or resume) the RL job; return the metrics rows of the whole run."""
    console = console or Console()
    # SIGTERM (a scheduler, `kill`) stops the run like Ctrl-C: the task is cancelled and the `finally`
    # below stops the services this run started.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(config.model_dump_json(indent=2))
    checkpoint = latest_checkpoint(run_dir) if resume else None

    model_dir = resolve_model(config.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    source = build_source(config.task.name, config.task.dataset, config.task.seed)
    console.print(f"[bold]anvil run[/] {run_dir}: {config.model} on {source.name}, {config.loop.steps} steps")
    services = await launch_services(config, model_dir, run_dir)
    recorder = Recorder(run_dir, config.loop.steps, console)
    learner_channel = open_channel(services.learner_address, api_key=services.api_key)
    rollout = RolloutPool(services.rollout_addresses, api_key=services.api_key)
    try:
        # A learner this run started knows the model by its directory; a remote one by the configured name.
        base_model = config.model if config.services.learner_address else str(model_dir)
        session = await LearnerSession.create(learner_channel, base_model, lora_rank=0, seed=config.seed)
        start_batch = 0
        if checkpoint is not None:
            loaded = await session.load_state(checkpoint["path"], with_optimizer=True)
            start_batch = json.loads(loaded.client_state)["next_batch"]
            session.info.step = loaded.step
            for log in (METRICS_FILE, CONSUMED_FILE):
                truncate_to_step(run_dir / log, loaded.step)
            if loaded.step > 0:
                await session.publish_weights(rollout.addresses, config.loop.publish_transport)
            console.print(f"resumed from step {loaded.step} ({checkpoint['path']}), next batch {start_batch}")

        async def save_checkpoint(step: int, next_batch: int) -> None:
            state = json.dumps({"next_batch": next_batch, "step": step}).encode()
            saved = await session.save_state(f"step-{step:06d}", client_state=state, overwrite=True)
            with (run_dir / CHECKPOINTS_FILE).open("a") as handle:
                handle.write(json.dumps({"step": step, "next_batch": next_batch, "path": saved.path}) + "\n")

        loop = RLLoop(
            config=config.loop,
            session=session,
            rollout=rollout,
            source=source,
            make_env=lambda problem: AnswerEnv(problem, tokenizer),
            seed=config.seed,
            start_batch=start_batch,
            on_step=recorder.on_step,
            on_checkpoint=save_checkpoint,
        )
        await loop.run()
    finally:
        await learner_channel.close()
        await rollout.close()
        services.stop()
        recorder.close()
    return read_jsonl(run_dir / METRICS_FILE)
