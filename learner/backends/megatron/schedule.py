"""One request's micro-batches through megatron-core's forward-backward schedule.

With PP > 1 that is megatron's non-interleaved 1F1B schedule: each stage runs (pp - stage - 1) warm-up
forwards, then alternates one forward with one backward, then drains the remaining backwards. Stage s
computes micro-batch m while stage s+1 computes m-1, so PP divides time as well as memory, and a stage
holds at most pp micro-batches' activations instead of all M. With PP = 1 it is megatron's
no-pipelining loop. Either way gradients accumulate in `.grad` over the micro-batches.

Micro-batches differ in rows and length (they are cut by a token budget), so the model config sets
`variable_seq_lengths` (shapes travel before each activation). Anvil's losses are sums over datums, so
megatron must not average over micro-batches: the loss function returns a token count of 1 with
`calculate_per_token_loss`, which switches that division off. Activations cross stages as float32
(`pipeline_dtype`), whatever the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from learner.batch import Datum

PIPELINE_CONFIG = {
    "variable_seq_lengths": True,
    "moe_token_dispatcher_type": "alltoall",  # megatron refuses allgather with variable lengths, MoE or not
    "batch_p2p_comm": False,  # plain isend/irecv pairs (gloo has no batched p2p)
    "calculate_per_token_loss": True,
}
"""TransformerConfig settings the schedule needs (model.build_model passes them)."""


IDLE = Datum(model_input=np.zeros(1, dtype=np.int64), target_tokens=np.zeros(1, dtype=np.int64))
"""The one-token filler of an expert-parallel rank with fewer micro-batches than its group: it only keeps the
group's all-to-alls in step (no loss, no gradient, no load; with a load-balancing loss it would be all padding,
which is why backend.ep > 1 refuses one)."""


@dataclass
class MicroBatch:
    """One micro-batch's tensors, right-padded; every stage of a DP replica builds the same ones."""

    data: list
    input_ids_BL: torch.Tensor
    position_ids_BL: torch.Tensor
    causal_mask: torch.Tensor
    targets_BLK: torch.Tensor
    lengths: list[int]
    widths: list[int]

    @property
    def padding_BL(self) -> torch.Tensor:
        """True on the right padding, and on all of a filler: what an MoE router leaves out of its
        load-balancing loss and load counts."""
        if self.data[0] is IDLE:
            return torch.ones_like(self.input_ids_BL, dtype=torch.bool)
        length = self.input_ids_BL.shape[1]
        positions = torch.arange(length, device=self.input_ids_BL.device)
        return positions[None, :] >= torch.tensor(self.lengths, device=positions.device)[:, None]


def make_micro_batch(data: list, device: torch.device, multiple: int = 1) -> MicroBatch:
    """Right-padded to the longest datum, rounded up to `multiple` (sequence parallelism splits the
    sequence into that many equal parts)."""
    lengths = [len(d.model_input) for d in data]
    widths = [d.targets_per_position for d in data]
    batch, length, k = len(data), -(-max(lengths) // multiple) * multiple, max(widths)
    input_ids_BL = torch.zeros(batch, length, dtype=torch.long)
    targets_BLK = torch.zeros(batch, length, k, dtype=torch.long)
    for row, datum in enumerate(data):
        input_ids_BL[row, : lengths[row]] = torch.from_numpy(datum.model_input)
        targets_BLK[row, : lengths[row], : widths[row]] = torch.from_numpy(datum.target_tokens).view(
            lengths[row], widths[row]
        )
    position_ids_BL = torch.arange(length).unsqueeze(0).expand(batch, -1)
    causal_mask = torch.ones(length, length, dtype=torch.bool).triu(1).view(1, 1, length, length)  # True = hidden
    return MicroBatch(
        data,
        input_ids_BL.to(device),
        position_ids_BL.to(device),
        causal_mask.to(device),
        targets_BLK.to(device),
        lengths,
        widths,
    )


LossOnLogits = Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, dict]]
"""(micro-batch, last stage's logits) -> (loss to backpropagate, what to keep for the caller)."""


def run(
    model,
    micro_batches: Sequence[MicroBatch],
    loss_on_logits: LossOnLogits,
    *,
    last_stage: bool,
    backward: bool,
    autocast: Callable,
    before_forward: Callable[[MicroBatch], None] | None = None,
) -> list[dict]:
    """Forward (and backward) of every micro-batch through this stage; on the last stage, what
    `loss_on_logits` kept for each micro-batch, in order ([] elsewhere). `before_forward` sees each
    micro-batch as its forward starts (routing replay sets its routes there)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []

    def forward_step(data_iterator, stage_model):
        micro_batch = next(data_iterator)
        if before_forward is not None:
            before_forward(micro_batch)
        moe = {"padding_mask": micro_batch.padding_BL} if stage_model.config.num_moe_experts else {}
        with autocast():
            output = stage_model(micro_batch.input_ids_BL, micro_batch.position_ids_BL, micro_batch.causal_mask, **moe)
        if not last_stage:
            output = output.float()  # the receiving stage allocates pipeline_dtype (float32)
        return output, partial(_loss, loss_on_logits, micro_batch)

    schedule = get_forward_backward_func()
    with torch.enable_grad() if backward else torch.no_grad():
        kept = schedule(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=model,
            num_microbatches=len(micro_batches),
            seq_length=max(max(mb.lengths) for mb in micro_batches),  # shapes travel anyway (variable lengths)
            micro_batch_size=max(len(mb.data) for mb in micro_batches),
            forward_only=not backward,
        )
    return list(kept) if last_stage else []


def _loss(loss_on_logits: LossOnLogits, micro_batch: MicroBatch, logits: torch.Tensor):
    loss_value, kept = loss_on_logits(micro_batch, logits)
    return loss_value, torch.tensor(1, dtype=torch.int), kept  # "1 token": megatron divides by nothing


def per_datum(values_BLK: torch.Tensor, micro_batch: MicroBatch) -> list[torch.Tensor]:
    """Each datum's values, flattened position-major, without the padding."""
    return [
        values_BLK[row, : micro_batch.lengths[row], : micro_batch.widths[row]].reshape(-1)
        for row in range(len(micro_batch.data))
    ]


def to_numpy(values: list[torch.Tensor]) -> list[np.ndarray]:
    return [v.detach().float().cpu().numpy() for v in values]
