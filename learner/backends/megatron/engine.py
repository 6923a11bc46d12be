"""One rank's part of a Megatron training session: its model shard, AdamW over it, and the maths.

Every rank runs the same method with the same arguments (the lockstep module sees to that); methods
return what rank 0 needs and something harmless elsewhere. The semantics are the torch backend's:

* forward: right-padded batch, causal mask, per-token target logprobs from vocab-parallel logits, the
  learner.losses function on them, backward into accumulating .grad. With DP > 1 each replica takes a
  contiguous slice of the datums (the built-in losses are per-token sums, so gradients add up); rank 0
  gathers every datum's logprobs and recomputes the metrics on the whole batch.
* optim_step: gradients summed over DP and scaled by grad_scale, global norm over TP (replicated norms
  counted once), torch's clip_grads_with_norm_, then torch.optim.AdamW on the local shard - AdamW is
  elementwise, so the sharded update is the unsharded one.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from learner.backends.base import AdamParams, ForwardResult
from learner.backends.megatron import convert
from learner.backends.megatron.logprobs import vocab_parallel_target_logprobs
from learner.backends.megatron.model import build_model
from learner.backends.megatron.parallel import ParallelLayout
from learner.batch import TrainingBatch
from learner.config import MegatronBackendConfig
from learner.losses import LossSpec


class MegatronEngine:
    def __init__(self, model_path: Path, config: MegatronBackendConfig, layout: ParallelLayout) -> None:
        self.model_path = model_path
        self.config = config
        self.layout = layout
        self.model, self.shape, self.hf_config = build_model(model_path, config, layout)
        self.optimizer = self.new_optimizer()
        self.step = 0
        bf16 = config.dtype == "bfloat16" or (config.dtype == "auto" and layout.device.type == "cuda")
        self.compute_dtype = torch.bfloat16 if bf16 else torch.float32

    def new_optimizer(self) -> torch.optim.AdamW:
        """AdamW with Tinker's defaults and its state created now, so every checkpoint has the same layout."""
        defaults = AdamParams()
        optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=defaults.learning_rate,
            betas=(defaults.beta1, defaults.beta2),
            eps=defaults.eps,
            weight_decay=defaults.weight_decay,
        )
        for parameter in self.model.parameters():  # exactly torch's lazy initial state
            optimizer.state[parameter] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(parameter, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(parameter, memory_format=torch.preserve_format),
            }
        return optimizer

    def num_parameters(self) -> int:
        """Unpadded, unsharded count (what the HF model has)."""
        return sum(t.numel() for _, t in self.hf_shapes_and_dummies())

    def hf_shapes(self) -> dict[str, list[int]]:
        return {name: list(t.shape) for name, t in self.hf_shapes_and_dummies()}

    def hf_shapes_and_dummies(self):
        for name, parameter in self.model.named_parameters():
            full_shape = list(parameter.shape)
            dim = convert.partition_dim(name)
            if dim is not None:
                full_shape[dim] *= self.layout.tp
            yield from convert.megatron_to_hf(name, torch.empty(full_shape, device="meta"), self.shape)

    # --- compute ------------------------------------------------------------------------------------

    def _autocast(self):
        if self.compute_dtype == torch.bfloat16 and self.layout.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _my_rows(self, count: int) -> range:
        bounds = np.linspace(0, count, self.layout.dp + 1).round().astype(int)
        return range(bounds[self.layout.dp_rank], bounds[self.layout.dp_rank + 1])

    def _logprobs(self, data) -> list[torch.Tensor]:
        device = self.layout.device
        lengths = [len(d.model_input) for d in data]
        widths = [d.targets_per_position for d in data]
        batch, length, k = len(data), max(lengths), max(widths)
        input_ids_BL = torch.zeros(batch, length, dtype=torch.long)
        targets_BLK = torch.zeros(batch, length, k, dtype=torch.long)
        for row, datum in enumerate(data):
            input_ids_BL[row, : lengths[row]] = torch.from_numpy(datum.model_input)
            targets_BLK[row, : lengths[row], : widths[row]] = torch.from_numpy(datum.target_tokens).view(
                lengths[row], widths[row]
            )
        position_ids_BL = torch.arange(length).unsqueeze(0).expand(batch, -1)
        causal_mask = torch.ones(length, length, dtype=torch.bool).triu(1).view(1, 1, length, length)  # True = hidden
        with self._autocast():
            logits_BLv = self.model(input_ids_BL.to(device), position_ids_BL.to(device), causal_mask.to(device))
        logprobs_BLK = vocab_parallel_target_logprobs(
            logits_BLv, targets_BLK.to(device), self.shape.vocab_size, self.layout.tp_rank, self.layout.tp_group
        )
        return [logprobs_BLK[row, : lengths[row], : widths[row]].reshape(-1) for row in range(batch)]

    def forward(
        self, batch: TrainingBatch, loss: LossSpec, loss_config: Mapping[str, float], backward: bool
    ) -> ForwardResult | None:
        rows = self._my_rows(len(batch.data))
        mine = [batch.data[i] for i in rows]
        local: list[np.ndarray] = []
        metrics: dict[str, float] = {}
        if mine:
            with torch.enable_grad() if backward else torch.no_grad():
                per_datum = self._logprobs(mine)
                inputs_T = {
                    name: torch.from_numpy(np.concatenate([d.loss_inputs[name] for d in mine])).to(self.layout.device)
                    for name in batch.input_names
                }
                loss_value, metrics = loss.fn(torch.cat(per_datum), inputs_T, loss_config)
                if backward:
                    loss_value.backward()
            local = [lp.detach().float().cpu().numpy() for lp in per_datum]
        if self.layout.dp == 1:
            return ForwardResult(local, metrics) if self.layout.rank == 0 else None
        gathered: list = [None] * self.layout.dp
        dist.all_gather_object(gathered, local, group=self.layout.dp_group)
        if self.layout.rank != 0:
            return None
        logprobs = [lp for part in gathered for lp in part]
        inputs_T = {
            name: torch.from_numpy(np.concatenate([d.loss_inputs[name] for d in batch.data]))
            for name in batch.input_names
        }
        _, metrics = loss.fn(torch.from_numpy(np.concatenate(logprobs)), inputs_T, loss_config)
        return ForwardResult(logprobs, metrics)

    def optim_step(self, params: AdamParams) -> dict[str, float]:
        parameters = list(self.model.parameters())
        if self.layout.dp > 1:
            has_grad = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32)
            dist.all_reduce(has_grad, op=dist.ReduceOp.MAX, group=self.layout.dp_group)
            for parameter, flag in zip(parameters, has_grad.tolist(), strict=True):
                if flag:
                    if parameter.grad is None:
                        parameter.grad = torch.zeros_like(parameter)
                    dist.all_reduce(parameter.grad, group=self.layout.dp_group)
        named = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        if params.grad_scale != 1.0:  # before clipping, as the torch backend
            for _, parameter in named:
                parameter.grad.mul_(params.grad_scale)
        sum_squares = torch.zeros((), dtype=torch.float32, device=self.layout.device)
        for name, parameter in named:
            if convert.partition_dim(name) is not None or self.layout.tp_rank == 0:  # replicated: count once
                sum_squares += parameter.grad.float().square().sum()
        if self.layout.tp > 1:
            dist.all_reduce(sum_squares, group=self.layout.tp_group)
        grad_norm = sum_squares.sqrt()
        with_grads = [p for _, p in named]
        if params.grad_clip_norm > 0 and with_grads:
            torch.nn.utils.clip_grads_with_norm_(with_grads, params.grad_clip_norm, grad_norm)
        for group in self.optimizer.param_groups:
            group.update(
                lr=params.learning_rate,
                betas=(params.beta1, params.beta2),
                eps=params.eps,
                weight_decay=params.weight_decay,
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"grad_norm:mean": float(grad_norm), "learning_rate:mean": params.learning_rate}

    # --- weights --------------------------------------------------------------------------------------

    def gather_hf_weights(self) -> dict[str, torch.Tensor] | None:
        """Every weight by HF name on rank 0 (CPU, float32); TP shards all-gathered, DP replica 0's."""
        out: dict[str, torch.Tensor] = {}
        for name, parameter in self.model.named_parameters():
            tensor = parameter.detach()
            if convert.partition_dim(name) is not None and self.layout.tp > 1:
                parts = [torch.empty_like(tensor) for _ in range(self.layout.tp)]
                dist.all_gather(parts, tensor.contiguous(), group=self.layout.tp_group)
                tensor = convert.unshard(name, parts)
            if self.layout.rank == 0:
                for hf_name, hf_tensor in convert.megatron_to_hf(name, tensor, self.shape):
                    out[hf_name] = hf_tensor.to("cpu", torch.float32).clone()  # own storage: no views
        return out if self.layout.rank == 0 else None
