"""The RL loop's sampling seeds: vLLM seeds a request's n samples with seed, seed + 1, ..., so group seeds
must be far apart, or samples of different prompts and steps share their random draws (issue 24: with
consecutive seeds a 16 x 32 batch drew from ~47 noise vectors, the same ones every step)."""

from __future__ import annotations

from coordinator.loop import group_seed

GROUPS, GROUP_SIZE, STEPS = 16, 32, 300


def test_no_two_samples_of_a_run_share_a_seed():
    seeds = [
        group_seed(0, batch, batch * GROUPS + group) + sample
        for batch in range(STEPS)
        for group in range(GROUPS)
        for sample in range(GROUP_SIZE)
    ]
    assert len(set(seeds)) == len(seeds) == STEPS * GROUPS * GROUP_SIZE
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_seeds_are_reproducible_and_depend_on_run_batch_and_problem():
    assert group_seed(7, 3, 50) == group_seed(7, 3, 50), "a retried group samples the same completions"
    assert len({group_seed(7, 3, 50), group_seed(8, 3, 50), group_seed(7, 4, 50), group_seed(7, 3, 51)}) == 4
