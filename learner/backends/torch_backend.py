"""The plain-PyTorch learner backend: one Hugging Face causal LM on one device, trained in full (or, in a
LoRA session, a PEFT adapter on the frozen model: learner/backends/lora.py).

Precision: float32 parameters everywhere. On CPU the maths is float32 end to end; on a CUDA device the
forward runs under bf16 autocast while the parameters (and so AdamW's update) stay float32 - bf16
compute with fp32 master weights. Logprobs are always taken from a float32 log-softmax.

State on disk (inside a directory the checkpoint module provides): `model.safetensors` (parameters by
HF name, tied ones once; a LoRA session's adapter only, by PEFT name), `optimizer.pt` (AdamW state_dict),
`rng.pt`, `state.json` (step, shapes, LoRA options). `load_state` reads and checks everything before it
changes anything, so a bad checkpoint leaves the live model and optimizer exactly as they were.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from learner.backends.base import ForwardResult, LearnerBackend, ModelDescription, clip_and_step
from learner.backends.lora import LoraSpec, trainable, with_adapter
from learner.backends.packing import combine_metrics, peak_memory_gib, plan_micro_batches, target_logprobs
from learner.backends.prefix_sharing import sequence_hidden
from learner.backends.routing_replay import check_routes, replay_routes
from learner.batch import Datum, TrainingBatch
from learner.config import TorchBackendConfig
from learner.losses import LossSpec, loss_inputs_T
from protos.adam import AdamParams
from protos.checkpoint_names import CheckpointLayout, live_tensors
from protos.errors import FailedPrecondition

STATE_FORMAT = "anvil-learner-state/1"
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _without_dropout(model: torch.nn.Module) -> None:
    """Set every dropout of a Hugging Face model to 0 (modules, and attention's own dropout rates)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class TorchBackend(LearnerBackend):
    def __init__(self, model_path: Path, config: TorchBackendConfig, seed: int, lora: LoraSpec | None = None) -> None:
        from transformers import AutoModelForCausalLM

        self._model_path = model_path
        self._device = _resolve_device(config.device)
        torch.manual_seed(seed)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(self._device)
        self.model.eval()  # no dropout: Forward and ForwardBackward see the same function
        self.model.requires_grad_(True)
        self.lora = lora
        if lora is not None:  # the base frozen, an adapter (A from the seed, B zero) on it
            self.model = with_adapter(self.model, lora)
        hf_model = self.model.get_base_model() if lora is not None else self.model
        self._config = config
        if config.activation_checkpointing:  # recompute each layer's activations in backward
            # Hugging Face checkpoints layers only in train mode; with every dropout at 0, train mode
            # computes the same function as eval mode.
            _without_dropout(hf_model)
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.train()
        # The decoder and output projection apart, so logprobs never hold a full [tokens, vocab] block.
        # (With an adapter, PEFT has put its layers inside both: they are the same modules.)
        self._decoder = getattr(hf_model, hf_model.base_model_prefix)
        self._head = hf_model.get_output_embeddings()
        self._checkpoint_layout = CheckpointLayout(hf_model) if lora is None else None
        self.optimizer = self._new_optimizer()
        self._step = 0
        model_config = hf_model.config
        self._description = ModelDescription(
            model_path=model_path,
            num_parameters=sum(p.numel() for p in self._state_parameters().values()),
            vocab_size=int(model_config.vocab_size),
            max_context_length=int(getattr(model_config, "max_position_embeddings", 0) or 0),
            backend="torch",
            lora_rank=lora.rank if lora is not None else 0,
        )

    # --- properties -------------------------------------------------------------------------------

    @property
    def description(self) -> ModelDescription:
        return self._description

    @property
    def step(self) -> int:
        return self._step

    # --- compute ----------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(
        self, batch: TrainingBatch, loss: LossSpec, loss_config: Mapping[str, float], backward: bool
    ) -> ForwardResult:
        """The request in token-budget micro-batches (learner.backends.packing), gradients accumulated:
        equal to one whole batch, since every loss is a sum of per-datum terms."""
        start = time.perf_counter()
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        lengths = [len(datum.model_input) for datum in batch.data]
        if any(datum.routed_experts is not None for datum in batch.data):  # before anything runs
            check_routes(self._decoder, [datum.routed_experts for datum in batch.data], lengths)
        groups = plan_micro_batches(lengths, self._config.max_tokens_per_micro_batch)
        logprobs: list[np.ndarray] = [np.empty(0, np.float32)] * len(batch.data)
        parts = []
        for group in groups:
            data = [batch.data[index] for index in group]
            group_logprobs, metrics = self._micro_batch(data, batch.input_names, loss, loss_config, backward)
            for index, values in zip(group, group_logprobs, strict=True):
                logprobs[index] = values
            parts.append((metrics, sum(lengths[index] for index in group), len(group)))
        metrics = combine_metrics(parts, loss.per_datum_metrics)
        metrics["learner/micro_batches:sum"] = float(len(groups))
        metrics["learner/tokens_per_s:mean"] = sum(lengths) / max(time.perf_counter() - start, 1e-9)
        metrics["learner/peak_memory_gib:max"] = peak_memory_gib(self._device)
        return ForwardResult(logprobs, metrics)

    def _micro_batch(
        self,
        data: list[Datum],
        input_names: frozenset[str],
        loss: LossSpec,
        loss_config: Mapping[str, float],
        backward: bool,
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """Packed rows (or shared prefixes) through the model; the loss (and backward, adding to the gradients)."""
        sequences = [datum.model_input for datum in data]
        targets_TK = torch.cat([torch.from_numpy(d.target_tokens).view(len(d.model_input), -1) for d in data]).to(
            self._device
        )
        routes = [d.routed_experts for d in data] if data[0].routed_experts is not None else None
        replay_metrics: dict[str, float] = {}
        attention = self.model.config._attn_implementation
        lengths = [len(sequence) for sequence in sequences]
        # Replay stays open through backward: activation checkpointing reruns the routers there.
        with (
            replay_routes(self._decoder, routes, lengths, attention, replay_metrics) as replayed,
            torch.enable_grad() if backward else torch.no_grad(),
        ):
            with self._autocast():
                hidden_UH, row_T = self._hidden(sequences, share=not replayed)
            chunk = self._config.logprob_chunk_tokens
            logprobs_TK = target_logprobs(hidden_UH, targets_TK, self._head, chunk, row_T)
            logprobs_T = logprobs_TK.reshape(-1)
            inputs_T = loss_inputs_T(data, input_names, self._device)
            loss_value, metrics = loss.fn(logprobs_T, inputs_T, loss_config)
            if backward:
                loss_value.backward()
        metrics = {**metrics, **replay_metrics}
        pieces = torch.split(logprobs_TK.detach(), [len(sequence) for sequence in sequences])
        return [piece.reshape(-1).cpu().numpy() for piece in pieces], metrics

    def _hidden(self, sequences: list[np.ndarray], share: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final hidden states of `sequences` back to back, as distinct rows and the row each position
        reads (prefix_sharing.sequence_hidden). Replayed routes are laid out for plain packed rows, so
        a replayed micro-batch shares nothing (`share` False)."""
        config, attention = self._config, self.model.config._attn_implementation
        return sequence_hidden(
            self._decoder, sequences, self._device, attention, config.share_prefixes and share,
            config.activation_checkpointing,
        )  # fmt: skip

    def _state_parameters(self) -> dict[str, torch.nn.Parameter]:
        """What training changes and a state checkpoint holds: every parameter, or a LoRA adapter's."""
        return trainable(self.model) if self.lora is not None else dict(self.model.named_parameters())

    def _new_optimizer(self) -> torch.optim.AdamW:
        defaults = AdamParams()
        return torch.optim.AdamW(
            list(self._state_parameters().values()),
            lr=defaults.learning_rate,
            betas=(defaults.beta1, defaults.beta2),
            eps=defaults.eps,
            weight_decay=defaults.weight_decay,
        )

    def optim_step(self, params: AdamParams) -> dict[str, float]:
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        if params.grad_scale != 1.0:
            for parameter in parameters:
                parameter.grad.mul_(params.grad_scale)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters]) if parameters else torch.zeros(())
        metrics = clip_and_step(self.optimizer, parameters, grad_norm, params)
        self._step += 1
        return metrics

    # --- state --------------------------------------------------------------------------------------

    def _parameter_shapes(self) -> dict[str, list[int]]:
        return {name: list(p.shape) for name, p in self._state_parameters().items()}

    def save_state(self, directory: Path) -> None:
        self.state_snapshot()(directory)

    def state_snapshot(self) -> Callable[[Path], None]:
        """Copy everything `save_state` writes (weights, AdamW state, RNG, step) and return the function
        that writes the copy: training may go on while it is written (SaveState with background)."""
        tensors = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in self._state_parameters().items()}
        optimizer = copy.deepcopy(self.optimizer.state_dict())
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {
            "format": STATE_FORMAT,
            "backend": "torch",
            "step": self._step,
            "model_path": str(self._model_path),
            "parameter_shapes": self._parameter_shapes(),
            "lora": self.lora.as_dict() if self.lora is not None else None,
        }

        def write(directory: Path) -> None:
            save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
            torch.save(optimizer, directory / "optimizer.pt")
            torch.save(rng, directory / "rng.pt")
            (directory / "state.json").write_text(json.dumps(state, indent=1))

        return write

    def load_state(self, directory: Path, with_optimizer: bool) -> None:
        state = json.loads((directory / "state.json").read_text())
        if state.get("format") != STATE_FORMAT:
            raise FailedPrecondition(f"{directory} is not a learner state ({STATE_FORMAT}); was it saved by SaveState?")
        mine = self.lora.as_dict() if self.lora is not None else None
        if state.get("lora") != mine:
            raise FailedPrecondition(
                f"checkpoint {directory} was trained with LoRA {state.get('lora')}, this session with {mine}; load "
                "it into a session created with the same lora_rank and LoRA options"
            )
        if state["parameter_shapes"] != self._parameter_shapes():
            raise FailedPrecondition(
                f"checkpoint {directory} holds a different model (parameter names or shapes differ from "
                f"{self._model_path}); load it into a session of the same base model"
            )
        with safe_open(directory / "model.safetensors", "pt") as handle:
            if set(handle.keys()) != set(state["parameter_shapes"]):
                raise FailedPrecondition(f"{directory}/model.safetensors does not match its state.json")
        tensors = load_file(directory / "model.safetensors")
        optimizer = self._new_optimizer()
        if with_optimizer:
            try:
                optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
            except (ValueError, KeyError, RuntimeError) as exc:
                raise FailedPrecondition(f"{directory}/optimizer.pt does not fit this model: {exc}") from exc
        rng = torch.load(directory / "rng.pt", weights_only=True)
        # Everything is read and checked: apply.
        with torch.no_grad():
            for name, parameter in self._state_parameters().items():
                parameter.copy_(tensors[name].to(parameter.device))
                parameter.grad = None
        self.optimizer = optimizer
        self._step = int(state["step"])
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def save_weights(self, directory: Path) -> None:
        """The model as a Hugging Face directory; a LoRA session's as a PEFT adapter directory (the adapter
        alone, the base model by name in adapter_config.json), with the base's tokenizer either way."""
        adapter_only = {"save_embedding_layers": False} if self.lora is not None else {}  # lm_head's base stays
        self.model.save_pretrained(directory, safe_serialization=True, **adapter_only)
        for source in self._model_path.iterdir():
            is_weights = source.name.endswith(_WEIGHT_FILE_SUFFIXES) or source.name in _WEIGHT_INDEX_FILES
            target = directory / source.name
            if source.is_file() and not is_weights and not target.exists():
                shutil.copyfile(source, target)  # tokenizer files, chat template, generation config

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """By Hugging Face checkpoint name (protos/checkpoint_names.py: what vLLM loads, fused experts
        split); a LoRA session's adapter by the names it is saved under."""
        if self.lora is not None:
            from peft import get_peft_model_state_dict

            yield from get_peft_model_state_dict(self.model, save_embedding_layers=False).items()
            return
        yield from self._checkpoint_layout.named_tensors(live_tensors(self.model))
