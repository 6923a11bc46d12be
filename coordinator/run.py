"""`anvil run`: one RL run from a RunConfig, in a run directory, on local or remote services.

The run directory holds config.json (the resolved config), metrics.jsonl, consumed.jsonl,
checkpoints.jsonl (one line per SaveState: step, next batch, path), logs/ of started services,
learner/ (the learner's checkpoints when this run started it), tensorboard/ and curves.png.

Resume (`anvil run --resume RUN_DIR`): the newest checkpoint that verifies is loaded with its optimizer
state (a newer one that does not - truncated, never finished, deleted - is skipped, and the skip
printed), the data cursor stored in it (the next batch) tells the loop where to continue, metrics,
consumption and checkpoint logs are cut back to its step, and the restored weights are published to
rollout before sampling resumes - so no prompt is lost and none is trained twice.

A learner that dies or stops answering mid-run (coordinator/learner_watch.py) is restarted - or, when
the run did not start it, waited for - up to `services.learner_watch.restarts` times; the run then
continues exactly as a resume would, from the newest checkpoint (from the start when there is none), the
replicas rewound to the restored weights. Any other failed service ends the run with a `ServiceFailure`
naming it (coordinator/failures.py).
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from rich.console import Console

from coordinator.client.learner_api import LearnerSession
from coordinator.config import RunConfig
from coordinator.envs import build_source
from coordinator.envs.answer_env import AnswerEnv
from coordinator.envs.base import Problem
from coordinator.failures import CHECKPOINTS_FILE, ServiceFailure, identify_failure
from coordinator.fleet.replica_set import ReplicaSet
from coordinator.learner_watch import wait_until_answering, watched
from coordinator.loop import RLLoop
from coordinator.models import resolve_model
from coordinator.recorder import CONSUMED_FILE, METRICS_FILE, Recorder, read_jsonl, truncate_to_step
from coordinator.services import launch_services
from coordinator.warmup import WARMUP_FILE, supervised_warmup
from protos.anvil.v1 import learner_pb2
from protos.channels import open_channel
from protos.errors import FailedPrecondition, NotFound

CONFIG_FILE = "config.json"


def recorded_checkpoints(run_dir: Path) -> list[dict]:
    """checkpoints.jsonl, oldest first; checked before any service starts, so a resume with nothing to
    resume from fails at once."""
    checkpoints = read_jsonl(run_dir / CHECKPOINTS_FILE)
    if not checkpoints:
        raise NotFound(f"{run_dir} has no checkpoint to resume from ({CHECKPOINTS_FILE} is empty or missing)")
    return checkpoints


async def load_newest_intact(
    session: LearnerSession, checkpoints: list[dict], console: Console
) -> tuple[learner_pb2.LoadStateResponse, dict]:
    """LoadState the newest checkpoint the learner verifies, skipping (and saying so) newer ones that fail
    verification. The learner checks every file against the checkpoint's manifest before it loads
    anything, so a refused checkpoint leaves the session untouched for the next try."""
    reasons = []
    for checkpoint in reversed(checkpoints):
        try:
            return await session.load_state(checkpoint["path"], with_optimizer=True), checkpoint
        except (FailedPrecondition, NotFound) as exc:
            reasons.append(f"step {checkpoint['step']}: {exc}")
            console.print(
                f"skipping the checkpoint of step {checkpoint['step']}: {exc}",
                markup=False, soft_wrap=True, style="yellow",
            )  # fmt: skip
    raise FailedPrecondition(f"no checkpoint in {CHECKPOINTS_FILE} verifies ({'; '.join(reasons)})")


async def run(config: RunConfig, run_dir: Path, resume: bool = False, console: Console | None = None) -> list[dict]:
    """Run (or resume) the RL job; return the metrics rows of the whole run."""
    console = console or Console()
    # SIGTERM (a scheduler, `kill`) stops the run like Ctrl-C: the task is cancelled and the `finally`
    # below stops the services this run started.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(config.model_dump_json(indent=2))
    if resume:
        recorded_checkpoints(run_dir)  # nothing to resume from fails now, before any service starts

    model_dir = resolve_model(config.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    source = build_source(config.task.name, config.task.dataset, config.task.seed)
    console.print(f"[bold]anvil run[/] {run_dir}: {config.model} on {source.name}, {config.loop.steps} steps")
    services = await launch_services(config, model_dir, run_dir)
    recorder = Recorder(run_dir, config.warmup.steps + config.loop.steps, console)
    learner_channel = open_channel(services.learner_address, api_key=services.api_key)
    rollout = await ReplicaSet.connect(services.rollout_addresses, config.services.fleet, api_key=services.api_key)
    supervisor = services.supervise(rollout, config.services.fleet)
    restarts = 0
    try:
        while True:
            try:
                await train(config, run_dir, learner_channel, rollout, source, tokenizer, recorder, console,
                            model_dir, resume_from=recorded_checkpoints(run_dir) if resume else [],
                            rewind=restarts > 0, watched_address=services.learner_address)  # fmt: skip
                break
            except Exception as exc:
                failure = exc if isinstance(exc, ServiceFailure) else await identify_failure(exc, services, rollout)
                if failure is None:
                    raise
                if failure.service != "learner" or restarts >= config.services.learner_watch.restarts:
                    if failure is exc:
                        raise
                    raise failure from exc
                restarts += 1
                console.print(
                    f"{failure}; {'restarting it' if services.start_learner else 'waiting for it'} "
                    f"({restarts} of {config.services.learner_watch.restarts}) to resume from the last checkpoint",
                    markup=False, soft_wrap=True, style="yellow",
                )  # fmt: skip
                await learner_channel.close()
                if services.start_learner is not None:
                    await services.restart_learner()
                else:
                    await wait_until_answering(services.learner_address, config.services.learner_watch)
                learner_channel = open_channel(services.learner_address, api_key=services.api_key)
                resume = bool(read_jsonl(run_dir / CHECKPOINTS_FILE))
                if not resume:  # no checkpoint yet: the run starts over, from the base weights
                    for log in (METRICS_FILE, CONSUMED_FILE, WARMUP_FILE):
                        truncate_to_step(run_dir / log, 0)
    finally:
        if supervisor is not None:
            await supervisor.close()
        await learner_channel.close()
        await rollout.close()
        services.stop()
        recorder.close()
    return read_jsonl(run_dir / METRICS_FILE)


async def train(
    config: RunConfig,
    run_dir: Path,
    learner_channel,
    rollout: ReplicaSet,
    source,
    tokenizer,
    recorder: Recorder,
    console: Console,
    model_dir: Path,
    resume_from: list[dict],
    rewind: bool,
    watched_address: str,
) -> None:
    """One attempt at the run on this learner: a session, the newest intact checkpoint of `resume_from`
    loaded (logs cut back to it) and published, then the loop to the last step, with the learner watched.
    `rewind`: the learner was restarted, and the replicas serve weights it went back on (even with no
    checkpoint: then the base weights, version 0, are published)."""
    # A learner this run started knows the model by its directory; a remote one by the configured name.
    base_model = config.model if config.services.learner_address else str(model_dir)
    session = await LearnerSession.create(learner_channel, base_model, lora_rank=0, seed=config.seed)
    console.print(f"learner: {session.info.backend}; rollout: {len(rollout.addresses)} replica(s)", markup=False)
    recorder.training_started()
    start_batch = 0

    def make_env(problem: Problem) -> AnswerEnv:
        return AnswerEnv(problem, tokenizer)

    if resume_from:
        loaded, checkpoint = await load_newest_intact(session, resume_from, console)
        start_batch = json.loads(loaded.client_state)["next_batch"]
        session.info.step = loaded.step
        # Work after the checkpoint (and checkpoints after it, if one was skipped) is redone.
        for log in (METRICS_FILE, CONSUMED_FILE, CHECKPOINTS_FILE):
            truncate_to_step(run_dir / log, loaded.step)
        console.print(
            f"resumed from step {loaded.step} ({checkpoint['path']}), next batch {start_batch}",
            markup=False, soft_wrap=True,
        )  # fmt: skip
    elif config.warmup.steps:
        warmup_source = build_source(config.task.name, config.warmup.dataset or config.task.dataset, config.warmup.seed)
        warmup = supervised_warmup(config.warmup, session, warmup_source, make_env, config.loop.adam, run_dir, console)
        await watched(warmup, watched_address, config.services.learner_watch)  # a hung learner is caught here too
    if session.info.step > 0 or rewind:  # the replicas serve the restored weights before sampling resumes
        await rollout.publish(
            lambda addresses, rewind=False: session.publish_weights(
                addresses, config.loop.publish_transport, partial_ok=True, rewind=rewind,
                target_timeout_s=config.services.fleet.publish_timeout_s,
            ),
            rewind=rewind,
            version=session.info.step,
        )  # fmt: skip

    async def save_checkpoint(step: int, next_batch: int) -> None:
        state = json.dumps({"next_batch": next_batch, "step": step}).encode()
        # Written while training goes on (a checkpoint cut short by a failure does not verify, so a resume
        # skips it); the last one is complete before the run ends and stops the learner.
        background = next_batch < config.loop.steps
        saved = await session.save_state(f"step-{step:06d}", client_state=state, overwrite=True, background=background)
        with (run_dir / CHECKPOINTS_FILE).open("a") as handle:
            handle.write(json.dumps({"step": step, "next_batch": next_batch, "path": saved.path}) + "\n")

    loop = RLLoop(
        config=config.loop,
        session=session,
        rollout=rollout,
        source=source,
        make_env=make_env,
        seed=config.seed,
        start_batch=start_batch,
        on_step=recorder.on_step,
        on_checkpoint=save_checkpoint,
    )
    await watched(loop.run(), watched_address, config.services.learner_watch)
