"""A sampling-only base model beside the trained one (a teacher): `anvil serve` starts its replica, lists it
as sampleable but not trainable, samples it by name with its own weights (logprobs against a transformers
forward pass of the teacher, and different from the trained model's), refuses to train it, and stops its
replica with everything else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.coordinator.gateway.conftest import start_anvil_serve, stop_anvil_serve
from tests.rollout.helpers import perturbed, teacher_forced_logprobs

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 is a dev dependency (pip install -e .[dev])")
from tinker import types  # noqa: E402

KEY = "tml-sampling-models-test"
PROMPT = [4, 17, 230, 96, 41, 8, 300]


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """anvil-tiny with every weight moved: a different model under the same tokenizer."""
    directory = tmp_path_factory.mktemp("teacher")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    perturbed(base, seed=11, scale=0.2).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
    return directory


def test_a_teacher_is_sampled_by_name_and_never_trained(tmp_path: Path, tiny_model_dir: Path, teacher_dir: Path):
    settings = [
        "port=0", f'api_keys=["{KEY}"]', f'state_dir="{tmp_path / "state"}"', 'services.rollout_engine.type="torch"',
        f'sampling_models=[{{model="{teacher_dir}"}}]',
    ]  # fmt: skip
    process, address = start_anvil_serve(tmp_path, settings)
    try:
        services = json.loads((tmp_path / "state" / "services.json").read_text())
        assert set(services) == {"learner", "rollout-0", "sampler-0-0"}
        client = tinker.ServiceClient(base_url=f"http://{address}", api_key=KEY)
        rest = tinker.RestClient(base_url=f"http://{address}", api_key=KEY)
        models = {m.model_name: m for m in rest.get_server_capabilities().result().supported_models}
        assert models["anvil-tiny"].trainable is not False and models[str(teacher_dir)].trainable is False

        teacher = client.create_sampling_client(base_model=str(teacher_dir)).result()
        base = client.create_sampling_client(base_model="anvil-tiny").result()
        prompt = types.ModelInput.from_ints(PROMPT)
        teacher_logprobs = torch.tensor(teacher.compute_logprobs(prompt).result()[1:])
        base_logprobs = torch.tensor(base.compute_logprobs(prompt).result()[1:])
        expected_teacher = teacher_forced_logprobs(AutoModelForCausalLM.from_pretrained(teacher_dir), PROMPT)
        expected_base = teacher_forced_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model_dir), PROMPT)
        torch.testing.assert_close(teacher_logprobs, expected_teacher, atol=1e-4, rtol=0)
        torch.testing.assert_close(base_logprobs, expected_base, atol=1e-4, rtol=0)
        assert (teacher_logprobs - base_logprobs).abs().max() > 0.05, "the teacher serves its own weights"
        assert len(teacher.sample(prompt, 2, types.SamplingParams(max_tokens=3)).result().sequences) == 2

        with pytest.raises(Exception, match="sampling-only model on this server"):
            client.create_lora_training_client(base_model=str(teacher_dir), rank=0).result()
        client.close("success").result()
    finally:
        stop_anvil_serve(process, tmp_path, services)
