"""The objectives' maths as pure functions: group-relative advantages, policy-gradient datums, online DPO.

Shapes: `_G` per sample of a group, `_T` per completion token. A sampled sequence becomes one datum:
model_input = prompt + completion[:-1], target_tokens = prompt[1:] + completion, and the per-token loss
inputs are zero on prompt positions (no gradient there) and carry the sampler's logprobs and the
sample's advantage on completion positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from coordinator.client.types import Datum, ModelInput, TensorData


def centred_advantages(rewards: Sequence[float], normalize_by_std: bool) -> list[float]:
    """Rewards minus their mean, optionally divided by their std (0 when all rewards tie)."""
    values = np.asarray(rewards, dtype=np.float64)
    centred = values - values.mean()
    if normalize_by_std:
        std = values.std()
        centred = centred / std if std > 1e-6 else np.zeros_like(centred)
    return centred.tolist()


def group_advantages(rewards_G: Sequence[float], normalize_by_std: bool) -> list[float]:
    """GRPO: each sample against its own group (the other samples of the same prompt)."""
    return centred_advantages(rewards_G, normalize_by_std)


def batch_advantages(rewards_BG: Sequence[Sequence[float]], normalize_by_std: bool) -> list[list[float]]:
    """REINFORCE with a batch-mean baseline: every sample against all samples of the batch."""
    flat = centred_advantages([r for group in rewards_BG for r in group], normalize_by_std)
    out, start = [], 0
    for group in rewards_BG:
        out.append(flat[start : start + len(group)])
        start += len(group)
    return out


LOSS_NORMALIZATIONS = ("sum", "token_mean", "sequence_mean", "constant")


def loss_scales(lengths: Sequence[int], normalization: str, constant_tokens: int | None = None) -> list[float]:
    """The factor on each sequence's advantages that turns the learner's summed policy-gradient loss (Tinker's
    losses are sums over tokens, and linear in the advantage for any positive factor, clipping included)
    into the chosen normalisation over n sequences of `lengths` tokens:

    - sum (Tinker): every token counts 1; longer answers weigh more;
    - token_mean (DAPO): the mean over every token of the batch, 1 / sum(lengths);
    - sequence_mean (GRPO as first published): each sequence's mean token, averaged, 1 / (len_i * n);
    - constant (Dr. GRPO): 1 / (constant_tokens * n), a fixed budget instead of the lengths, so no
      length bias and no per-batch rescaling.

    Each factor is a sequence's own part (`sequence_loss_scales`) times one factor of the whole batch
    (`batch_loss_scale`), so a batch can train in passes before all of it is sampled: the passes carry
    the sequences' parts and the optimizer step the batch's (OptimStep's grad_scale, before clipping).
    """
    batch = batch_loss_scale(lengths, normalization, constant_tokens)
    return [batch * own for own in sequence_loss_scales(lengths, normalization)]


def sequence_loss_scales(lengths: Sequence[int], normalization: str) -> list[float]:
    """The part of each sequence's loss factor that depends on that sequence alone: 1 / len_i for
    sequence_mean, else 1."""
    if normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"unknown loss normalisation {normalization!r}; choose one of {LOSS_NORMALIZATIONS}")
    if normalization == "sequence_mean":
        return [1.0 / max(length, 1) for length in lengths]
    return [1.0] * len(lengths)


def batch_loss_scale(lengths: Sequence[int], normalization: str, constant_tokens: int | None = None) -> float:
    """The part of the loss factor shared by the whole batch of sequences of `lengths` tokens: 1 for sum,
    1 / sum(lengths) for token_mean, 1 / n for sequence_mean, 1 / (constant_tokens * n) for constant."""
    count = len(lengths)
    if normalization == "sum":
        return 1.0
    if normalization == "token_mean":
        return 1.0 / max(sum(lengths), 1)
    if normalization == "sequence_mean":
        return 1.0 / max(count, 1)
    if normalization == "constant":
        if not constant_tokens or constant_tokens < 1:
            raise ValueError("the constant normalisation needs constant_tokens >= 1 (Dr. GRPO: the generation budget)")
        return 1.0 / (constant_tokens * max(count, 1))
    raise ValueError(f"unknown loss normalisation {normalization!r}; choose one of {LOSS_NORMALIZATIONS}")


def policy_datum(
    prompt: Sequence[int],
    completion: Sequence[int],
    sampler_logprobs_T: Sequence[float],
    advantage_T: Sequence[float] | float,
    sampler_versions_T: Sequence[int] | None = None,
    routed_experts: np.ndarray | None = None,
) -> Datum:
    """A datum for importance_sampling / ppo / cispo; `advantage_T` may be one value or one per token.
    `sampler_versions_T` (the version of each completion token) becomes the batch's `sampler_versions`
    column, -1 on prompt positions, so staleness and importance corrections can work per token.
    `routed_experts` (the sampler's routes of every model_input position) is for routing replay."""
    num_prompt_targets = len(prompt) - 1
    tokens = [*prompt, *completion]
    advantages = [advantage_T] * len(completion) if isinstance(advantage_T, float | int) else list(advantage_T)
    inputs = {
        "target_tokens": TensorData(tokens[1:], "int64", [len(tokens) - 1]),
        "logprobs": TensorData([0.0] * num_prompt_targets + list(sampler_logprobs_T), "float32", [len(tokens) - 1]),
        "advantages": TensorData([0.0] * num_prompt_targets + advantages, "float32", [len(tokens) - 1]),
    }
    if sampler_versions_T:
        versions = [-1] * num_prompt_targets + list(sampler_versions_T)
        inputs["sampler_versions"] = TensorData(versions, "int64", [len(tokens) - 1])
    if routed_experts is not None:  # [len(tokens) - 1, moe_layers, top_k]: routing replay in the learner
        inputs["routed_experts"] = TensorData.from_numpy(routed_experts)
    return Datum(model_input=ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def supervised_datum(prompt: Sequence[int], completion: Sequence[int], weight: float) -> Datum:
    """A datum for cross_entropy: `weight` on each completion target, 0 on prompt targets (no gradient)."""
    tokens = [*prompt, *completion]
    weights = [0.0] * (len(prompt) - 1) + [weight] * len(completion)
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": TensorData(tokens[1:], "int64", [len(tokens) - 1]),
            "weights": TensorData(weights, "float32", [len(tokens) - 1]),
        },
    )


def truncated_is_weights(learner_T: np.ndarray, sampler_T: np.ndarray, cap: float) -> np.ndarray:
    """min(p_learner / p_sampler, cap) per token: corrects the sampler/learner mismatch, bounded."""
    return np.minimum(np.exp(learner_T - sampler_T), cap)


def sampler_learner_kl(sampler_T: np.ndarray, learner_T: np.ndarray) -> tuple[float, float]:
    """Tinker cookbook's health checks: v1 = mean(lp_q - lp_p), v2 = mean((lp_q - lp_p)^2) / 2."""
    if sampler_T.size == 0:
        return 0.0, 0.0
    diff = sampler_T - learner_T
    return float(diff.mean()), float(0.5 * np.square(diff).mean())


def dpo_datum(prompt: Sequence[int], completion: Sequence[int]) -> Datum:
    """A datum for the two-pass custom loss: only target_tokens (and weights, filled by the client)."""
    tokens = [*prompt, *completion]
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": TensorData(tokens[1:], "int64", [len(tokens) - 1])},
    )


def dpo_loss(
    completion_lengths: Sequence[int], reference_logprob_sums: Sequence[float], beta: float
):  # -> CustomLossFn
    """Online DPO over consecutive (chosen, rejected) datums; the reference is the sampling policy.

    loss = -sum_pairs log sigmoid(beta * ((lp_c - ref_c) - (lp_r - ref_r))), lp = sum of completion logprobs.
    """

    def loss_fn(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        sums = [lp[-n:].sum() if n else lp.sum() * 0 for lp, n in zip(logprobs, completion_lengths, strict=True)]
        total = torch.zeros(())
        accuracy = 0.0
        pairs = len(sums) // 2
        for pair in range(pairs):
            chosen, rejected = 2 * pair, 2 * pair + 1
            margin = beta * (
                (sums[chosen] - reference_logprob_sums[chosen]) - (sums[rejected] - reference_logprob_sums[rejected])
            )
            total = total - torch.nn.functional.logsigmoid(margin)
            accuracy += float(margin.detach() > 0)
        return total, {"dpo_accuracy:mean": accuracy / max(pairs, 1), "dpo_pairs:sum": float(pairs)}

    return loss_fn
