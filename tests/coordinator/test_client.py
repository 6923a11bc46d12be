"""The Tinker-style Python client against real servers: sync and `_async` forms, checkpoints, sampling,
the two-pass custom loss (DPO) against autograd, and the full-parameter-only rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from coordinator import client as tinker
from coordinator.client import types
from protos.errors import InvalidArgument

PROMPT = [4, 295, 289, 226, 22, 23, 16, 28, 36, 2, 5]


@pytest.fixture
def service(servers):
    client = tinker.ServiceClient(
        learner_address=servers["learner_address"],
        rollout_addresses=[servers["rollout_address"]],
        api_key="client-test-key",
    )
    yield client
    client.close()


def supervised_datum(tokens: list[int], weight: float = 1.0) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [weight] * (len(tokens) - 1)},
    )


def test_sync_training_round_trip(service, tmp_path):
    training = service.create_training_client("anvil-tiny")
    data = [supervised_datum([*PROMPT, 30, 31, 2]), supervised_datum([5, 6, 7, 8])]
    output = training.forward_backward(data, "cross_entropy").result()
    assert output.loss_fn_output_type == "ArrayRecord"
    assert [o["logprobs"].to_numpy().shape for o in output.loss_fn_outputs] == [(13,), (3,)]
    expected_loss = -sum(float(o["logprobs"].to_numpy().sum()) for o in output.loss_fn_outputs)
    assert output.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-5)
    stepped = training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert "grad_norm:mean" in stepped.metrics

    saved = training.save_state("sync").result()
    after_save = training.forward(data, "cross_entropy").result()
    training.forward_backward(data, "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    training.load_state_with_optimizer(saved.path).result()
    restored = training.forward(data, "cross_entropy").result()
    for a, b in zip(after_save.loss_fn_outputs, restored.loss_fn_outputs, strict=True):
        np.testing.assert_array_equal(a["logprobs"].to_numpy(), b["logprobs"].to_numpy())

    sampler_weights = training.save_weights_for_sampler("for-hf").result()
    assert (Path(sampler_weights.path) / "model.safetensors").is_file()
    info = training.get_info()
    assert info.model_data.model_name == "anvil-tiny" and info.is_lora is False
    assert training.get_tokenizer().eos_token == "<|end|>"


def test_calls_issued_back_to_back_run_in_call_order(service):
    """forward_backward then optim_step then forward, without waiting in between."""
    training = service.create_training_client("anvil-tiny")
    data = [supervised_datum([*PROMPT, 30, 31, 2])]
    before = training.forward(data, "cross_entropy")
    backward = training.forward_backward(data, "cross_entropy")
    step = training.optim_step(types.AdamParams(learning_rate=5e-2))
    after = training.forward(data, "cross_entropy")
    assert step.result().metrics["grad_norm:mean"] > 0
    gain = (
        after.result().loss_fn_outputs[0]["logprobs"].to_numpy().sum()
        - before.result().loss_fn_outputs[0]["logprobs"].to_numpy().sum()
    )
    assert backward.result().metrics["loss:sum"] > 0
    assert gain > 0, "the step, run between the two forwards, raised the likelihood"


async def test_async_forms_return_awaitable_futures(service):
    training = await service.create_training_client_async("anvil-tiny")
    data = [supervised_datum([*PROMPT, 30, 31, 2])]
    future = await training.forward_backward_async(data, "cross_entropy")
    output = await future
    assert "loss:sum" in output.metrics
    stepped = await (await training.optim_step_async(types.AdamParams(learning_rate=1e-3)))
    assert stepped.metrics["grad_norm:mean"] > 0
    sampling = await training.save_weights_and_get_sampling_client_async()
    response = await (
        await sampling.sample_async(types.ModelInput.from_ints(PROMPT), 2, types.SamplingParams(max_tokens=4, seed=1))
    )
    assert len(response.sequences) == 2 and response.weight_version >= 1
    logprobs = await (await sampling.compute_logprobs_async(types.ModelInput.from_ints(PROMPT)))
    assert logprobs[0] is None and len(logprobs) == len(PROMPT)


def test_sampling_client_after_publish_matches_the_learner(service):
    training = service.create_training_client("anvil-tiny")
    training.forward_backward([supervised_datum([*PROMPT, 30, 31, 2])], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    sampling = training.save_weights_and_get_sampling_client()
    response = sampling.sample(
        types.ModelInput.from_ints(PROMPT), 3, types.SamplingParams(max_tokens=5, seed=3, stop=[])
    ).result()
    assert all(len(s.tokens) == 5 and s.stop_reason == "length" for s in response.sequences)
    sequence = response.sequences[0]
    tokens = PROMPT + sequence.tokens
    learner_view = training.forward([supervised_datum(tokens)], "cross_entropy").result()
    learner_lp = learner_view.loss_fn_outputs[0]["logprobs"].to_numpy()[-5:]
    np.testing.assert_allclose(np.array(sequence.logprobs), learner_lp, atol=1e-4)


def test_lora_is_refused_with_the_fix(service):
    with pytest.raises(InvalidArgument, match=r"full parameters only.*lora_rank=0"):
        service.create_lora_training_client("anvil-tiny", rank=32)
    with pytest.raises(InvalidArgument, match="lora_rank=0"):
        service.create_training_client("anvil-tiny", lora_rank=8)


def test_server_errors_arrive_as_domain_errors(service):
    training = service.create_training_client("anvil-tiny")
    with pytest.raises(InvalidArgument, match="unknown loss_fn 'nope'"):
        training.forward_backward([supervised_datum([1, 2, 3])], "nope").result()


def test_forward_backward_custom_dpo_matches_autograd(service, servers, tiny_model_dir):
    training = service.create_training_client("anvil-tiny")
    chosen, rejected = [*PROMPT, 30, 31, 2], [*PROMPT, 40, 41, 2]
    data = [supervised_datum(chosen), supervised_datum(rejected)]
    reference = {"chosen": -20.0, "rejected": -19.0}
    beta = 0.5

    def dpo(data, logprobs):
        chosen_lp, rejected_lp = logprobs[0][-3:].sum(), logprobs[1][-3:].sum()
        margin = beta * ((chosen_lp - reference["chosen"]) - (rejected_lp - reference["rejected"]))
        loss = -torch.nn.functional.logsigmoid(margin)
        return loss, {"margin:mean": float(margin.detach())}

    output = training.forward_backward_custom(data, dpo).result()
    assert "surrogate_loss:sum" in output.metrics and "margin:mean" in output.metrics

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def lp(tokens):
        ids = torch.tensor([tokens])
        logprobs = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0], -1)
        return logprobs.gather(1, ids[0, 1:, None])[:, 0]

    loss, _ = dpo(None, [lp(chosen), lp(rejected)])
    loss.backward()
    assert output.metrics["loss:sum"] == pytest.approx(loss.item(), rel=1e-5)
    backend = servers["learner"].sessions.get(training.session.session_id).backend
    server_grads = dict(backend.model.named_parameters())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(server_grads[name].grad, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_calls_made_right_after_forward_backward_custom_run_after_both_passes(service, servers):
    """Both passes take their seq_ids when the call is made: an optim_step issued without waiting must
    step on the custom loss's gradients (it used to run between the two passes, on none)."""
    training = service.create_training_client("anvil-tiny")
    data = [supervised_datum([*PROMPT, 30, 31, 2])]
    custom = training.forward_backward_custom(data, lambda data, logprobs: (-logprobs[0].sum(), {}))
    stepped = training.optim_step(types.AdamParams(learning_rate=1e-3))
    custom.result(timeout=60)
    assert stepped.result(timeout=60).metrics["grad_norm:mean"] > 0
    backend = servers["learner"].sessions.get(training.session.session_id).backend
    assert backend.step == 1 and all(p.grad is None for p in backend.model.parameters())

    def broken(data, logprobs):
        raise ValueError("a bug in the user's loss")

    with pytest.raises(ValueError, match="a bug in the user's loss"):
        training.forward_backward_custom(data, broken).result(timeout=60)
    # The reserved second seq_id was spent, so the next request does not wait on a gap.
    training.forward(data, "cross_entropy").result(timeout=20)
    assert all(p.grad is None for p in backend.model.parameters()), "a failed custom call adds no gradient"
