"""Typed configs from TOML with dotted overrides (servicekit.config), as every entry point loads them."""

from __future__ import annotations

import pytest

from coordinator.config import RunConfig
from protos.errors import InvalidArgument
from servicekit.config import load_config


def test_overrides_are_parsed_as_toml_and_nested(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "anvil-tiny"\n[loop]\nsteps = 7\ngroup_size = 4\n')
    config = load_config(RunConfig, path, ["loop.steps=9", 'task.name="addition"', "loop.adam.learning_rate=2e-3"])
    assert (config.loop.steps, config.loop.group_size) == (9, 4)
    assert config.task.name == "addition" and config.loop.adam.learning_rate == 2e-3


def test_overrides_on_a_saved_config_keep_its_other_fields():
    saved = RunConfig.model_validate({"loop": {"steps": 5, "group_size": 3}}).model_dump(mode="json")
    resumed = load_config(RunConfig, None, ["loop.steps=8"], base=saved)
    assert (resumed.loop.steps, resumed.loop.group_size) == (8, 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["loop.stepz=3"], "stepz"), (["loop.steps=0"], "steps"), (["nonsense"], "section.key=value")],
)
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(InvalidArgument, match=message):
        load_config(RunConfig, None, overrides)
