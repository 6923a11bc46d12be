"""Tinker's extra prompt scores, between its wire forms and the rollout's: top-k prompt logprobs and
target prompt logprobs (what distillation recipes ask a teacher for).

- `topk_prompt_logprobs = k`: a `[len(prompt), k]` pair of matrices (token ids, logprobs), most likely
  first. Row 0 (no context) and, with `prompt_logprobs_last_n`, rows before the last n are the SDK's
  "not scored" sentinel (token 0, logprob -99999.0).
- `target_prompt_logprobs`: an int64 tensor `[R, K]` with R <= len(prompt) - 1, dense or CSR; cell
  `[i, j]` asks for the logprob of that token at prompt position i + 1, and -1 asks for nothing. The
  answer is float32 in the same shape and layout, 0.0 where nothing was asked.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.gateway.bodies import Body, parse
from protos.anvil.tinker.v1 import tinker_public_pb2 as tpb
from protos.anvil.v1 import rollout_pb2
from protos.errors import InvalidArgument

MASK_TOKEN, MASK_LOGPROB = 0, -99999.0
"""What the SDK reads as "this position was not scored" (tinker.types.topk_logprobs)."""


class TensorBody(Body):
    data: list[int]
    dtype: str = "int64"
    shape: list[int]
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None


@dataclass(frozen=True)
class PromptTargets:
    """A request's target ids, as (position, token) pairs for the rollout and the layout to answer in."""

    body: TensorBody
    cells: list[int]
    """Index into `body.data` of each asked cell (id >= 0), in pair order."""
    positions: list[int]
    tokens: list[int]

    def answer(self, logprobs: list[float]) -> dict[str, Any]:
        """The float32 answer as TensorData JSON, in the request's shape and layout."""
        values = [0.0] * len(self.body.data)
        for cell, logprob in zip(self.cells, logprobs, strict=True):
            values[cell] = float(np.float32(logprob))
        answer: dict[str, Any] = {"data": values, "dtype": "float32", "shape": self.body.shape}
        if self.body.sparse_crow_indices is not None:
            answer["sparse_crow_indices"] = self.body.sparse_crow_indices
            answer["sparse_col_indices"] = self.body.sparse_col_indices
        return answer


def parse_targets(value: Any, prompt_length: int) -> PromptTargets:
    """`target_prompt_logprobs` checked against the prompt; InvalidArgument says what to fix."""
    body = parse(TensorBody, value, "target_prompt_logprobs")
    if body.dtype not in ("int64", "int32") or len(body.shape) != 2:
        raise InvalidArgument("target_prompt_logprobs must be a 2-D int64 tensor [positions, K] of token ids")
    rows, width = body.shape
    if not 0 < rows <= prompt_length - 1:
        raise InvalidArgument(
            f"target_prompt_logprobs has {rows} rows; give 1 to len(prompt) - 1 = {prompt_length - 1} (row i is "
            "scored at prompt position i + 1)"
        )
    if body.sparse_crow_indices is None:
        if len(body.data) != rows * width:
            raise InvalidArgument(f"target_prompt_logprobs has {len(body.data)} values for shape {body.shape}")
        row_of = [index // width for index in range(len(body.data))]
    else:
        row_of = _csr_rows(body, rows, width)
    cells = [index for index, token in enumerate(body.data) if token != -1]
    if any(body.data[index] < 0 for index in cells):
        raise InvalidArgument("target_prompt_logprobs holds a negative token id other than -1 (nothing asked)")
    return PromptTargets(body, cells, [row_of[index] + 1 for index in cells], [body.data[index] for index in cells])


def _csr_rows(body: TensorBody, rows: int, width: int) -> list[int]:
    crow, col = body.sparse_crow_indices, body.sparse_col_indices or []
    ordered = all(a <= b for a, b in itertools.pairwise(crow))
    if len(crow) != rows + 1 or crow[0] != 0 or crow[-1] != len(body.data) or not ordered:
        raise InvalidArgument("target_prompt_logprobs' sparse_crow_indices must rise from 0 to len(data) in rows + 1")
    if len(col) != len(body.data) or any(not 0 <= c < width for c in col):
        raise InvalidArgument("target_prompt_logprobs' sparse_col_indices must give a column in [0, K) per value")
    return [row for row in range(rows) for _ in range(crow[row + 1] - crow[row])]


def topk_of(reply: rollout_pb2.SampleResponse, prompt_length: int, k: int, last_n: int | None) -> dict[str, list]:
    """The `[len(prompt), k]` token ids and logprobs (JSON lists), sentinel rows where nothing was scored."""
    tokens = np.full((prompt_length, k), MASK_TOKEN, dtype=np.int64)
    logprobs = np.full((prompt_length, k), MASK_LOGPROB, dtype=np.float32)
    tokens[1:] = np.asarray(reply.prompt_topk_tokens, dtype=np.int64).reshape(prompt_length - 1, k)
    logprobs[1:] = np.asarray(reply.prompt_topk_logprobs, dtype=np.float32).reshape(prompt_length - 1, k)
    if last_n is not None:
        tokens[: max(prompt_length - last_n, 0)] = MASK_TOKEN
        logprobs[: max(prompt_length - last_n, 0)] = MASK_LOGPROB
    return {"token_ids": tokens.tolist(), "logprobs": logprobs.astype(np.float64).tolist()}


def add_to_proto(message: tpb.SampleResponse, topk: dict | None, targets: dict | None) -> None:
    """Set SampleResponse fields 3 (TopkLogprobs) and 5 (target Tensor) from their JSON forms."""
    if topk is not None:
        ids = np.asarray(topk["token_ids"], dtype=np.int32)
        message.topk_prompt_logprobs.token_ids = ids.tobytes()
        message.topk_prompt_logprobs.logprobs = np.asarray(topk["logprobs"], dtype=np.float32).tobytes()
        message.topk_prompt_logprobs.length, message.topk_prompt_logprobs.k = ids.shape
    if targets is not None:
        tensor = message.target_prompt_logprobs
        tensor.dtype = tpb.DTYPE_FLOAT32
        tensor.shape.extend(targets["shape"])
        values = np.asarray(targets["data"], dtype=np.float32).tobytes()
        if "sparse_crow_indices" in targets:
            tensor.sparse_csr.values = values
            tensor.sparse_csr.crow_indices = np.asarray(targets["sparse_crow_indices"], dtype=np.int64).tobytes()
            tensor.sparse_csr.col_indices = np.asarray(targets["sparse_col_indices"], dtype=np.int64).tobytes()
        else:
            tensor.dense = values


def topk_json(topk: dict) -> list[list[list[float]] | None]:
    """The legacy JSON form: per position a list of [token, logprob], None where nothing was scored."""
    rows = []
    for ids, logprobs in zip(topk["token_ids"], topk["logprobs"], strict=True):
        scored = [[token, logprob] for token, logprob in zip(ids, logprobs, strict=True) if logprob != MASK_LOGPROB]
        rows.append(scored or None)
    return rows
