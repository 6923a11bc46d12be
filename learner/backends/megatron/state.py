"""SaveState / LoadState for the Megatron engine with megatron's dist_checkpointing (model + AdamW).

Layout inside the checkpoint directory: `dist/` (dist_checkpointing: TP-agnostic global tensors for the
parameters and for AdamW's exp_avg / exp_avg_sq, sharded exactly like their parameters) and
`state.json` (format, step, HF shapes, padded vocabulary, AdamW's step count - the same for every
parameter, since all of them step together).
Because the saved tensors are global, a state saved at one tp loads at another.

Loading builds the target structure from *clones* of the live tensors, lets dist_checkpointing fill
them, and only then copies them in: a checkpoint that fails to load leaves the session untouched. The
ranks agree (lockstep.agree) that the metadata fits before any of them enters the collective load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from learner.backends.megatron.engine import MegatronEngine
from learner.backends.megatron.lockstep import agree
from protos.errors import FailedPrecondition

STATE_FORMAT = "anvil-learner-state/1"
DIST_DIR = "dist"


def _sharded_state(engine: MegatronEngine, optimizer_state: dict | None) -> dict:
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    model_state = engine.model.sharded_state_dict(prefix="")
    state = {"model": model_state}
    if optimizer_state is not None:
        parameters = engine.optimizer.param_groups[0]["params"]
        id_map = get_param_id_to_sharded_param_map(model_state, parameters)
        optim_state_to_sharding_state(optimizer_state, id_map, exclude_keys=("step",))
        state["optimizer"] = optimizer_state
    return state


def save_state(engine: MegatronEngine, directory: Path) -> None:
    """Collective: every rank writes its shards; rank 0 writes state.json."""
    from megatron.core import dist_checkpointing

    from learner.backends.megatron.checkpoint_io import write_in_process

    write_in_process()
    layout = engine.layout
    (directory / DIST_DIR).mkdir(parents=True, exist_ok=True)
    optimizer_state = engine.optimizer.state_dict()
    adam_steps = {float(state["step"]) for state in optimizer_state["state"].values()}
    if len(adam_steps) != 1:  # every parameter steps together (see engine.optim_step)
        raise RuntimeError(f"AdamW step counts differ between parameters: {sorted(adam_steps)}")
    dist_checkpointing.save(_sharded_state(engine, optimizer_state), str(directory / DIST_DIR))
    if layout.rank == 0:
        state = {
            "format": STATE_FORMAT,
            "backend": "megatron",
            "step": engine.step,
            "model_path": str(engine.model_path),
            "parameter_shapes": engine.hf_shapes(),
            "padded_vocab_size": engine.shape.padded_vocab_size,
            "saved_layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
            "adam_step": adam_steps.pop(),
        }
        (directory / "state.json").write_text(json.dumps(state, indent=1))


def _check(engine: MegatronEngine, directory: Path) -> dict:
    path = directory / "state.json"
    if not path.is_file():
        raise FailedPrecondition(f"{directory} has no state.json; pass a path SaveState returned")
    state = json.loads(path.read_text())
    if state.get("format") != STATE_FORMAT:
        raise FailedPrecondition(f"{directory} is not a learner state ({STATE_FORMAT}); was it saved by SaveState?")
    if state.get("backend") != "megatron":
        raise FailedPrecondition(
            f"{directory} was saved by the {state.get('backend')!r} backend; the megatron backend loads only its "
            "own states (load HF weights with SaveWeights' directory as the base model instead)"
        )
    if state["parameter_shapes"] != engine.hf_shapes() or state["padded_vocab_size"] != engine.shape.padded_vocab_size:
        raise FailedPrecondition(
            f"checkpoint {directory} holds a different model (parameter names, shapes or vocabulary padding differ "
            f"from {engine.model_path}); load it into a session of the same base model and vocab_multiple"
        )
    if not (directory / DIST_DIR / "metadata.json").is_file():
        raise FailedPrecondition(f"{directory}/{DIST_DIR} is not a dist_checkpointing checkpoint")
    return state


def load_state(engine: MegatronEngine, directory: Path, with_optimizer: bool) -> None:
    """Collective: check on every rank, agree, load into clones, then apply."""
    from megatron.core import dist_checkpointing

    state = agree(engine.layout, lambda: _check(engine, directory))
    optimizer = engine.new_optimizer()
    optimizer_state = None
    if with_optimizer:
        optimizer_state = optimizer.state_dict()
        optimizer_state["state"] = {
            i: {k: v.clone() for k, v in s.items()} for i, s in optimizer_state["state"].items()
        }
    target = _sharded_state(engine, optimizer_state)
    for sharded in _sharded_tensors(target["model"]):
        sharded.data = sharded.data.detach().clone()  # load into copies, never the live parameters
    loaded = dist_checkpointing.load(target, str(directory / DIST_DIR))
    wanted = [key for key in engine.model.state_dict() if not key.endswith("_extra_state")]
    missing = [key for key in wanted if key not in loaded["model"]]
    if missing:
        raise FailedPrecondition(f"{directory} lacks parameters {missing[:4]}")
    if with_optimizer:  # into the new optimizer, which is not live yet
        optimizer_loaded = loaded["optimizer"]
        for parameter_state in optimizer_loaded["state"].values():
            parameter_state["step"] = torch.tensor(float(state["adam_step"]))
        # Hyperparameters come with every OptimStep request; only the moments and step counts matter.
        restored = {"state": optimizer_loaded["state"], "param_groups": optimizer.state_dict()["param_groups"]}
        with torch.no_grad():
            optimizer.load_state_dict(restored)
    # Everything is read and checked: apply.
    engine.model.load_state_dict(loaded["model"], strict=False)
    engine.optimizer = optimizer
    for parameter in engine.model.parameters():
        parameter.grad = None
    engine.step = int(state["step"])


def _sharded_tensors(tree):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(tree, ShardedTensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _sharded_tensors(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _sharded_tensors(value)
