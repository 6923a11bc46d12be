"""The backend config union and the launchers' rank count (no processes, no megatron import)."""

from __future__ import annotations

import pytest

from learner.backends.megatron.world_size import ranks_per_node
from learner.config import LearnerConfig, MegatronBackendConfig, TorchBackendConfig
from protos.errors import InvalidArgument
from servicekit.config import load_config


def test_backend_table_without_type_is_still_the_torch_backend():
    assert load_config(LearnerConfig, None, ['backend.device="cpu"']).backend == TorchBackendConfig(device="cpu")


def test_megatron_backend_from_overrides():
    config = load_config(LearnerConfig, None, ['backend.type="megatron"', "backend.tp=2", "backend.dp=4"])
    assert config.backend == MegatronBackendConfig(tp=2, dp=4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["backend.pp=0"], "greater than or equal to 1"),
        (["backend.tp=3"], "vocab_multiple=128 must be a multiple of tp=3"),
        (["backend.tp=0"], "greater than or equal to 1"),
        (['backend.dtype="float16"'], "dtype"),
    ],
)
def test_bad_megatron_settings_are_refused_by_name(overrides, message):
    with pytest.raises(InvalidArgument, match=message):
        load_config(LearnerConfig, None, ['backend.type="megatron"', *overrides])


@pytest.mark.parametrize(
    ("tp", "pp", "dp", "gpus", "nodes", "expected"),
    [
        (2, 1, None, 0, 1, 2),  # CPU: tp * pp
        (2, 1, 3, 0, 1, 6),  # explicit dp
        (2, 1, None, 8, 1, 8),  # every GPU
        (4, 1, None, 8, 2, 8),  # two nodes of 8
        (2, 1, 8, 8, 2, 8),
    ],
)
def test_ranks_per_node(tp, pp, dp, gpus, nodes, expected):
    assert ranks_per_node(tp, pp, dp, gpus, nodes) == expected


@pytest.mark.parametrize(("tp", "dp", "gpus", "nodes"), [(2, 3, 0, 4), (2, 8, 4, 2)])
def test_impossible_layouts_are_refused(tp, dp, gpus, nodes):
    with pytest.raises(ValueError, match="ranks"):
        ranks_per_node(tp, 1, dp, gpus, nodes)
