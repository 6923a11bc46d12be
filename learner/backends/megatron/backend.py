"""MegatronBackend: the LearnerBackend the gRPC service talks to on rank 0, and the per-rank host.

Each backend method becomes one lockstep command ("forward", "optim_step", ...) that every rank's
`EngineHost` runs on its MegatronEngine for the session; rank 0's result is returned. So the service,
sequencer, checkpoint and weight-transport code is the same for both backends.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from learner.backends.base import ForwardResult, LearnerBackend, ModelDescription
from learner.backends.megatron import parallel
from learner.backends.megatron.lockstep import Command, Commander
from learner.batch import TrainingBatch
from learner.config import MegatronBackendConfig
from learner.losses import LossSpec
from protos.adam import AdamParams
from protos.errors import FailedPrecondition


class EngineHost:
    """Every rank's engines by session key, and the command dispatcher the lockstep loop calls."""

    def __init__(self, config: MegatronBackendConfig, layout: parallel.ParallelLayout) -> None:
        self.config = config
        self.layout = layout
        self.engines: dict = {}

    def __call__(self, command: Command):
        from learner.backends.megatron import export, state
        from learner.backends.megatron.engine import MegatronEngine

        arguments = command.arguments
        if command.operation == "create":
            engine = MegatronEngine(Path(arguments["model_path"]), self.config, self.layout)
            self.engines[command.session] = engine
            return {"num_parameters": engine.num_parameters(), "vocab_size": engine.shape.vocab_size}
        engine = self.engines.get(command.session)
        if engine is None:
            raise FailedPrecondition(f"rank {self.layout.rank} holds no model for session {command.session!r}")
        match command.operation:
            case "close":
                del self.engines[command.session]
            case "forward":
                return engine.forward(**arguments)
            case "optim_step":
                return engine.optim_step(**arguments)
            case "save_state":
                return state.save_state(engine, Path(arguments["directory"]))
            case "load_state":
                return state.load_state(engine, Path(arguments["directory"]), arguments["with_optimizer"])
            case "gather_weights":
                return engine.gather_hf_weights()
            case "save_weights":
                tensors = engine.gather_hf_weights()
                if tensors is not None:
                    export.write_hf_directory(tensors, engine.model_path, Path(arguments["directory"]))
            case _:
                raise FailedPrecondition(f"unknown learner command {command.operation!r}")
        return None


_commander: Commander | None = None


def commander(config: MegatronBackendConfig) -> Commander:
    """Rank 0's commander; set up here when the process was not started by `launch` (a world of one)."""
    global _commander
    if _commander is None:
        layout = parallel.initialize(config)
        if layout.world_size != 1:
            raise FailedPrecondition("a multi-rank megatron learner must be started through learner.server")
        _commander = Commander(layout, EngineHost(config, layout))
    return _commander


def set_commander(instance: Commander | None) -> None:
    global _commander
    _commander = instance


class MegatronBackend(LearnerBackend):
    _next_key = 0

    def __init__(self, model_path: Path, config: MegatronBackendConfig, seed: int) -> None:
        torch.manual_seed(seed)
        self._commander = commander(config)
        MegatronBackend._next_key += 1
        self._session = f"s{MegatronBackend._next_key}"
        created = self._commander.execute("create", self._session, model_path=str(model_path))
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(model_path)
        layout = self._commander.layout
        self._description = ModelDescription(
            model_path=model_path,
            num_parameters=created["num_parameters"],
            vocab_size=created["vocab_size"],
            max_context_length=int(getattr(hf_config, "max_position_embeddings", 0) or 0),
            backend=f"megatron(tp={layout.tp},pp={layout.pp},dp={layout.dp})",
        )
        self._step = 0

    @property
    def description(self) -> ModelDescription:
        return self._description

    @property
    def step(self) -> int:
        return self._step

    def forward(
        self, batch: TrainingBatch, loss: LossSpec, loss_config: Mapping[str, float], backward: bool
    ) -> ForwardResult:
        return self._commander.execute(
            "forward", self._session, batch=batch, loss=loss, loss_config=dict(loss_config), backward=backward
        )

    def optim_step(self, params: AdamParams) -> dict[str, float]:
        metrics = self._commander.execute("optim_step", self._session, params=params)
        self._step += 1
        return metrics

    def save_state(self, directory: Path) -> None:
        self._commander.execute("save_state", self._session, directory=str(directory))

    def load_state(self, directory: Path, with_optimizer: bool) -> None:
        self._commander.execute("load_state", self._session, directory=str(directory), with_optimizer=with_optimizer)
        import json

        self._step = int(json.loads((directory / "state.json").read_text())["step"])

    def save_weights(self, directory: Path) -> None:
        self._commander.execute("save_weights", self._session, directory=str(directory))

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self._commander.execute("gather_weights", self._session).items()

    def close(self) -> None:
        self._commander.execute("close", self._session)
