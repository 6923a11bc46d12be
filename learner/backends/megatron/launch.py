"""Start the Megatron learner on every rank: rank 0 serves gRPC, the other ranks follow its commands.

`learner.server.serve` hands a megatron config here (under torchrun every rank runs `python -m learner`).
When rank 0 stops serving (SIGTERM, Ctrl-C) it tells the others to shut down, so all ranks exit cleanly;
if rank 0 dies, the others' control-group receive fails and they exit too (torchrun also stops them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from learner.config import LearnerConfig


async def serve_ranks(config: LearnerConfig, serve_rank0: Callable[[LearnerConfig], Awaitable[None]]) -> None:
    from learner.backends.megatron import parallel
    from learner.backends.megatron.backend import EngineHost, set_commander
    from learner.backends.megatron.lockstep import Commander, worker_loop

    layout = parallel.initialize(config.backend)
    host = EngineHost(config.backend, layout)
    if layout.rank != 0:
        try:
            worker_loop(layout, host)  # blocks: this rank only computes
        finally:
            parallel.shutdown()
        return
    commander = Commander(layout, host)
    set_commander(commander)
    try:
        await serve_rank0(config)
    finally:
        commander.shutdown()
        set_commander(None)
        parallel.shutdown()
