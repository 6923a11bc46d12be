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

`resolve_loss` checks a request against the registry before any state changes: unknown names, missing
or extra per-token inputs, and unknown or out-of-range config keys are InvalidArgument.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from protos.errors import InvalidArgument

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Mapping[str, Tensor], Mapping[str, float]], tuple[Tensor, dict[str, float]]]

PER_TOKEN_INPUTS = frozenset({"weights", "logprobs", "advantages"})
"""Batch columns that are loss inputs; a loss must get exactly the ones it declares."""


@dataclass(frozen=True)
class LossSpec:
    """A built-in loss: its per-token inputs, its config keys with defaults, and the function."""

    name: str
    inputs: frozenset[str]
    fn: LossFn
    defaults: Mapping[str, float] = field(default_factory=dict)
    multi_target: bool = False
    """Accepts K > 1 targets per position (only cross_entropy does)."""


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


_RL_INPUTS = frozenset({"logprobs", "advantages"})
LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("cross_entropy", frozenset({"weights"}), cross_entropy, multi_target=True),
        LossSpec("importance_sampling", _RL_INPUTS, importance_sampling),
        LossSpec("ppo", _RL_INPUTS, ppo, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
        LossSpec("cispo", _RL_INPUTS, cispo, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
        LossSpec("dro", _RL_INPUTS, dro, {"beta": 0.05}),
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
    missing, extra = sorted(spec.inputs - given), sorted(given - spec.inputs)
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
