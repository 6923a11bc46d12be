"""AdamParams: the one definition of Tinker's optimizer parameters, their defaults and valid ranges.

The learner steps with it, the Python client and the RL loop send it, the REST gateway builds it from a
JSON body, and a run config's `[loop.adam]` table is one. Its defaults are Tinker's (learning_rate 1e-4,
beta1 0.9, beta2 0.95, eps 1e-12, no weight decay, no clipping), which are also what an absent
`OptimStepRequest.adam_params` means on the wire. `grad_scale` is an Anvil extension carried beside the
message (`OptimStepRequest.grad_scale`).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from protos.anvil.v1 import common_pb2
from protos.errors import InvalidArgument


@dataclass(frozen=True, config=ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False))
class AdamParams:
    """Tinker's AdamParams: torch AdamW, decoupled weight decay, global-norm clipping when > 0."""

    learning_rate: float = Field(default=1e-4, ge=0)
    """AdamW step size; 0 makes a step that changes nothing."""
    beta1: float = Field(default=0.9, ge=0, lt=1)
    """First-moment decay."""
    beta2: float = Field(default=0.95, ge=0, lt=1)
    """Second-moment decay."""
    eps: float = Field(default=1e-12, gt=0)
    """Denominator epsilon."""
    weight_decay: float = Field(default=0.0, ge=0)
    """Decoupled weight decay."""
    grad_clip_norm: float = Field(default=0.0, ge=0)
    """Global-norm gradient clipping threshold; 0 disables clipping."""
    grad_scale: float = Field(default=1.0, gt=0)
    """Anvil extension: the accumulated gradients are multiplied by this before clipping and the update
    (normalising a summed loss by tokens or sequences, as Fireworks' grad_accumulation_normalization)."""


WIRE_FIELDS = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")
"""The fields of the anvil.v1 / Tinker AdamParams message (grad_scale travels beside it)."""


def adam_params(**given: Any) -> AdamParams:
    """AdamParams from untrusted input; InvalidArgument names the first bad field (`adam_params.<name>`)."""
    try:
        return AdamParams(**given)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = ".".join(str(part) for part in error["loc"]) or "?"
        if error["type"] == "unexpected_keyword_argument":
            allowed = [field for field in AdamParams.__dataclass_fields__ if field != "grad_scale"]
            raise InvalidArgument(f"adam_params has unknown field {name!r}; allowed: {allowed}") from None
        raise InvalidArgument(f"adam_params.{name}={error.get('input')!r} is invalid: {error['msg'].lower()}") from None
    except TypeError as exc:
        raise InvalidArgument(f"adam_params: {exc}") from None


def adam_params_to_proto(params: AdamParams) -> common_pb2.AdamParams:
    return common_pb2.AdamParams(**{name: getattr(params, name) for name in WIRE_FIELDS})


def adam_params_from_proto(message: common_pb2.AdamParams | None, grad_scale: float | None = None) -> AdamParams:
    """The defaults for an absent message; zeros in beta1/beta2/eps mean their defaults (see the proto)."""
    given: dict[str, Any] = {}
    if message is not None:
        given = {name: getattr(message, name) for name in WIRE_FIELDS}
        for name in ("beta1", "beta2", "eps"):
            if given[name] == 0:
                del given[name]
    if grad_scale is not None:
        if not (math.isfinite(grad_scale) and grad_scale > 0):
            raise InvalidArgument(f"grad_scale={grad_scale} must be finite and > 0")
        given["grad_scale"] = grad_scale
    return adam_params(**given)
