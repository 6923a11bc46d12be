"""`python -m learner.backends.megatron.torchrun --nproc N [--set k=v ...]`: the Megatron learner's torchrun
group on this machine, as `anvil run` / `anvil serve` start it (scripts/megatron_learner.sh is the same
for people and SLURM).

Why not torchrun directly: a started service must die with the process that started it
(servicekit.process.die_with_parent). Its ranks are torchrun's children, not the launcher's, so this
process ties itself to the launcher, names itself as the ranks' parent, and runs torchrun's agent in
process: if the launcher dies, this process gets SIGTERM, and if this process dies, so do the ranks.
Rank 0 prints `LISTENING host:port` like any learner. `--script PATH` runs a script's ranks the same way
instead of the learner (scripts/megatron_gpu_check.py relaunches itself through it for TP/PP > 1).
"""

from __future__ import annotations

import argparse
import os
import sys

from servicekit.process import PARENT_PID_ENV, die_with_parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learner.backends.megatron.torchrun")
    parser.add_argument("--nproc", type=int, required=True, help="ranks to start (tp * pp * dp)")
    parser.add_argument("--script", help="run this script's ranks (given the other arguments) instead of the learner")
    args, learner_args = parser.parse_known_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc is {args.nproc}; start at least one rank")
    die_with_parent()
    if PARENT_PID_ENV in os.environ:
        os.environ[PARENT_PID_ENV] = str(os.getpid())  # the ranks' parent is this process (torchrun's agent)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from torch.distributed.run import main as torchrun

    launch = ["--standalone", f"--nproc_per_node={args.nproc}"]
    if args.script:
        torchrun([*launch, args.script, *learner_args])
    else:
        torchrun([*launch, "-m", "learner", "--set", 'backend.type="megatron"', *learner_args])
    return 0


if __name__ == "__main__":
    sys.exit(main())
