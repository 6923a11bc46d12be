"""One rank's part of a Megatron training session: its model shard, AdamW over it, and the maths.

Every rank runs the same method with the same arguments (the lockstep module sees to that); methods
return what rank 0 needs and something harmless elsewhere. The semantics are the torch backend's:

* forward: split by `max_tokens_per_micro_batch` into micro-batches (in datum order); each is a
  right-padded batch, causal mask, per-token target logprobs from vocab-parallel logits, the
  learner.losses function on them, backward into accumulating .grad, all through megatron-core's
  forward-backward schedule (1F1B with PP > 1: schedule.py); the loss lives on the last stage. With
  DP > 1 each replica takes a contiguous slice of the datums (the built-in losses are per-token sums,
  so gradients add up). Rank 0
  collects every datum's logprobs and, unless it computed them all itself, recomputes the metrics.
* optim_step: gradients summed over DP (and over the tied embedding's two pipeline copies), scaled by
  grad_scale, global norm over TP x PP (replicated norms and the tied copy counted once), torch's
  clip_grads_with_norm_, then torch.optim.AdamW on the local shard - AdamW is elementwise, so the
  sharded update is the unsharded one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from learner.backends.base import ForwardResult, clip_and_step
from learner.backends.megatron import convert, convert_moe, routing, schedule
from learner.backends.megatron.logprobs import vocab_parallel_target_logprobs
from learner.backends.megatron.model import build_model, hf_tensor_shapes
from learner.backends.megatron.moe_metrics import ExpertLoad, load_metrics
from learner.backends.megatron.parallel import ParallelLayout
from learner.backends.packing import peak_memory_gib, plan_micro_batches
from learner.backends.routing_replay import check_routes_fit
from learner.batch import TrainingBatch
from learner.config import MegatronBackendConfig
from learner.losses import LossSpec, loss_inputs_T
from protos.adam import AdamParams
from protos.errors import FailedPrecondition


class MegatronEngine:
    def __init__(self, model_path: Path, config: MegatronBackendConfig, layout: ParallelLayout) -> None:
        self.model_path = model_path
        self.config = config
        self.layout = layout
        self.model, self.shape, self.hf_config = build_model(model_path, config, layout)
        self.base_shapes = hf_tensor_shapes(model_path)
        self.stage_names = convert.stage_names(self.shape, layout.pp_rank, layout.pp, layout.ep_rank, layout.ep)
        self.optimizer = self.new_optimizer()
        self.expert_load = ExpertLoad(self.model, layout.pp_rank * (self.shape.num_layers // layout.pp))
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

    def hf_shapes(self) -> dict[str, list[int]]:
        """Every HF parameter's shape (the whole model's, whatever this rank holds)."""
        shapes = {}
        for name in convert.megatron_names(self.shape):
            full = convert.hf_to_megatron(name, self.shape, lambda hf_name: _meta(self.base_shapes[hf_name]))
            shapes.update({n: list(t.shape) for n, t in convert.megatron_to_hf(name, full, self.shape)})
        return shapes

    def num_parameters(self) -> int:
        """Unpadded, unsharded count (what the HF model has)."""
        return sum(int(np.prod(shape)) for shape in self.hf_shapes().values())

    # --- compute ------------------------------------------------------------------------------------

    def _autocast(self):
        if self.compute_dtype == torch.bfloat16 and self.layout.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _my_rows(self, count: int) -> range:
        bounds = np.linspace(0, count, self.layout.dp + 1).round().astype(int)
        return range(bounds[self.layout.dp_rank], bounds[self.layout.dp_rank + 1])

    def forward(
        self, batch: TrainingBatch, loss: LossSpec, loss_config: Mapping[str, float], backward: bool
    ) -> ForwardResult | None:
        start = time.perf_counter()
        mine = [batch.data[i] for i in self._my_rows(len(batch.data))]
        layout = self.layout
        if layout.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(layout.device)

        def loss_on_logits(micro_batch: schedule.MicroBatch, logits: torch.Tensor):
            if micro_batch.data[0] is schedule.IDLE:  # expert parallelism's filler: no loss, no gradient
                return logits.sum() * 0.0, {"logprobs": [], "metrics": {}}
            logprobs_BLK = vocab_parallel_target_logprobs(
                logits, micro_batch.targets_BLK, self.shape.vocab_size, layout.tp_rank, layout.tp_group
            )
            per_datum = schedule.per_datum(logprobs_BLK, micro_batch)
            inputs_T = loss_inputs_T(micro_batch.data, batch.input_names, layout.device)
            loss_value, metrics = loss.fn(torch.cat(per_datum), inputs_T, loss_config)
            return loss_value, {"logprobs": schedule.to_numpy(per_datum), "metrics": metrics}

        # Token-budget micro-batches, in datum order; every stage of this DP replica plans the same ones.
        # The losses are sums over datums, so gradients accumulated over the pieces are the whole batch's.
        pieces = plan_micro_batches([len(d.model_input) for d in mine], self.config.max_tokens_per_micro_batch)
        multiple = layout.tp if self.model.config.sequence_parallel else 1  # the sequence splits over TP ranks
        micro_batches = [
            schedule.make_micro_batch([mine[i] for i in piece], layout.device, multiple) for piece in pieces
        ]
        replay = self._route_replayer(batch)  # checks the routes before any collective
        micro_batches += self._idle_micro_batches(len(micro_batches))
        try:
            kept = schedule.run(
                self.model, micro_batches, loss_on_logits, last_stage=layout.last_stage, backward=backward,
                autocast=self._autocast, before_forward=replay,
            )[: len(pieces)]  # fmt: skip
        finally:
            routing.stop(routing.replays(self.model))
        local: list[np.ndarray] = [lp for piece in kept for lp in piece["logprobs"]]
        metrics: dict[str, float] = kept[-1]["metrics"] if kept else {}
        if len(pieces) > 1 and local:  # the metrics of the whole of this replica's datums, not the last piece's
            inputs_T = loss_inputs_T(mine, batch.input_names)
            with torch.no_grad():
                _, metrics = loss.fn(torch.from_numpy(np.concatenate(local)), inputs_T, loss_config)
        # Rank 0 needs every DP replica's logprobs, held by their last stage's TP rank 0, and every
        # rank's peak memory.
        mine_out = {"logprobs": local if layout.holds_results else None, "peak": peak_memory_gib(layout.device),
                    "micro_batches": len(pieces) if layout.holds_results else 0,
                    "expert_load": self.expert_load.take()}  # fmt: skip
        gathered: list = [mine_out]
        if layout.world_size > 1:
            gathered = [None] * layout.world_size
            dist.all_gather_object(gathered, mine_out, group=layout.control_group)
        if layout.rank != 0:
            return None
        logprobs = [lp for part in gathered if part["logprobs"] is not None for lp in part["logprobs"]]
        if layout.dp > 1 or layout.pp > 1:
            inputs_T = loss_inputs_T(batch.data, batch.input_names)
            _, metrics = loss.fn(torch.from_numpy(np.concatenate(logprobs)), inputs_T, loss_config)
        metrics = dict(metrics)
        metrics["learner/micro_batches:sum"] = float(sum(part["micro_batches"] for part in gathered))
        tokens = sum(len(d.model_input) for d in batch.data)
        metrics["learner/tokens_per_s:mean"] = tokens / max(time.perf_counter() - start, 1e-9)
        metrics["learner/peak_memory_gib:max"] = max(part["peak"] for part in gathered)
        metrics.update(load_metrics(part["expert_load"] for part in gathered))
        return ForwardResult(logprobs, metrics)

    def _route_replayer(self, batch: TrainingBatch):
        """With routes in the batch (checked against the model first, on every rank alike), what sets each
        micro-batch's routes as its forward starts (routing.py); None without."""
        if not batch.data or batch.data[0].routed_experts is None:
            return None
        if not self.shape.num_experts:
            raise FailedPrecondition(
                "the batch carries routed_experts for routing replay, but this model has no Mixture-of-Experts "
                "router; turn routing replay off"
            )
        top_k, layout = int(self.hf_config.num_experts_per_tok), self.layout
        lengths = [len(d.model_input) for d in batch.data]
        check_routes_fit([d.routed_experts for d in batch.data], lengths, self.shape.num_moe_layers, top_k,
                         self.shape.num_experts)  # fmt: skip
        routing.check_replayable(layout.pp, self.config.activation_checkpointing)
        layers = self.shape.moe_layers_of_stage(layout.pp_rank, layout.pp)  # numbered among the MoE layers
        handles, split = routing.replays(self.model), self.model.config.sequence_parallel
        return lambda micro_batch: routing.start(
            handles, routing.micro_batch_routes(micro_batch, layers, top_k, layout.tp_rank, layout.tp, split)
        )

    def _idle_micro_batches(self, planned: int) -> list[schedule.MicroBatch]:
        """With experts split over EP ranks, every MoE layer's all-to-all needs every rank of the EP group, so
        all of them run as many micro-batches as the busiest: the others add one-token fillers (schedule.IDLE)."""
        if self.layout.ep == 1 or not self.shape.num_experts:  # a dense model on an EP learner has no all-to-all
            return []
        most = torch.tensor([planned], dtype=torch.int64, device=self.layout.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.layout.ep_group)
        multiple = self.layout.tp if self.model.config.sequence_parallel else 1
        fillers = int(most) - planned
        return [schedule.make_micro_batch([schedule.IDLE], self.layout.device, multiple) for _ in range(fillers)]

    def optim_step(self, params: AdamParams) -> dict[str, float]:
        layout = self.layout
        named_parameters = list(self.model.named_parameters())
        if layout.dp > 1:
            has_grad = torch.tensor(  # on the compute device: NCCL groups reduce CUDA tensors only
                [p.grad is not None for _, p in named_parameters], dtype=torch.float32, device=layout.device
            )
            dist.all_reduce(has_grad, op=dist.ReduceOp.MAX, group=layout.dp_group)
            for (name, parameter), flag in zip(named_parameters, has_grad.tolist(), strict=True):
                if flag:
                    if parameter.grad is None:
                        parameter.grad = torch.zeros_like(parameter)
                    # An expert is held by the ranks with the same expert share (its expert-DP group), not by all.
                    expert = convert_moe.is_expert(name)
                    group = layout.expert_dp_group if expert else layout.dp_group
                    if dist.get_world_size(group=group) > 1:
                        dist.all_reduce(parameter.grad, group=group)
        self._sync_tied_embedding_grads()
        self._sum_partial_replicated_grads()
        named = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        if params.grad_scale != 1.0:  # before clipping, as the torch backend
            for _, parameter in named:
                parameter.grad.mul_(params.grad_scale)
        sum_squares = torch.zeros((), dtype=torch.float32, device=self.layout.device)
        expert_squares = torch.zeros((), dtype=torch.float32, device=self.layout.device)
        first_expert_copy = dist.get_rank(group=self.layout.expert_dp_group) == 0
        for name, parameter in named:
            if convert_moe.is_expert(name):  # whole experts: counted by one holder of each, summed over all
                if first_expert_copy:
                    expert_squares += parameter.grad.float().square().sum()
                continue
            replicated = convert.partition_dim(name) is None
            tied_copy = self._is_tied_copy(name)
            if not tied_copy and (not replicated or self.layout.tp_rank == 0):  # count each element once
                sum_squares += parameter.grad.float().square().sum()
        if self.shape.num_experts and self.layout.world_size > 1:
            dist.all_reduce(expert_squares)  # each holder's share, over every stage and EP rank
        if self.layout.tp * self.layout.pp > 1:
            dist.all_reduce(sum_squares, group=self.layout.model_parallel_group)
        grad_norm = (sum_squares + expert_squares).sqrt()
        metrics = clip_and_step(self.optimizer, [p for _, p in named], grad_norm, params)
        self.step += 1
        return metrics

    def _is_tied_copy(self, name: str) -> bool:
        """The last pipeline stage's copy of a tied embedding (counted and exported once, on stage 0)."""
        return name == "output_layer.weight" and self.stage_names[name] == "embedding.word_embeddings.weight"

    def _sync_tied_embedding_grads(self) -> None:
        """Tied embeddings over pipeline stages: the first stage's embedding and the last stage's output
        copy are one HF tensor, so both take the sum of their gradients (as Megatron's finalize does)."""
        layout = self.layout
        if not (self.shape.tied and layout.pp > 1 and layout.embedding_group is not None):
            return
        model = self.model
        weight = model.embedding.word_embeddings.weight if layout.first_stage else model.output_layer.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=layout.embedding_group)

    def _sum_partial_replicated_grads(self) -> None:
        """Weights replicated on every TP rank that each rank applies to its own part of the work, so each
        holds part of the gradient, summed over the TP group (as Megatron's finalize does): Qwen3's q/k norms
        (one [head_dim] weight for the rank's own heads), and under sequence parallelism (MoE at tp > 1) the
        norms and the router (each rank's own slice of the sequence), which Megatron tags `sequence_parallel`."""
        if self.layout.tp == 1:
            return
        for name, parameter in self.model.named_parameters():
            qk_norm = name.endswith(("q_layernorm.weight", "k_layernorm.weight"))
            if (qk_norm or getattr(parameter, "sequence_parallel", False)) and parameter.grad is not None:
                dist.all_reduce(parameter.grad, group=self.layout.tp_group)

    # --- weights --------------------------------------------------------------------------------------

    def gather_hf_weights(self) -> dict[str, torch.Tensor] | None:
        """Every weight by HF name on rank 0 (CPU, float32): TP shards all-gathered, pipeline stages sent
        to rank 0, DP replica 0's copy."""
        layout = self.layout
        out: dict[str, torch.Tensor] = {}
        keep_dense = layout.tp_rank == 0 and layout.dp_rank == 0
        keep_experts = dist.get_rank(group=layout.expert_dp_group) == 0  # experts are whole (no TP split)
        for name, parameter in convert_moe.model_weights(self.model).items():  # with the expert biases
            keep = keep_experts if convert_moe.is_expert(name) else keep_dense
            tensor = parameter.detach()
            if convert.partition_dim(name) is not None and layout.tp > 1:
                parts = [torch.empty_like(tensor) for _ in range(layout.tp)]
                dist.all_gather(parts, tensor.contiguous(), group=layout.tp_group)
                tensor = convert.unshard(name, parts)
            whole_name = self.stage_names[name]
            if keep and not self._is_tied_copy(name):
                for hf_name, hf_tensor in convert.megatron_to_hf(whole_name, tensor, self.shape):
                    out[hf_name] = hf_tensor.to("cpu", torch.float32).clone()  # own storage: no views
        if layout.pp > 1 or (self.shape.num_experts and layout.world_size > 1):  # other stages', EP ranks' parts
            stages: list | None = [None] * layout.world_size if layout.rank == 0 else None
            dist.gather_object(out or None, stages, dst=0, group=layout.control_group)
            if layout.rank == 0:
                out = {k: v for stage in stages if stage for k, v in stage.items()}
        return out if layout.rank == 0 else None


def _meta(shape) -> torch.Tensor:
    return torch.empty(shape, device="meta")
