"""`anvil serve` as shipped: it starts its own learner and rollout (vLLM where installed), the tinker SDK
trains and samples through it with sampler logprobs equal to the learner's, and SIGTERM stops it all."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 is a dev dependency (pip install -e .[dev])")
from tinker import types  # noqa: E402

from tests.coordinator.gateway.conftest import start_anvil_serve, stop_anvil_serve  # noqa: E402

KEY = "tml-serve-test"


@pytest.mark.integration
def test_anvil_serve_end_to_end_and_clean_stop(tmp_path: Path, anvil_home: Path):
    process, address = start_anvil_serve(
        tmp_path, ["port=0", f'api_keys=["{KEY}"]', f'state_dir="{tmp_path / "state"}"']
    )
    try:
        services = json.loads((tmp_path / "state" / "services.json").read_text())
        assert set(services) == {"learner", "rollout-0"}

        client = tinker.ServiceClient(base_url=f"http://{address}", api_key=KEY)
        training = client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
        prompt = training.get_tokenizer().encode("Copy 7", add_special_tokens=False)
        targets = {"target_tokens": [*prompt[1:], prompt[0]], "weights": [1.0] * len(prompt)}
        data = [types.Datum(model_input=types.ModelInput.from_ints(prompt), loss_fn_inputs=targets)]
        training.forward_backward(data, "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        sampler = training.save_weights_and_get_sampling_client().result()
        response = sampler.sample(
            types.ModelInput.from_ints(prompt), 2, types.SamplingParams(max_tokens=4, seed=3)
        ).result()
        for sequence in response.sequences:
            tokens = prompt + list(sequence.tokens)
            full = types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [0.0] * (len(tokens) - 1)},
            )
            learner = training.forward([full], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
            np.testing.assert_allclose(sequence.logprobs, learner[len(prompt) - 1 :], rtol=1e-3, atol=1e-3)
        client.close("success").result()
    finally:
        stop_anvil_serve(process, tmp_path, services)
