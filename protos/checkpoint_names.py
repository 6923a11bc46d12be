"""The names weights travel under: a Hugging Face model's *checkpoint* names, the keys its model.safetensors
holds, which is also what vLLM's loaders and `save_pretrained` speak.

Why not `model.named_parameters()`: transformers 5 loads some architectures into fused parameters and
saves them back unfused. Qwen3-MoE's experts live in memory as one `mlp.experts.gate_up_proj` [E, 2I, H]
and one `mlp.experts.down_proj` [E, H, I] per layer, and on disk (and in vLLM) as E x 3
`mlp.experts.{e}.{gate,up,down}_proj.weight`. Llama's and Qwen3's parameters are their checkpoint names
already, and keep the identity path below.

`CheckpointLayout` finds the mapping once per model by asking transformers' own reversal
(`revert_weight_conversion`, what `save_pretrained` runs) where each element of a fused parameter goes:
it reverses an index probe (each element's own flat index) instead of the weights. A slot whose elements
are one contiguous range of its parameter (every Qwen3-MoE expert is) is a view: publishing reads it
without a copy and loading writes through it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _Slot:
    parameter: str
    shape: tuple[int, ...]
    start: int | None
    """First flat element of a contiguous slot (None: `index` lists the elements)."""
    index: torch.Tensor | None


def live_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of `model` holds, live and detached: its parameters (tied ones once, under the
    name save_pretrained keeps) and its persistent buffers (DeepSeek-V3's router `e_score_correction_bias`:
    not trained by gradient, but part of the weights a replica loads; rotary caches are not persistent)."""
    persistent = set(model.state_dict(keep_vars=True))
    ignored = [re.compile(pattern) for pattern in getattr(model, "_keys_to_ignore_on_save", None) or ()]
    tensors = {name: parameter.detach() for name, parameter in model.named_parameters()}
    tensors.update({name: buffer for name, buffer in model.named_buffers() if name in persistent})
    return {name: t for name, t in tensors.items() if not any(p.search(name) for p in ignored)}


class CheckpointLayout:
    """Checkpoint name <-> the live tensors (`live_tensors`) of one model (the learner's or a torch rollout
    engine's)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers.core_model_loading import revert_weight_conversion

        self._slots: dict[str, _Slot] = {}
        for name, parameter in live_tensors(model).items():
            shape = tuple(parameter.shape)
            placeholder = torch.empty(shape, device="meta")
            reverted = revert_weight_conversion(model, {name: placeholder})
            if list(reverted) == [name] and reverted[name] is placeholder:  # a converter (transpose) makes a new one
                self._add(name, _Slot(name, shape, 0, None))
                continue
            dtype = torch.int32 if parameter.numel() < 2**31 else torch.int64
            probe = torch.arange(parameter.numel(), dtype=dtype).view(shape)  # each element's own index
            for checkpoint_name, elements in revert_weight_conversion(model, {name: probe}).items():
                flat = elements.reshape(-1)
                contiguous = flat.numel() < 2 or bool((flat.diff() == 1).all())
                start = int(flat[0]) if flat.numel() else 0
                index = None if contiguous else flat.to(torch.int64)
                self._add(checkpoint_name, _Slot(name, tuple(elements.shape), start if contiguous else None, index))

    def _add(self, checkpoint_name: str, slot: _Slot) -> None:
        """One slot per checkpoint name: a checkpoint tensor that transformers splits over several
        parameters (reversed one parameter at a time) is not supported, and must not half-publish."""
        if checkpoint_name in self._slots:
            raise NotImplementedError(
                f"checkpoint tensor {checkpoint_name} comes from several parameters "
                f"({self._slots[checkpoint_name].parameter}, {slot.parameter}); this model's layout is not supported"
            )
        self._slots[checkpoint_name] = slot

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    @property
    def is_identity(self) -> bool:
        return all(slot.parameter == name for name, slot in self._slots.items())

    def named_tensors(self, parameters: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each checkpoint name with its tensor, read from `parameters` (`live_tensors`): views where the
        slot is contiguous, else a gathered copy."""
        for name, slot in self._slots.items():
            yield name, self._view(parameters[slot.parameter], slot)

    @torch.no_grad()
    def load(self, parameters: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy checkpoint-named `tensors` into `parameters` (`live_tensors`) in place, dtype and device
        converted. The caller checked that every name is present with its shape."""
        for name, slot in self._slots.items():
            parameter, source = parameters[slot.parameter], tensors[name]
            if slot.index is None:
                self._view(parameter, slot).copy_(source.to(device=parameter.device, dtype=parameter.dtype))
            else:
                flat = parameter.view(-1)
                flat.index_copy_(0, slot.index.to(parameter.device), source.reshape(-1).to(flat))

    @staticmethod
    def _view(parameter: torch.Tensor, slot: _Slot) -> torch.Tensor:
        if slot.start is None:
            return parameter.reshape(-1)[slot.index.to(parameter.device)].view(slot.shape)
        if slot.start == 0 and slot.shape == tuple(parameter.shape):
            return parameter
        return parameter.view(-1)[slot.start : slot.start + math.prod(slot.shape)].view(slot.shape)
