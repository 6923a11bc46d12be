"""The shared starting point of a peer race on a task that needs a supervised warmup (the main job's
multi-token `reverse`): Anvil's own warmup (coordinator/warmup.py: `warmup.steps` cross-entropy steps on
right answers) run once through a real learner on loopback, saved as a Hugging Face directory. Both
systems then start RL from that directory (Anvil with `warmup.steps = 0`), so the race measures RL alone
and neither side's supervised phase differs."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from coordinator.client.learner_api import LearnerSession
from coordinator.config import RunConfig
from coordinator.envs import build_source
from coordinator.envs.answer_env import AnswerEnv
from coordinator.models import resolve_model
from coordinator.warmup import supervised_warmup
from learner.config import LearnerConfig
from learner.server import start_learner
from protos.channels import open_channel


async def warmed_model(config: RunConfig, out_dir: Path, console: Console) -> Path:
    """The run's base model after its supervised warmup, as a Hugging Face directory under `out_dir`."""
    from transformers import AutoTokenizer

    model_dir = resolve_model(config.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    running, _ = await start_learner(LearnerConfig(checkpoint_dir=out_dir / "learner"))
    try:
        async with open_channel(running.address) as channel:
            session = await LearnerSession.create(channel, str(model_dir), seed=config.seed)
            source = build_source(config.task.name, config.warmup.dataset or config.task.dataset, config.warmup.seed)
            await supervised_warmup(
                config.warmup, session, source, lambda problem: AnswerEnv(problem, tokenizer), config.loop.adam,
                out_dir, console,
            )  # fmt: skip
            saved = await session.save_weights("warmed")
    finally:
        await running.stop(0)
    return Path(saved.path)
