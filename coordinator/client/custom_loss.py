"""Tinker's two-pass `forward_backward_custom`, on a LearnerSession.

1. `forward` the data as cross_entropy with zero weights, to get the learner's per-token logprobs;
2. run the user's loss in torch on those logprobs as leaf tensors, and backpropagate to them;
3. `forward_backward` cross_entropy with weights = -dLoss/dlogprobs. The server's loss -sum(w * lp) then
   has the same parameter gradient as the user's loss.
Both seq_ids are taken when the call is made, so a call issued right after it (an optim_step that does
not wait) still runs after both passes. If the first pass or the user's loss fails, the second id is
spent on a gradient-free forward, so the session's sequence has no gap for later requests to wait on.
The result's `loss:sum` is the user's loss; the server's surrogate moves to `surrogate_loss:sum`, and
the user's metrics are merged in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from coordinator.client.learner_api import LearnerSession
from coordinator.client.types import Datum, ForwardBackwardOutput, TensorData

CustomLossFn = Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def _with_weights(data: Sequence[Datum], weights: Sequence[np.ndarray]) -> list[Datum]:
    return [
        Datum(
            model_input=datum.model_input,
            loss_fn_inputs={
                "target_tokens": datum.loss_fn_inputs["target_tokens"],
                "weights": TensorData.from_numpy(w),
            },
        )
        for datum, w in zip(data, weights, strict=True)
    ]


async def forward_backward_custom(
    session: LearnerSession, data: list[Datum], loss_fn: CustomLossFn
) -> ForwardBackwardOutput:
    forward_id, backward_id = session.next_seq_id(), session.next_seq_id()
    zeros = [np.zeros(d.loss_fn_inputs["target_tokens"].to_numpy().shape, dtype=np.float32) for d in data]
    try:
        forward = await session.forward(_with_weights(data, zeros), "cross_entropy", seq_id=forward_id)
        leaves = [torch.tensor(out["logprobs"].to_numpy(), requires_grad=True) for out in forward.loss_fn_outputs]
        loss, user_metrics = loss_fn(data, leaves)
        loss.backward()
    except BaseException:
        with contextlib.suppress(Exception):
            await session.forward(_with_weights(data, zeros), "cross_entropy", seq_id=backward_id)
        raise
    weights = [
        (-leaf.grad).numpy().astype(np.float32) if leaf.grad is not None else np.zeros_like(z)
        for leaf, z in zip(leaves, zeros, strict=True)
    ]
    backward = await session.forward_backward(_with_weights(data, weights), "cross_entropy", seq_id=backward_id)
    metrics: dict[str, Any] = dict(backward.metrics)
    metrics["surrogate_loss:sum"] = metrics.pop("loss:sum")
    metrics["loss:sum"] = float(loss.detach())
    metrics.update(user_metrics)
    return ForwardBackwardOutput(backward.loss_fn_output_type, forward.loss_fn_outputs, metrics)
