"""One Tinker datum -> one Arrow batch row: the only flattener, used by the Python client and the gateway.

A datum is `model_input` tokens plus `loss_fn_inputs` arrays. `target_tokens` is `[N]` or `[N, K]`
with `N = len(model_input)`; `[N, K]` targets (and their per-target inputs) are flattened row-major
with `targets_per_position = K`. `routed_experts` ([N, L, k]) becomes a flat int32 column, every other
input a flat float32 one. The row is what
`protos.arrow_schemas.make_batch` takes; the target shape comes back with it so outputs (per-target
logprobs) can be reshaped like the datum's targets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from protos.errors import InvalidArgument

INTEGER_INPUTS = frozenset({"routed_experts"})
"""Inputs kept as integers: expert ids ([N, L, k], flattened), which float32 would not hold past 2**24."""


def datum_row(
    tokens: np.ndarray, inputs: Mapping[str, np.ndarray], where: str = "datum 0"
) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The Arrow row of one datum and its target shape; InvalidArgument names `where` and the key."""
    if tokens.size == 0:
        raise InvalidArgument(f"{where}: model_input is empty")
    inputs = dict(inputs)
    targets = inputs.pop("target_tokens", None)
    if targets is None:
        raise InvalidArgument(f"{where}: loss_fn_inputs has no 'target_tokens'")
    if not np.issubdtype(targets.dtype, np.integer):
        raise InvalidArgument(f"{where}: target_tokens must be int64, got {targets.dtype}")
    if targets.ndim not in (1, 2) or targets.shape[0] != tokens.size:
        raise InvalidArgument(
            f"{where}: target_tokens has shape {list(targets.shape)} but model_input has {tokens.size} tokens; "
            "it must be [N] or [N, K] with N = len(model_input)"
        )
    row: dict[str, Any] = {"model_input": tokens, "target_tokens": targets.reshape(-1)}
    if targets.ndim == 2:
        row["targets_per_position"] = int(targets.shape[1])
    for key, value in inputs.items():
        if key in INTEGER_INPUTS and np.issubdtype(value.dtype, np.integer):
            row[key] = value.astype(np.int32, copy=False).reshape(-1)
            continue
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise InvalidArgument(f"{where}: loss_fn_inputs[{key!r}] must be float32, got {value.dtype}")
        row[key] = value.astype(np.float32, copy=False).reshape(-1)
    return row, tuple(targets.shape)
