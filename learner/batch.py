"""Trajectory batches as the learner computes on them: validated Arrow rows turned into numpy per datum.

The wire format stops here: `batch_from_arrow` takes the IPC bytes of a DataBatch, runs
`protos.arrow_schemas.validate_batch` (so nothing invalid reaches a backend), and returns plain arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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

    @property
    def num_tokens(self) -> int:
        return sum(len(datum.model_input) for datum in self.data)


def batch_from_arrow(payload: bytes, vocab_size: int) -> TrainingBatch:
    """Decode and validate a DataBatch payload (InvalidArgument on any problem) into a TrainingBatch."""
    table = validate_batch(decode_batch(payload), vocab_size=vocab_size)
    columns = table.to_pydict()
    input_names = frozenset(PER_TOKEN_INPUTS & set(columns))
    k_column = columns.get("targets_per_position", [1] * table.num_rows)
    data = [
        Datum(
            model_input=np.asarray(columns["model_input"][row], dtype=np.int64),
            target_tokens=np.asarray(columns["target_tokens"][row], dtype=np.int64),
            targets_per_position=int(k_column[row]),
            loss_inputs={name: np.asarray(columns[name][row], dtype=np.float32) for name in input_names},
        )
        for row in range(table.num_rows)
    ]
    return TrainingBatch(data=data, input_names=input_names)
