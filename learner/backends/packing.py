"""Token-budget micro-batches, padding-free packing and memory-lean logprobs for the torch backend.

A ForwardBackward request can be far larger than what fits in memory at once (an RL batch is hundreds
of sequences of mixed lengths), and right-padding it spends compute on nothing. So a request is split,
in datum order, into micro-batches of at most `max_tokens` tokens (a single longer datum goes alone);
each micro-batch runs as packed rows: sequences back to back in rows as long as its longest sequence,
positions restarting at 0 per sequence, and attention kept inside each sequence (a block-diagonal causal
mask on SDPA/eager; flash attention's varlen path takes one row and the restarting positions alone).
Every built-in loss is a sum of per-datum terms, so summing the micro-batches' losses and accumulating
their gradients equals the whole batch (to fp32 rounding); the metrics are combined by what they are
(`:sum` added, `:mean` weighted by what it averages over).

Logprobs never materialise a [tokens, vocabulary] log-softmax: the final hidden states go through the
output projection `chunk_tokens` at a time, each chunk's target logit minus its logsumexp (recomputed
in backward under activation checkpointing, so a chunk's logits are freed once used).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")


def plan_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Datum indices grouped, in order, so each group's tokens fit `max_tokens` (a longer datum alone)."""
    groups: list[list[int]] = []
    used = 0
    for index, length in enumerate(lengths):
        if groups and used + length <= max_tokens:
            groups[-1].append(index)
            used += length
        else:
            groups.append([index])
            used = length
    return groups


@dataclass(frozen=True)
class PackedRows:
    """A micro-batch as model inputs: [B, R] ids and positions, the attention mask to use (None: flash
    varlen), and where each sequence's tokens are in the flattened [B * R] positions, in input order."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    token_index: torch.Tensor
    lengths: list[int]


def _first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if lengths[index] <= free), None)
        if row is None:
            rows.append([index])
            room.append(capacity - lengths[index])
        else:
            rows[row].append(index)
            room[row] -= lengths[index]
    return rows


def packed_rows(lengths: Sequence[int], attention: str) -> tuple[list[list[int]], int]:
    """Which sequences share each packed row, in order, and the rows' width (what `pack` lays out)."""
    if attention in FLASH_ATTENTION:  # the varlen kernel finds the boundaries from the positions
        return [list(range(len(lengths)))], sum(lengths)
    return _first_fit_decreasing(lengths, max(lengths)), max(lengths)


def packed_token_index(lengths: Sequence[int], attention: str) -> torch.Tensor:
    """Where each sequence's tokens are, back to back, in `pack`'s flattened [rows * width] positions."""
    rows, width = packed_rows(lengths, attention)
    starts = [0] * len(lengths)
    for row, members in enumerate(rows):
        offset = 0
        for index in members:
            starts[index] = row * width + offset
            offset += lengths[index]
    return torch.cat([torch.arange(start, start + length) for start, length in zip(starts, lengths, strict=True)])


def pack(sequences: Sequence[np.ndarray], attention: str, device: torch.device) -> PackedRows:
    """Sequences packed into rows as long as the longest one (first fit, longest first), positions
    restarting per sequence, no attention across sequences. Rows no longer than the longest sequence
    keep attention's cost where the padded batch had it (a 16-token sequence never attends over a
    thousand masked positions); flash attention's varlen kernel takes everything as one row."""
    lengths = [len(sequence) for sequence in sequences]
    varlen = attention in FLASH_ATTENTION  # the kernel finds the boundaries from the positions
    rows, width = packed_rows(lengths, attention)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    position_ids = torch.zeros(len(rows), width, dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    for row, members in enumerate(rows):
        offset = 0
        for index in members:
            length = lengths[index]
            input_ids[row, offset : offset + length] = torch.from_numpy(sequences[index].astype(np.int64))
            position_ids[row, offset : offset + length] = torch.arange(length)
            segment[row, offset : offset + length] = index
            offset += length
    token_index = packed_token_index(lengths, attention)
    mask = None
    if not varlen:
        # Padding gets a segment of its own per position (it attends to itself only: no empty rows of -inf).
        pad = segment < 0
        segment[pad] = -1 - torch.arange(int(pad.sum()))
        causal = torch.ones(width, width, dtype=torch.bool).tril_()
        mask = (causal & (segment[:, :, None] == segment[:, None, :]))[:, None].to(device)
    return PackedRows(input_ids.to(device), position_ids.to(device), mask, token_index.to(device), lengths)


def _chunk_logprobs(hidden_NH: torch.Tensor, targets_NK: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits_NV = head(hidden_NH).float()
    return logits_NV.gather(1, targets_NK) - torch.logsumexp(logits_NV, dim=-1, keepdim=True)


def _chunk_row_logprobs(
    hidden_NH: torch.Tensor, rows_M: torch.Tensor, targets_MK: torch.Tensor, head: torch.nn.Module
) -> torch.Tensor:
    """log p(target) for M positions reading N distinct rows (rows_M indexes hidden_NH)."""
    logits_NV = head(hidden_NH).float()
    logz_N = torch.logsumexp(logits_NV, dim=-1)
    return logits_NV[rows_M[:, None], targets_MK] - logz_N[rows_M][:, None]


def target_logprobs(
    hidden_UH: torch.Tensor,
    targets_TK: torch.Tensor,
    head: torch.nn.Module,
    chunk_tokens: int,
    row_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p(target) for every position and target ([T, K]), `chunk_tokens` rows at a time (under
    activation checkpointing, so a chunk's logits are freed once used). Position t reads row t of
    hidden_UH, or row row_T[t] when rows are shared (prefix_sharing.shared_prefix_hidden): then the head
    and its log-normaliser run once per distinct row, whatever the number of positions reading it."""
    checkpointed = torch.is_grad_enabled()
    if row_T is None:
        pieces = []
        for start in range(0, hidden_UH.shape[0], chunk_tokens):
            hidden, targets = hidden_UH[start : start + chunk_tokens], targets_TK[start : start + chunk_tokens]
            if checkpointed:
                pieces.append(checkpoint(_chunk_logprobs, hidden, targets, head, use_reentrant=False))
            else:
                pieces.append(_chunk_logprobs(hidden, targets, head))
        return torch.cat(pieces) if pieces else hidden_UH.new_zeros((0, targets_TK.shape[1]))
    order_T = torch.argsort(row_T, stable=True)  # positions grouped by the chunk of rows they read
    sorted_rows = row_T[order_T]
    starts = list(range(0, hidden_UH.shape[0], chunk_tokens))
    bounds = torch.searchsorted(sorted_rows, torch.tensor([*starts, hidden_UH.shape[0]], device=row_T.device))
    bounds = bounds.tolist()
    pieces = []
    for index, start in enumerate(starts):
        positions = order_T[bounds[index] : bounds[index + 1]]
        args = (hidden_UH[start : start + chunk_tokens], sorted_rows[bounds[index] : bounds[index + 1]] - start)
        args += (targets_TK[positions], head)
        if checkpointed:
            pieces.append(checkpoint(_chunk_row_logprobs, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_row_logprobs(*args))
    if not pieces:
        return hidden_UH.new_zeros((0, targets_TK.shape[1]))
    inverse_T = torch.empty_like(order_T)
    inverse_T[order_T] = torch.arange(len(order_T), device=order_T.device)
    return torch.cat(pieces).index_select(0, inverse_T)


def combine_metrics(
    parts: Iterable[tuple[Mapping[str, float], int, int]], per_datum: frozenset[str] = frozenset()
) -> dict[str, float]:
    """One request's metrics from its micro-batches' (metrics, tokens, datums): `:sum` metrics add up,
    `:max` / `:min` take the extreme, others are averages weighted by the tokens (or, for `per_datum`
    names, the datums) they cover."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics, tokens, datums in parts:
        for name, value in metrics.items():
            if name.endswith(":sum"):
                totals[name] = totals.get(name, 0.0) + value
                continue
            if name.endswith((":max", ":min")):
                pick = max if name.endswith(":max") else min
                totals[name] = pick(totals[name], value) if name in totals else value
                continue
            weight = float(datums if name in per_datum else tokens)
            totals[name] = totals.get(name, 0.0) + value * weight
            weights[name] = weights.get(name, 0.0) + weight
    return {name: value / weights[name] if weights.get(name) else value for name, value in totals.items()}


def peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM), GiB. Not getrusage's ru_maxrss: a process started with
    vfork + exec inherits its parent's high-water mark there, so a learner would report the launcher's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    return 0.0


def peak_memory_gib(device: torch.device) -> float:
    """A step's peak on a CUDA device (since the last reset of its peak statistics); on CPU the
    process's peak resident set so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gib()
