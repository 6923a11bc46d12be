"""Unnamed sampler snapshots in use are kept (official SDK): a DPO-style run takes a reference snapshot at
step 0 and scores with it every step, while each evaluation makes a new policy snapshot. Past 6
evaluations (more than the gateway's 4 kept) the reference still answers with its step-0 logprobs, old
policy snapshots nobody samples any more are deleted (their clients answer NOT_FOUND saying why), and no
more than 4 snapshots are on disk."""

from __future__ import annotations

import pytest

from tests.coordinator.gateway.test_tinker_sdk import datum

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 is a dev dependency (pip install -e .[dev])")
from tinker import types  # noqa: E402

EVALUATIONS = 6


def test_a_reference_snapshot_in_use_outlives_the_kept_window(service_client, stack):
    kept = stack.gateway.service.config.sampler_snapshots_kept
    assert kept < EVALUATIONS
    training = service_client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
    prompt = types.ModelInput.from_ints([4, 5, 6, 7, 8])
    reference = training.save_weights_and_get_sampling_client().result()
    reference_logprobs = reference.compute_logprobs(prompt).result()
    policies = []
    for _ in range(EVALUATIONS):
        training.forward_backward([datum([5, 6, 7, 8], weights=[1.0, 1.0, 1.0])], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        policy = training.save_weights_and_get_sampling_client().result()  # an evaluation's snapshot
        assert policy.compute_logprobs(prompt).result() != reference_logprobs, "the policy moved"
        assert reference.compute_logprobs(prompt).result() == reference_logprobs  # the DPO reference, every step
        policies.append(policy)

    with pytest.raises(tinker.NotFoundError, match="most recently used unnamed snapshots"):
        policies[0].compute_logprobs(prompt).result()
    assert policies[-1].compute_logprobs(prompt).result()
    model_id = training.model_id
    with stack.as_tenant():
        session = stack.gateway.service.sessions.get(model_id.split(":", 1)[0])
    on_disk = [p for p in session.models[model_id].unnamed_snapshots if p.exists()]
    assert len(on_disk) == kept
