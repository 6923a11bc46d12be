"""The unmodified `tinker` 0.38 SDK trains and samples on Anvil through the gateway, sync and async,
with every number checked against an independent computation (a transformers forward / autograd)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 is a dev dependency (pip install -e .[dev])")
from tinker import types  # noqa: E402

LOGPROB_TOL = {"rtol": 1e-4, "atol": 1e-4}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-5}  # as tests/learner/test_training_math.py


def datum(tokens: list[int], **inputs) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:], **inputs}
    )


def hf_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i+1] | tokens[:i+1]) by a plain transformers forward."""
    logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0]
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


def random_sequences(count: int, seed: int, vocab: int = 500) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=int(rng.integers(4, 9))).tolist() for _ in range(count)]


def learner_gradients(stack, model_id: str) -> dict[str, torch.Tensor]:
    with stack.as_tenant():
        learner_session = stack.gateway.service.sessions.model(model_id).learner.session_id
    backend = stack.learner.sessions.get(learner_session).backend
    return {name: p.grad.clone() for name, p in backend.model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_full_flow_sync(stack, service_client, base_model, tiny_model_dir):
    capabilities = service_client.get_server_capabilities()
    assert [m.model_name for m in capabilities.supported_models] == ["anvil-tiny"]

    training = service_client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
    info = training.get_info()
    assert info.model_id.startswith(service_client.holder.get_session_id() + ":train:") and info.is_lora is False
    assert training.get_tokenizer().encode("Copy 7")  # offline, from the hub cache the gateway filled at start

    # forward (no gradient) agrees with transformers on the base weights, per datum and per token
    sequences = random_sequences(4, seed=0)
    zero = [datum(s, weights=[0.0] * (len(s) - 1)) for s in sequences]
    out = training.forward(zero, "cross_entropy").result()
    for seq, output in zip(sequences, out.loss_fn_outputs, strict=True):
        torch.testing.assert_close(output["logprobs"].to_torch(), hf_logprobs(base_model, seq).detach(), **LOGPROB_TOL)

    # cross_entropy, importance_sampling and ppo: loss:sum equals the loss computed here
    weighted = [datum(s, weights=[1.0] * (len(s) - 1)) for s in sequences]
    ce = training.forward_backward(weighted, "cross_entropy").result()
    expected_ce = -sum(hf_logprobs(base_model, s).sum() for s in sequences).item()
    assert ce.metrics["loss:sum"] == pytest.approx(expected_ce, rel=1e-4, abs=1e-4)
    rl = []
    for s in sequences:
        lp = hf_logprobs(base_model, s).detach()
        rl.append((s, (lp + 0.3).tolist(), np.linspace(-1, 1, len(s) - 1).tolist(), lp))
    rl_data = [datum(s, logprobs=q, advantages=a) for s, q, a, _ in rl]
    expected_is = -sum((torch.exp(lp - torch.tensor(q)) * torch.tensor(a)).sum() for _, q, a, lp in rl).item()
    result = training.forward_backward(rl_data, "importance_sampling").result()
    assert result.metrics["loss:sum"] == pytest.approx(expected_is, rel=1e-4, abs=1e-4)
    ppo = training.forward_backward(rl_data, "ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}).result()
    expected_ppo = -sum(
        torch.minimum(torch.exp(lp - torch.tensor(q)) * torch.tensor(a),
                      torch.exp(lp - torch.tensor(q)).clamp(0.9, 1.1) * torch.tensor(a)).sum()
        for _, q, a, lp in rl
    ).item()  # fmt: skip
    assert ppo.metrics["loss:sum"] == pytest.approx(expected_ppo, rel=1e-4, abs=1e-4)

    step = training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert step.metrics["grad_norm:mean"] > 0

    # sampling from the new weights: the sampler's logprobs are the learner's on the same tokens
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = [4, 40, 405, 226, 28]
    response = sampler.sample(
        types.ModelInput.from_ints(prompt), 3, types.SamplingParams(max_tokens=6, seed=1), include_prompt_logprobs=True
    ).result()
    assert len(response.sequences) == 3 and len({s.sequence_id for s in response.sequences}) == 3
    assert np.isnan(response.prompt_logprobs[0]) if response.prompt_logprobs[0] is not None else True
    for sequence in response.sequences:
        tokens = prompt + list(sequence.tokens)
        learner = training.forward([datum(tokens, weights=[0.0] * (len(tokens) - 1))], "cross_entropy").result()
        learner_lp = learner.loss_fn_outputs[0]["logprobs"].to_numpy()[len(prompt) - 1 :]
        np.testing.assert_allclose(sequence.logprobs, learner_lp, rtol=1e-4, atol=1e-4)
    trained = training.forward([datum(prompt, weights=[0.0] * (len(prompt) - 1))], "cross_entropy").result()
    np.testing.assert_allclose(
        response.prompt_logprobs[1:], trained.loss_fn_outputs[0]["logprobs"].to_numpy(), rtol=1e-4, atol=1e-4
    )

    # a base-model sampling client still samples from the base weights (the router swaps snapshots)
    base_sampler = service_client.create_sampling_client(base_model="anvil-tiny").result()
    base_lp = base_sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
    np.testing.assert_allclose(base_lp[1:], hf_logprobs(base_model, prompt).detach().numpy(), rtol=1e-4, atol=1e-4)

    # save_state -> a second training client from it continues identically (weights and Adam state)
    saved = training.save_state("after-one-step").result()
    assert saved.path == f"tinker://{info.model_id}/weights/after-one-step"
    at_save = training.forward(zero, "cross_entropy").result().loss_fn_outputs
    resumed = service_client.create_training_client_from_state_with_optimizer(saved.path).result()
    number = int(info.model_id.rsplit(":", 1)[1])
    assert resumed.get_info().model_id == info.model_id.replace(f":train:{number}", f":train:{number + 1}")
    weights_only = service_client.create_training_client_from_state(saved.path).result()
    for x, y in zip(at_save, weights_only.forward(zero, "cross_entropy").result().loss_fn_outputs, strict=True):
        np.testing.assert_array_equal(x["logprobs"].to_numpy(), y["logprobs"].to_numpy())
    for client in (training, resumed):
        client.forward_backward(weighted, "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    a = training.forward(zero, "cross_entropy").result().loss_fn_outputs
    b = resumed.forward(zero, "cross_entropy").result().loss_fn_outputs
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["logprobs"].to_numpy(), y["logprobs"].to_numpy())

    run = service_client.create_rest_client().get_training_run(info.model_id).result()
    assert run.last_checkpoint.tinker_path == saved.path


def test_forward_backward_custom_dpo_matches_autograd(stack, service_client, base_model):
    """A DPO loss run client-side by forward_backward_custom: the learner's gradient equals autograd's."""
    training = service_client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
    chosen, rejected = random_sequences(2, seed=5)
    reference = [hf_logprobs(base_model, s).sum().item() + 0.1 for s in (chosen, rejected)]
    beta = 0.5

    def dpo(data, logprobs_list):
        margin = (logprobs_list[0].sum() - reference[0]) - (logprobs_list[1].sum() - reference[1])
        loss = -torch.nn.functional.logsigmoid(beta * margin)
        return loss, {"margin:mean": margin.item()}

    data = [datum(chosen, weights=[1.0] * (len(chosen) - 1)), datum(rejected, weights=[1.0] * (len(rejected) - 1))]
    result = training.forward_backward_custom(data, dpo).result()

    model = AutoModelForCausalLM.from_pretrained(stack.gateway.service.model_dir, dtype=torch.float32)
    lp_c, lp_r = hf_logprobs(model, chosen).sum(), hf_logprobs(model, rejected).sum()
    expected = -torch.nn.functional.logsigmoid(beta * ((lp_c - reference[0]) - (lp_r - reference[1])))
    expected.backward()
    assert result.metrics["loss:sum"] == pytest.approx(expected.item(), rel=1e-5)
    server = learner_gradients(stack, training.get_info().model_id)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(server[name], parameter.grad, **GRAD_TOL)


def test_multi_chunk_forward_backward_equals_one_autograd_pass(stack, service_client, base_model):
    """7 datums with fwdbwd_max_chunk_len = 3: three requests (chunk 1 sent last), one gradient."""
    training = service_client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
    sequences = random_sequences(7, seed=11)
    data = [datum(s, weights=np.linspace(-1, 2, len(s) - 1).tolist()) for s in sequences]
    result = training.forward_backward(data, "cross_entropy").result()
    assert len(result.loss_fn_outputs) == 7

    model = AutoModelForCausalLM.from_pretrained(stack.gateway.service.model_dir, dtype=torch.float32)
    total = sum(-(torch.tensor(d.loss_fn_inputs["weights"].tolist()) * hf_logprobs(model, s)).sum()
                for d, s in zip(data, sequences, strict=True))  # fmt: skip
    total.backward()
    assert result.metrics["loss:sum"] == pytest.approx(total.item(), rel=1e-4, abs=1e-4)
    server = learner_gradients(stack, training.get_info().model_id)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(server[name], parameter.grad, **GRAD_TOL)


async def test_async_forms(stack, service_client, base_model):
    training = await service_client.create_lora_training_client_async(base_model="anvil-tiny", rank=0)
    sequences = random_sequences(2, seed=21)
    data = [datum(s, weights=[1.0] * (len(s) - 1)) for s in sequences]
    out = await training.forward_backward(data, "cross_entropy")
    expected = -sum(hf_logprobs(base_model, s).sum() for s in sequences).item()
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    await training.optim_step(types.AdamParams(learning_rate=1e-3))
    sampler = await training.save_weights_and_get_sampling_client_async()
    response = await sampler.sample_async(
        types.ModelInput.from_ints([4, 40, 405]), 2, types.SamplingParams(max_tokens=4)
    )
    assert len(response.sequences) == 2 and all(len(s.logprobs) == len(s.tokens) for s in response.sequences)
    state = await training.save_state("async-state")
    before = (await training.forward(data, "cross_entropy")).loss_fn_outputs
    await training.forward_backward(data, "cross_entropy")
    await training.optim_step(types.AdamParams(learning_rate=1e-2))
    await training.load_state(state.path)  # the legacy in-sequence load: back to the saved weights
    after = (await training.forward(data, "cross_entropy")).loss_fn_outputs
    for x, y in zip(before, after, strict=True):
        np.testing.assert_array_equal(x["logprobs"].to_numpy(), y["logprobs"].to_numpy())
    named = await training.save_weights_for_sampler("async-named")
    from_path = await service_client.create_sampling_client_async(model_path=named.path)
    assert from_path.get_base_model() == "anvil-tiny"
