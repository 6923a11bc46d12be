"""Process groups for the Megatron learner: torch.distributed from torchrun's environment, then Megatron's
parallel_state (TP x DP x PP, experts split over EP within DP), plus a gloo *control* group that carries
commands from rank 0.

The control group has a very long timeout because worker ranks idle in it between requests; compute
collectives (the default group and Megatron's groups) use `collective_timeout_s`, so a rank that never
arrives turns into an error on the others rather than a hang. Without torchrun's variables the process
becomes a world of one on a free loopback port (handy for `python -m learner` on a laptop).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from learner.config import MegatronBackendConfig

CONTROL_TIMEOUT = timedelta(days=30)


@dataclass(frozen=True)
class ParallelLayout:
    rank: int
    world_size: int
    tp: int
    dp: int
    pp: int
    tp_rank: int
    dp_rank: int
    pp_rank: int
    device: torch.device
    control_group: object
    tp_group: object
    dp_group: object
    model_parallel_group: object
    """tp x pp: where a global gradient norm is summed."""
    embedding_group: object | None
    """First and last pipeline stage (tied embeddings with pp > 1), None on other ranks."""
    ep: int
    ep_rank: int
    ep_group: object
    """The DP replicas that split the experts between them (Mixture-of-Experts; size 1 otherwise)."""
    expert_dp_group: object
    """The ranks holding the same experts: where expert gradients are summed (dp / ep of them)."""
    prev_rank: int
    next_rank: int

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def holds_results(self) -> bool:
        """The rank whose values stand for its DP replica: last stage, TP rank 0."""
        return self.last_stage and self.tp_rank == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _device(config: MegatronBackendConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


_layout: ParallelLayout | None = None


def initialize(config: MegatronBackendConfig, seed: int = 1234) -> ParallelLayout:
    """Create (once per process) the process groups for `config`; every rank must call this."""
    global _layout
    if _layout is not None:
        return _layout
    if "RANK" not in os.environ:  # not under torchrun: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
    device = _device(config)
    if device.type == "cpu":
        from learner.backends.megatron import cuda_shim

        cuda_shim.install_if_needed()
    timeout = timedelta(seconds=config.collective_timeout_s)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    world = dist.get_world_size()
    dp = config.dp or world // (config.tp * config.pp)
    if config.tp * config.pp * dp != world:
        raise ValueError(
            f"backend.tp={config.tp} x pp={config.pp} x dp={dp} != {world} ranks; launch tp*pp*dp processes"
        )
    if (config.tp * dp) % config.ep:
        raise ValueError(
            f"backend.ep={config.ep} must divide tp x dp = {config.tp * dp}: experts are split between those ranks"
        )
    control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as megatron_random

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tp,
        pipeline_model_parallel_size=config.pp,
        expert_model_parallel_size=config.ep,
        expert_tensor_parallel_size=1,  # experts whole on each rank that holds them (not split over TP)
        distributed_timeout_minutes=max(1, round(config.collective_timeout_s / 60)),
    )
    megatron_random.model_parallel_cuda_manual_seed(seed)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    in_embedding_group = config.pp > 1 and pp_rank in (0, config.pp - 1)
    _layout = ParallelLayout(
        rank=dist.get_rank(),
        world_size=world,
        tp=config.tp,
        dp=dp,
        pp=config.pp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        pp_rank=pp_rank,
        device=device,
        control_group=control_group,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        model_parallel_group=parallel_state.get_model_parallel_group(),
        embedding_group=parallel_state.get_embedding_group() if in_embedding_group else None,
        ep=config.ep,
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        ep_group=parallel_state.get_expert_model_parallel_group(),
        expert_dp_group=parallel_state.get_expert_data_parallel_group(),
        prev_rank=parallel_state.get_pipeline_model_parallel_prev_rank(),
        next_rank=parallel_state.get_pipeline_model_parallel_next_rank(),
    )
    return _layout


def shutdown() -> None:
    global _layout
    if _layout is None:
        return
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    _layout = None
