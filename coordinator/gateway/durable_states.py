"""Durable training states: what lets a training client outlive a restart of the gateway and its learner.

After every `durable_state_every_steps`-th optim_step, a training model's state (weights and AdamW) is
saved by its learner in the background (SaveState `background`: the step waits only for an in-memory
copy) as `durable-<seq_id>`; the journal records it in the model's document, and the bodies of the
requests it covers are no longer kept. A write still in flight at a crash is simply not there (the
learner renames a checkpoint into place when complete), so the states kept are the newest complete one
and any newer: a restore loads the newest that verifies and replays the requests after it
(coordinator.gateway.restore). Older states are deleted.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from coordinator.gateway.journal import GatewayJournal
from coordinator.gateway.sessions import TrainingModel

KEPT_WITHOUT_SIGHT = 3
"""States kept when none can be seen complete (a remote learner's directories are not on this host)."""


def model_doc(model: TrainingModel) -> dict[str, Any]:
    """What the journal keeps of a training model (coordinator.gateway.restore reads it back)."""
    return {
        "model_id": model.model_id,
        "base_model": model.base_model,
        "owner": model.owner,
        "user_metadata": model.user_metadata,
        "seed": model.seed,
        "lora": model.lora,
        "initial_state": model.initial_state,
        "durable_states": model.durable_states,
        "unnamed_snapshots": [str(path) for path in model.unnamed_snapshots],
        "last_snapshot": model.last_snapshot,
    }


class DurableStates:
    def __init__(self, journal: GatewayJournal, every_steps: int) -> None:
        self.journal = journal
        self.every_steps = every_steps

    def record(self, model: TrainingModel) -> None:
        """Write the model's document (after anything in it changed)."""
        self.journal.put("models", model.model_id, model_doc(model), session_id=model.model_id.split(":", 1)[0])

    async def after_step(self, model: TrainingModel, seq_id: int) -> None:
        """An optim_step (request `seq_id`) finished: take a durable state if one is due."""
        model.steps_since_durable += 1
        if model.steps_since_durable < self.every_steps:
            return
        reply = await model.learner.save_state(f"durable-{seq_id}", overwrite=True, background=True)
        model.steps_since_durable = 0
        model.durable_states.append((seq_id, reply.path))
        kept = _kept(model.durable_states)
        for _, path in model.durable_states[: len(model.durable_states) - len(kept)]:
            shutil.rmtree(path, ignore_errors=True)
        model.durable_states = kept
        self.record(model)
        self.journal.forget_bodies(model.model_id, kept[0][0])


def _kept(states: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The newest state seen complete and every newer one; the newest few when none is seen complete."""
    complete = [index for index, (_, path) in enumerate(states) if Path(path).is_dir()]
    return states[complete[-1] :] if complete else states[-KEPT_WITHOUT_SIGHT:]
