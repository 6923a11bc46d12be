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

from learner.backends.packing import pack

SHAREABLE_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take a KV cache plus a padded suffix mask (the shared-prefix path)."""
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
    """The split into runs of consecutive datums that saves the most tokens, or None when that is under
    MIN_SAVING of them.

    Why not grow each run while the next datum shares MIN_SHARED_TOKENS with it: GRPO prompts of
    different groups often share their first tokens (a chat template's `<|user|>`, a task's wording), and
    that greedy rule merged a whole copy_digit batch (16 groups x 32, 7-token prompts) into one run sharing
    4 tokens instead of 16 runs sharing 6: three suffix tokens per datum instead of one, and a learner step
    0.30 s instead of 0.17 s.

    Exact, by dynamic programming over where the last run starts: a run of datums s..e-1 shares the
    smallest `link` between neighbours inside it (what two neighbours share, less one token each keeps),
    and saves (members - 1) x that. One vectorised pass per datum: a few milliseconds for 512.
    """
    count = len(sequences)
    if count == 0:
        return None
    links = np.array(
        [
            min(_common_prefix(sequences[k], sequences[k + 1]), len(sequences[k]) - 1, len(sequences[k + 1]) - 1)
            for k in range(count - 1)
        ],
        dtype=np.int64,
    )
    best = np.zeros(count + 1, dtype=np.int64)  # best[e]: the most saved by datums 0..e-1
    start_of = np.zeros(count + 1, dtype=np.int64)  # where the last run of that best split starts
    prefix_of = np.zeros(count + 1, dtype=np.int64)
    for end in range(1, count + 1):
        best[end], start_of[end] = best[end - 1], end - 1  # the last datum alone
        if end >= 2:
            shared = np.minimum.accumulate(links[: end - 1][::-1])  # run start s = end-2, end-3, ..., 0
            starts = np.arange(end - 2, -1, -1)
            gains = np.where(shared >= MIN_SHARED_TOKENS, best[starts] + (end - 1 - starts) * shared, -1)
            pick = int(np.argmax(gains))
            if gains[pick] > best[end]:
                best[end], start_of[end], prefix_of[end] = gains[pick], starts[pick], shared[pick]
    if best[count] < MIN_SAVING * sum(len(s) for s in sequences):
        return None
    runs, end = [], count
    while end > 0:
        start = int(start_of[end])
        runs.append(PrefixRun(list(range(start, end)), int(prefix_of[end]) if end - start > 1 else 0))
        end = start
    return runs[::-1]


def shared_prefix_hidden(
    decoder: torch.nn.Module, sequences: Sequence[np.ndarray], runs: list[PrefixRun], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of every sequence back to back, each prefix computed once per run, as
    (rows [U, H], row_T [sum of lengths]): position t of the concatenated sequences reads rows[row_T[t]].

    A run's prefix rows stay one copy however many members read them, so the output head (packing.
    target_logprobs) runs once per distinct row too: on copy_digit that is 602 rows instead of 3,584, a
    third of the learner's matmul time. Indexing, not one `cat` per member (512 of them, each with a
    tensor-indexed `.item()`, were an eighth of a copy_digit step); the backward of the gather sums each
    member's gradient into its run's prefix rows."""
    by_prefix: dict[int, list[PrefixRun]] = defaultdict(list)
    for run in runs:
        by_prefix[run.prefix].append(run)
    blocks: list[torch.Tensor] = []  # flattened [rows, H] prefix and suffix outputs, in computation order
    rows_of: list[np.ndarray] = [np.empty(0, np.int64)] * len(sequences)  # each member's rows in the blocks
    offset = 0
    for prefix, same in by_prefix.items():
        members = [m for run in same for m in run.members]
        run_of = [r for r, run in enumerate(same) for _ in run.members]
        suffixes = [sequences[m][prefix:] for m in members]
        width = max(len(s) for s in suffixes)
        suffix_ids = torch.zeros(len(members), width, dtype=torch.long)
        mask = torch.zeros(len(members), prefix + width, dtype=torch.long)
        for row, suffix in enumerate(suffixes):
            suffix_ids[row, : len(suffix)] = torch.from_numpy(suffix.astype(np.int64))
            mask[row, : prefix + len(suffix)] = 1
        positions = (prefix + torch.arange(width)).expand(len(members), width)
        cache, prefix_start = None, offset
        if prefix:
            prefixes = np.stack([sequences[run.members[0]][:prefix] for run in same]).astype(np.int64)
            out = decoder(
                input_ids=torch.from_numpy(prefixes).to(device),
                position_ids=torch.arange(prefix).expand(len(same), prefix).to(device),
                use_cache=True,
            )
            blocks.append(out.last_hidden_state.reshape(len(same) * prefix, -1))
            offset += len(same) * prefix
            cache = out.past_key_values
            cache.batch_select_indices(torch.tensor(run_of, device=device))  # one row per member: differentiable
        suffix_hidden = decoder(
            input_ids=suffix_ids.to(device),
            position_ids=positions.to(device),
            attention_mask=mask.to(device),
            past_key_values=cache,
            use_cache=cache is not None,
        ).last_hidden_state
        blocks.append(suffix_hidden.reshape(len(members) * width, -1))
        for row, member in enumerate(members):
            own = offset + row * width + np.arange(len(suffixes[row]))
            shared = prefix_start + run_of[row] * prefix + np.arange(prefix)
            rows_of[member] = np.concatenate([shared, own]) if prefix else own
        offset += len(members) * width
    index = np.concatenate(rows_of)
    used = np.unique(index)  # drops the suffixes' padding rows, which no position reads
    rows = torch.cat(blocks).index_select(0, torch.from_numpy(used).to(device))
    return rows, torch.from_numpy(np.searchsorted(used, index)).to(device)


def sequence_hidden(
    decoder: torch.nn.Module,
    sequences: Sequence[np.ndarray],
    device: torch.device,
    attention: str,
    share: bool,
    checkpointed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final hidden states of `sequences` back to back, as (rows, row_T) (None: row t for position t).

    With `share`: identical sequences run once (a GRPO group whose completions are one token, or agree,
    feeds the learner the same model_input 32 times), then each shared prefix runs once where that pays
    (prefix_runs; not under activation checkpointing, where Hugging Face drops the cache). Otherwise, or
    when nothing is shared: packed rows (packing.pack)."""
    if share:
        distinct, copy_of = _distinct(sequences)
        if len(distinct) < len(sequences):
            rows, row_T = sequence_hidden(decoder, distinct, device, attention, share, checkpointed)
            row_T = torch.arange(rows.shape[0], device=rows.device) if row_T is None else row_T
            starts = np.cumsum([0, *(len(s) for s in distinct)])
            index = np.concatenate([np.arange(starts[j], starts[j + 1]) for j in copy_of])
            return rows, row_T[torch.from_numpy(index).to(row_T.device)]
        runs = prefix_runs(sequences) if attention in SHAREABLE_ATTENTION and not checkpointed else None
        if runs is not None:
            return shared_prefix_hidden(decoder, sequences, runs, device)
    packed = pack(sequences, attention, device)
    hidden_BRH = decoder(
        input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=packed.attention_mask
    ).last_hidden_state
    return hidden_BRH.reshape(-1, hidden_BRH.shape[-1]).index_select(0, packed.token_index), None


def _distinct(sequences: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """The distinct sequences, in first-seen order, and for each sequence the index of its distinct copy."""
    seen: dict[bytes, int] = {}
    distinct: list[np.ndarray] = []
    copy_of = []
    for sequence in sequences:
        index = seen.setdefault(np.asarray(sequence, dtype=np.int64).tobytes(), len(distinct))
        if index == len(distinct):
            distinct.append(sequence)
        copy_of.append(index)
    return distinct, copy_of
