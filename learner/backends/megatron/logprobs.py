"""Per-token target logprobs from vocab-parallel logits, without gathering the full vocabulary.

Each TP rank holds logits for its slice of the (padded) vocabulary. log p(t) = z_t - max - log sum exp(z - max)
needs only three all-reduces of [B, L]-sized tensors: the max (a constant shift, no gradient), the sum of
exponentials, and the target logit (which lives on exactly one rank). The sums go through Megatron's
`reduce_from_tensor_model_parallel_region` (forward all-reduce, backward identity), which is the correct
gradient: every rank computes the same loss from the reduced values. Padded vocabulary rows are masked to
-inf so they never take probability mass. Computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def vocab_parallel_target_logprobs(
    logits_BLv: torch.Tensor, targets_BLK: torch.Tensor, vocab_size: int, tp_rank: int, tp_group
) -> torch.Tensor:
    """log p(target) for every (row, position, k); `logits_BLv` is this rank's vocabulary slice."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    logits_BLv = logits_BLv.float()
    partition = logits_BLv.shape[-1]
    start = tp_rank * partition
    valid = torch.arange(start, start + partition, device=logits_BLv.device) < vocab_size
    if not bool(valid.all()):
        logits_BLv = logits_BLv.masked_fill(~valid, float("-inf"))

    max_BL = logits_BLv.detach().max(dim=-1).values
    if dist.get_world_size(tp_group) > 1:
        dist.all_reduce(max_BL, op=dist.ReduceOp.MAX, group=tp_group)
    shifted_BLv = logits_BLv - max_BL.unsqueeze(-1)
    sum_exp_BL = reduce_from_tensor_model_parallel_region(shifted_BLv.exp().sum(dim=-1), group=tp_group)

    local_BLK = targets_BLK - start
    here_BLK = (local_BLK >= 0) & (local_BLK < partition)
    gathered_BLK = shifted_BLv.gather(-1, local_BLK.clamp(0, partition - 1))
    picked_BLK = torch.where(here_BLK, gathered_BLK, torch.zeros_like(gathered_BLK))  # not * mask: -inf * 0
    target_BLK = reduce_from_tensor_model_parallel_region(picked_BLK, group=tp_group)
    return target_BLK - sum_exp_BL.log().unsqueeze(-1)
