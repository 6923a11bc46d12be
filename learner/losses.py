"""Tinker's built-in losses as pure functions of flat per-token tensors.

Every loss reduces by **sum** over tokens (no mean), as Tinker does. Shapes: `_T` is the flat
concatenation over the batch of each datum's target positions (N*K for cross_entropy with K targets
per position, N otherwise). Notation: `lp` = the learner's logprob of the target (`logprobs_T`),
`lp_q` = the sampler's (`inputs["logprobs"]`), `A` = advantages, `r = exp(lp - lp_q)`.

    cross_entropy        L = -sum(w * lp)                                   weights may be any real
    importance_sampling  L = -sum(r * A)
    ppo                  L = -sum(min(r * A, clip(r, lo, hi) * A))         lo, hi = 0.8, 1.2
    cispo                L = -sum(sg(clip(r, lo, hi)) * lp * A)            lo, hi = 0.0, 4.0; sg = stop-grad
    dro                  L = -sum(lp * A - beta/2 * (lp - lp_q)^2)          beta = 0.05
    gspo                 L = -sum(m * min(s * A, clip(s, lo, hi) * A))     lo, hi = 1 - 3e-4, 1 + 4e-4
                         s = exp(mean over the datum's masked tokens of (lp - lp_q)), one ratio per
                         sequence (Zheng et al. 2025, "Group Sequence Policy Optimization"); m is
                         `sequence_ratio_mask`, or (A != 0) when the batch has no such column

Tinker's `gspo` is undocumented; this is the GSPO paper's objective in Tinker's per-token-sum form, with
the paper's clip range as defaults. Tinker's `stable_reinforce` is proprietary and is not offered (the
gateway answers it with a user error that points to `importance_sampling`).

`resolve_loss` checks a request against the registry before any state changes: unknown names, missing
or extra per-token inputs, and unknown or out-of-range config keys are InvalidArgument.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from protos.errors import InvalidArgument

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Mapping[str, Tensor], Mapping[str, float]], tuple[Tensor, dict[str, float]]]

PER_TOKEN_INPUTS = frozenset({"weights", "logprobs", "advantages", "sequence_ratio_mask"})
"""Batch columns that are loss inputs; a loss must get exactly the ones it declares (or may take)."""

DATUM_INDEX = "datum_index"
"""Not a column: backends add this int64 `_T` tensor (the datum each token belongs to) to every loss's
inputs, for losses with a per-sequence term (gspo)."""


def loss_inputs_T(
    data: Sequence[Any], input_names: frozenset[str], device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """The `_T` loss inputs of a batch's datums (each a learner.batch.Datum), concatenated in datum order,
    plus DATUM_INDEX; what every backend hands to `LossSpec.fn` next to its concatenated logprobs."""
    inputs = {name: torch.from_numpy(np.concatenate([d.loss_inputs[name] for d in data])) for name in input_names}
    inputs[DATUM_INDEX] = torch.cat(
        [torch.full((len(d.target_tokens),), row, dtype=torch.long) for row, d in enumerate(data)]
    )
    return {name: tensor.to(device) for name, tensor in inputs.items()}


@dataclass(frozen=True)
class LossSpec:
    """A built-in loss: its per-token inputs, its config keys with defaults, and the function."""

    name: str
    inputs: frozenset[str]
    fn: LossFn
    defaults: Mapping[str, float] = field(default_factory=dict)
    multi_target: bool = False
    """Accepts K > 1 targets per position (only cross_entropy does)."""
    optional_inputs: frozenset[str] = frozenset()
    """Per-token inputs the loss uses when present."""
    per_datum_metrics: frozenset[str] = frozenset()
    """`:mean` metrics averaged over datums rather than tokens (so micro-batches combine them exactly)."""


def _ratio(logprobs_T: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
    return torch.exp(logprobs_T - inputs["logprobs"])


def cross_entropy(logprobs_T: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]):
    loss = -(inputs["weights"] * logprobs_T).sum()
    return loss, {"loss:sum": loss.item()}


def importance_sampling(logprobs_T: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]):
    ratio_T = _ratio(logprobs_T, inputs)
    loss = -(ratio_T * inputs["advantages"]).sum()
    return loss, {"loss:sum": loss.item(), "ratio:mean": ratio_T.mean().item()}


def ppo(logprobs_T: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]):
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]
    ratio_T = _ratio(logprobs_T, inputs)
    advantages_T = inputs["advantages"]
    objective_T = torch.minimum(ratio_T * advantages_T, ratio_T.clamp(low, high) * advantages_T)
    loss = -objective_T.sum()
    clipped = ((ratio_T < low) | (ratio_T > high)).float().mean()
    return loss, {"loss:sum": loss.item(), "ratio:mean": ratio_T.mean().item(), "clip_fraction:mean": clipped.item()}


def cispo(logprobs_T: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]):
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]
    ratio_T = _ratio(logprobs_T, inputs)
    clipped_ratio_T = ratio_T.clamp(low, high).detach()
    loss = -(clipped_ratio_T * logprobs_T * inputs["advantages"]).sum()
    clipped = ((ratio_T < low) | (ratio_T > high)).float().mean()
    return loss, {"loss:sum": loss.item(), "ratio:mean": ratio_T.mean().item(), "clip_fraction:mean": clipped.item()}


def dro(logprobs_T: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]):
    beta = config["beta"]
    drift_T = logprobs_T - inputs["logprobs"]
    loss = -(logprobs_T * inputs["advantages"] - 0.5 * beta * drift_T.square()).sum()
    return loss, {"loss:sum": loss.item()}


def gspo(logprobs_T: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]):
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]
    advantages_T, datum_T = inputs["advantages"], inputs[DATUM_INDEX]
    mask_T = inputs["sequence_ratio_mask"] if "sequence_ratio_mask" in inputs else (advantages_T != 0).float()
    num_datums = int(datum_T.max().item()) + 1 if datum_T.numel() else 0
    log_ratio_sum_D = torch.zeros(num_datums, device=logprobs_T.device).index_add(
        0, datum_T, (logprobs_T - inputs["logprobs"]) * mask_T
    )
    tokens_D = torch.zeros(num_datums, device=logprobs_T.device).index_add(0, datum_T, mask_T)
    ratio_D = torch.exp(log_ratio_sum_D / tokens_D.clamp(min=1.0))
    ratio_T = ratio_D[datum_T]
    objective_T = torch.minimum(ratio_T * advantages_T, ratio_T.clamp(low, high) * advantages_T)
    loss = -(mask_T * objective_T).sum()
    clipped = ((ratio_D < low) | (ratio_D > high)).float().mean()
    return loss, {
        "loss:sum": loss.item(),
        "sequence_ratio:mean": ratio_D.mean().item(),
        "clip_fraction:mean": clipped.item(),
    }


_RL_INPUTS = frozenset({"logprobs", "advantages"})
LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("cross_entropy", frozenset({"weights"}), cross_entropy, multi_target=True),
        LossSpec("importance_sampling", _RL_INPUTS, importance_sampling),
        LossSpec("ppo", _RL_INPUTS, ppo, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
        LossSpec("cispo", _RL_INPUTS, cispo, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
        LossSpec("dro", _RL_INPUTS, dro, {"beta": 0.05}),
        LossSpec(
            "gspo",
            _RL_INPUTS,
            gspo,
            {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4},
            optional_inputs=frozenset({"sequence_ratio_mask"}),
            per_datum_metrics=frozenset({"sequence_ratio:mean", "clip_fraction:mean"}),
        ),
    )
}


def resolve_loss(
    name: str, present_inputs: frozenset[str], config: Mapping[str, float], multi_target: bool
) -> tuple[LossSpec, dict[str, float]]:
    """Validate a loss request; return its spec and the config with defaults filled in."""
    spec = LOSSES.get(name)
    if spec is None:
        raise InvalidArgument(f"unknown loss_fn {name!r}; choose one of {sorted(LOSSES)}")
    given = present_inputs & PER_TOKEN_INPUTS
    missing, extra = sorted(spec.inputs - given), sorted(given - spec.inputs - spec.optional_inputs)
    if missing:
        raise InvalidArgument(f"loss_fn {name!r} needs batch column(s) {missing}; add them to every datum")
    if extra:
        raise InvalidArgument(
            f"loss_fn {name!r} does not use batch column(s) {extra}; remove them (it takes {sorted(spec.inputs)})"
        )
    if multi_target and not spec.multi_target:
        raise InvalidArgument(f"loss_fn {name!r} takes one target per position; targets_per_position must be 1")
    unknown = sorted(set(config) - set(spec.defaults))
    if unknown:
        allowed = sorted(spec.defaults) or "none"
        raise InvalidArgument(f"loss_fn {name!r} has no config key(s) {unknown}; allowed: {allowed}")
    resolved = {**spec.defaults, **{key: float(value) for key, value in config.items()}}
    if "clip_low_threshold" in resolved:
        low, high = resolved["clip_low_threshold"], resolved["clip_high_threshold"]
        if not 0 <= low <= high:
            raise InvalidArgument(
                f"loss_fn {name!r}: need 0 <= clip_low_threshold <= clip_high_threshold, got {low} and {high}"
            )
    if resolved.get("beta", 0.0) < 0:
        raise InvalidArgument(f"loss_fn {name!r}: beta must be >= 0, got {resolved['beta']}")
    return spec, resolved
