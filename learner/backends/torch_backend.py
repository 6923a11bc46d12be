"""The plain-PyTorch learner backend: one Hugging Face causal LM on one device, trained in full.

Precision: float32 parameters everywhere. On CPU the maths is float32 end to end; on a CUDA device the
forward runs under bf16 autocast while the parameters (and so AdamW's update) stay float32 - bf16
compute with fp32 master weights. Logprobs are always taken from a float32 log-softmax.

State on disk (inside a directory the checkpoint module provides): `model.safetensors` (parameters by
HF name, tied ones once), `optimizer.pt` (AdamW state_dict), `rng.pt`, `state.json` (step, shapes).
`load_state` reads and checks everything before it changes anything, so a bad checkpoint leaves the
live model and optimizer exactly as they were.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from learner.backends.base import ForwardResult, LearnerBackend, ModelDescription, clip_and_step
from learner.batch import TrainingBatch
from learner.config import TorchBackendConfig
from learner.losses import LossSpec, loss_inputs_T
from protos.adam import AdamParams
from protos.errors import FailedPrecondition

STATE_FORMAT = "anvil-learner-state/1"
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TorchBackend(LearnerBackend):
    def __init__(self, model_path: Path, config: TorchBackendConfig, seed: int) -> None:
        from transformers import AutoModelForCausalLM

        self._model_path = model_path
        self._device = _resolve_device(config.device)
        torch.manual_seed(seed)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(self._device)
        self.model.eval()  # no dropout: Forward and ForwardBackward see the same function
        self.model.requires_grad_(True)
        self.optimizer = self._new_optimizer()
        self._step = 0
        model_config = self.model.config
        self._description = ModelDescription(
            model_path=model_path,
            num_parameters=sum(p.numel() for p in self.model.parameters()),
            vocab_size=int(model_config.vocab_size),
            max_context_length=int(getattr(model_config, "max_position_embeddings", 0) or 0),
            backend="torch",
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
        lengths = [len(datum.model_input) for datum in batch.data]
        input_ids_BL = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
        attention_mask_BL = torch.zeros_like(input_ids_BL)
        for row, datum in enumerate(batch.data):  # right padding keeps real tokens at positions 0..N-1
            input_ids_BL[row, : lengths[row]] = torch.from_numpy(datum.model_input)
            attention_mask_BL[row, : lengths[row]] = 1
        grad_mode = torch.enable_grad() if backward else torch.no_grad()
        with grad_mode:
            with self._autocast():
                logits_BLV = self.model(
                    input_ids=input_ids_BL.to(self._device), attention_mask=attention_mask_BL.to(self._device)
                ).logits
            per_datum = []
            for row, datum in enumerate(batch.data):
                logprobs_NV = torch.log_softmax(logits_BLV[row, : lengths[row]].float(), dim=-1)
                targets_NK = torch.from_numpy(datum.target_tokens).to(self._device).view(lengths[row], -1)
                per_datum.append(logprobs_NV.gather(1, targets_NK).reshape(-1))
            logprobs_T = torch.cat(per_datum)
            inputs_T = loss_inputs_T(batch.data, batch.input_names, self._device)
            loss_value, metrics = loss.fn(logprobs_T, inputs_T, loss_config)
            if backward:
                loss_value.backward()
        return ForwardResult([lp.detach().cpu().numpy() for lp in per_datum], metrics)

    def _new_optimizer(self) -> torch.optim.AdamW:
        defaults = AdamParams()
        return torch.optim.AdamW(
            self.model.parameters(),
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
        return {name: list(p.shape) for name, p in self.model.named_parameters()}

    def save_state(self, directory: Path) -> None:
        tensors = {name: p.detach().to("cpu").contiguous() for name, p in self.model.named_parameters()}
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, directory / "rng.pt")
        state = {
            "format": STATE_FORMAT,
            "backend": "torch",
            "step": self._step,
            "model_path": str(self._model_path),
            "parameter_shapes": self._parameter_shapes(),
        }
        (directory / "state.json").write_text(json.dumps(state, indent=1))

    def load_state(self, directory: Path, with_optimizer: bool) -> None:
        state = json.loads((directory / "state.json").read_text())
        if state.get("format") != STATE_FORMAT:
            raise FailedPrecondition(f"{directory} is not a learner state ({STATE_FORMAT}); was it saved by SaveState?")
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
            for name, parameter in self.model.named_parameters():
                parameter.copy_(tensors[name].to(parameter.device))
                parameter.grad = None
        self.optimizer = optimizer
        self._step = int(state["step"])
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def save_weights(self, directory: Path) -> None:
        self.model.save_pretrained(directory, safe_serialization=True)
        for source in self._model_path.iterdir():
            is_weights = source.name.endswith(_WEIGHT_FILE_SUFFIXES) or source.name in _WEIGHT_INDEX_FILES
            target = directory / source.name
            if source.is_file() and not is_weights and not target.exists():
                shutil.copyfile(source, target)  # tokenizer files, chat template, generation config

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, parameter in self.model.named_parameters():
            yield name, parameter.detach()
