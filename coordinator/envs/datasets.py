"""Prompt datasets from JSONL or Parquet files (read with pyarrow): one problem per row.

Rows need a `prompt` and an `answer` column (strings). Problem i is row i mod the row count, so a run
can take more batches than there are rows (epochs) and still resume exactly.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from coordinator.envs.base import Problem, ProblemSource
from protos.errors import InvalidArgument, NotFound


def read_rows(path: Path) -> pa.Table:
    if not path.is_file():
        raise NotFound(f"dataset {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        table = pa_json.read_json(path)
    elif suffix in (".parquet", ".pq"):
        table = pq.read_table(path)
    else:
        raise InvalidArgument(f"dataset {path}: use a .jsonl or .parquet file")
    missing = [c for c in ("prompt", "answer") if c not in table.column_names]
    if missing:
        raise InvalidArgument(f"dataset {path} lacks column(s) {missing}; each row needs 'prompt' and 'answer'")
    if table.num_rows == 0:
        raise InvalidArgument(f"dataset {path} has no rows")
    return table.select(["prompt", "answer"]).cast(pa.schema([("prompt", pa.string()), ("answer", pa.string())]))


class DatasetSource(ProblemSource):
    def __init__(self, path: Path) -> None:
        self.name = path.stem
        table = read_rows(path)
        self._prompts = table["prompt"].to_pylist()
        self._answers = table["answer"].to_pylist()

    @property
    def num_problems(self) -> int | None:
        return len(self._prompts)

    def problem(self, index: int) -> Problem:
        row = index % len(self._prompts)
        return Problem(index, self._prompts[row], self._answers[row])
