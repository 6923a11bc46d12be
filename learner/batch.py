"""Trajectory batches as the learner computes on them: validated Arrow rows turned into numpy per datum.

The wire format stops here: `batch_from_arrow` takes the IPC bytes of a DataBatch, runs
`protos.arrow_schemas.validate_batch` (so nothing invalid reaches a backend), and returns plain arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from learner.losses import PER_TOKEN_INPUTS
from protos.arrow_schemas import decode_batch, validate_batch


@dataclass(frozen=True)
class Datum:
    """One training example: N input tokens, N*K targets, and per-token loss inputs."""

    model_input: np.ndarray
    """int64 [N]"""
    target_tokens: np.ndarray
    """int64 [N*K], row-major over (position, target)"""
    targets_per_position: int = 1
    loss_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    """float32 arrays keyed by column name: weights [N*K], logprobs [N], advantages [N]"""


@dataclass(frozen=True)
class TrainingBatch:
    data: list[Datum]
    input_names: frozenset[str]
    """The per-token loss-input columns the batch carries (the same for every datum)."""

    @property
    def multi_target(self) -> bool:
        return any(datum.targets_per_position > 1 for datum in self.data)


def batch_from_arrow(payload: bytes, vocab_size: int) -> TrainingBatch:
    """Decode and validate a DataBatch payload (InvalidArgument on any problem) into a TrainingBatch.

    Each list column is converted once, as a whole, from its Arrow buffer to a numpy array of the
    backend's dtype, and split into per-datum views of it: no Python object per token.
    """
    table = validate_batch(decode_batch(payload), vocab_size=vocab_size)
    input_names = frozenset(PER_TOKEN_INPUTS & set(table.column_names))
    model_input = _rows(table, "model_input", np.int64)
    target_tokens = _rows(table, "target_tokens", np.int64)
    loss_inputs = {name: _rows(table, name, np.float32) for name in input_names}
    if "targets_per_position" in table.column_names:
        k_column = table["targets_per_position"].to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        k_column = np.ones(table.num_rows, dtype=np.int64)
    data = [
        Datum(
            model_input=model_input[row],
            target_tokens=target_tokens[row],
            targets_per_position=int(k_column[row]),
            loss_inputs={name: loss_inputs[name][row] for name in input_names},
        )
        for row in range(table.num_rows)
    ]
    return TrainingBatch(data=data, input_names=input_names)


def _rows(table: pa.Table, name: str, dtype: type[np.generic]) -> list[np.ndarray]:
    """A validated list column as one writable numpy array of `dtype`, split into per-row views."""
    column = table[name]
    array = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
    flat = pc.list_flatten(array).to_numpy(zero_copy_only=False).astype(dtype)  # astype copies: writable
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    return np.split(flat, np.cumsum(lengths)[:-1])
