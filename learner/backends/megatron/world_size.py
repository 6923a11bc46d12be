"""`python -m learner.backends.megatron.world_size [--config F] [--set k=v ...]`: ranks per node to launch.

The launch scripts ask this so that TP/PP/DP come from the learner config alone: tp * pp * dp when dp
is set, else every visible GPU (a multiple of tp * pp), else tp * pp on a CPU machine. Divided by
$NNODES (default 1) for multi-node launches. Prints one integer; exit 2 naming the problem otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys


def ranks_per_node(tp: int, pp: int, dp: int | None, gpus: int, nodes: int) -> int:
    model_parallel = tp * pp
    if dp is not None:
        world = model_parallel * dp
    elif gpus:
        world = (gpus * nodes // model_parallel) * model_parallel
    else:
        world = model_parallel
    if world == 0 or world % nodes:
        raise ValueError(f"tp={tp} x pp={pp} x dp={dp} = {world} ranks cannot be spread evenly over {nodes} node(s)")
    if gpus and world // nodes > gpus:
        raise ValueError(f"{world // nodes} ranks per node but only {gpus} GPUs per node")
    return world // nodes


def main(argv: list[str] | None = None) -> int:
    from learner.config import LearnerConfig, MegatronBackendConfig
    from servicekit.config import add_config_arguments, load_config

    parser = argparse.ArgumentParser(prog="world_size")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = load_config(LearnerConfig, args.config, ['backend.type="megatron"', *args.overrides])
        backend = config.backend
        assert isinstance(backend, MegatronBackendConfig)
        import torch

        gpus = torch.cuda.device_count() if backend.device != "cpu" else 0
        print(ranks_per_node(backend.tp, backend.pp, backend.dp, gpus, int(os.environ.get("NNODES", "1"))))
    except Exception as exc:
        print(f"world_size: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
