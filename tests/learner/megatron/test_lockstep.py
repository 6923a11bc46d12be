"""Lockstep command execution across two real gloo ranks: every error comes back as a status, none hangs."""

from __future__ import annotations

import pytest
import torch.multiprocessing as mp

from learner.backends.megatron.parallel import free_port
from tests.learner.megatron import lockstep_workers


def test_errors_on_any_rank_come_back_as_statuses():
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(
        lockstep_workers.run_rank, args=(2, free_port(), results), nprocs=2, join=True, start_method="spawn"
    )
    outcomes = results.get()
    assert outcomes[0] == ("rank", "ok", 0)
    # The same domain error on every rank keeps its type (-> FAILED_PRECONDITION) and the ranks in step.
    assert outcomes[1][:2] == ("reject_everywhere", "FailedPrecondition")
    assert "checkpoint does not fit" in outcomes[1][2]
    assert outcomes[2] == ("rank", "ok", 0)
    # Rank 1 fails before a collective that rank 0 waits in: rank 0 times out (5 s) and reports rank 1's
    # own error, not its timeout.
    operation, kind, message = outcomes[3]
    assert (operation, kind) == ("fail_on_rank1_before_collective", "RuntimeError")
    assert "rank 1" in message and "ran out of something" in message
    # Afterwards the ranks may be out of step: refuse work with UNAVAILABLE rather than compute garbage.
    assert outcomes[4][:2] == ("rank", "Unavailable")
    assert "restart the learner" in outcomes[4][2]


pytestmark = pytest.mark.timeout(180)
