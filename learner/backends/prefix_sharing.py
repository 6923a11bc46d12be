"""Shared-prefix forward for GRPO-shaped batches: a group's completions share their prompt, so the prompt
runs through the model once per group and every completion attends to that one copy of its keys and
values, instead of each of the group's (say) 32 sequences recomputing it.

A micro-batch's datums are split, in order, into runs of consecutive datums with a common prefix of at
least MIN_SHARED_TOKENS (an RL batch keeps a group's datums together); the prefix stops one token short of
the shortest member, so every member keeps a suffix of its own. Runs with the same prefix length are
batched: one forward of their prefixes ([runs, P], its cache kept), the cache gathered to one row per
member (a differentiable index: the gradient of each member's loss flows back into the shared prefix,
summed over the members, exactly as if each had its own copy), then one forward of the right-padded
suffixes with positions from P, attending to the cache and to themselves. Each member's hidden states
are the prefix's then its suffix's: the same function as the padded or packed path, to fp32 rounding.

Used when it saves at least a quarter of the tokens, on SDPA or eager attention without activation
checkpointing (Hugging Face drops the cache in checkpointed layers); otherwise the packed path runs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

MIN_SHARED_TOKENS = 4
MIN_SAVING = 0.25


@dataclass(frozen=True)
class PrefixRun:
    members: list[int]
    """Indices of consecutive datums (into the micro-batch's list)."""
    prefix: int
    """Tokens of model_input they all share and that run once (0: a datum alone, nothing shared)."""


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def prefix_runs(sequences: Sequence[np.ndarray]) -> list[PrefixRun] | None:
    """The runs of `sequences`, or None when sharing would save under MIN_SAVING of the tokens."""
    runs: list[PrefixRun] = []
    start = 0
    while start < len(sequences):
        end, shared = start + 1, len(sequences[start]) - 1
        while end < len(sequences):
            candidate = min(shared, _common_prefix(sequences[start], sequences[end]), len(sequences[end]) - 1)
            if candidate < MIN_SHARED_TOKENS:
                break
            shared, end = candidate, end + 1
        runs.append(PrefixRun(list(range(start, end)), shared if end - start > 1 else 0))
        start = end
    saved = sum((len(run.members) - 1) * run.prefix for run in runs)
    return runs if saved >= MIN_SAVING * sum(len(s) for s in sequences) else None


def shared_prefix_hidden(
    decoder: torch.nn.Module, sequences: Sequence[np.ndarray], runs: list[PrefixRun], device: torch.device
) -> list[torch.Tensor]:
    """Final hidden states [len, H] of every sequence, each prefix computed once per run."""
    hidden: list[torch.Tensor | None] = [None] * len(sequences)
    by_prefix: dict[int, list[PrefixRun]] = defaultdict(list)
    for run in runs:
        by_prefix[run.prefix].append(run)
    for prefix, same in by_prefix.items():
        members = [m for run in same for m in run.members]
        run_of = torch.tensor([r for r, run in enumerate(same) for _ in run.members], device=device)
        suffixes = [sequences[m][prefix:] for m in members]
        width = max(len(s) for s in suffixes)
        suffix_ids = torch.zeros(len(members), width, dtype=torch.long)
        mask = torch.zeros(len(members), prefix + width, dtype=torch.long)
        for row, suffix in enumerate(suffixes):
            suffix_ids[row, : len(suffix)] = torch.from_numpy(suffix.astype(np.int64))
            mask[row, : prefix + len(suffix)] = 1
        positions = (prefix + torch.arange(width)).expand(len(members), width)
        cache, prefix_hidden = None, None
        if prefix:
            prefixes = np.stack([sequences[run.members[0]][:prefix] for run in same]).astype(np.int64)
            prefix_ids = torch.from_numpy(prefixes)
            out = decoder(
                input_ids=prefix_ids.to(device),
                position_ids=torch.arange(prefix).expand(len(same), prefix).to(device),
                use_cache=True,
            )
            prefix_hidden, cache = out.last_hidden_state, out.past_key_values
            cache.batch_select_indices(run_of)  # one row per member: a differentiable gather
        suffix_hidden = decoder(
            input_ids=suffix_ids.to(device),
            position_ids=positions.to(device),
            attention_mask=mask.to(device),
            past_key_values=cache,
            use_cache=cache is not None,
        ).last_hidden_state
        for row, member in enumerate(members):
            own = suffix_hidden[row, : len(suffixes[row])]
            hidden[member] = torch.cat([prefix_hidden[run_of[row]], own]) if prefix else own
    return hidden  # type: ignore[return-value]
