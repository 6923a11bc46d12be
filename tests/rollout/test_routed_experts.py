"""The rollout returns the experts each position was routed to (routing replay), on a real server: the torch
engine serving the Qwen3-MoE built-in records them for the prompt and every generated token but the last,
equal to the top-k of the router logits Hugging Face computes for the whole sequence; an engine or a model
that cannot record them refuses with FAILED_PRECONDITION and goes on serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from coordinator.models import resolve_model
from protos.anvil.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from tests.rollout.test_architectures_publish import serve

PROMPT = [4, 295, 289, 226, 22, 23, 16, 28, 36, 2, 5]


@pytest.fixture(scope="module")
def moe_rollout(anvil_home):
    yield from serve("torch", "anvil-tiny-moe")


def request(record: bool = True) -> rollout_pb2.SampleRequest:
    return rollout_pb2.SampleRequest(
        prompt_tokens=PROMPT, num_samples=3, return_routed_experts=record,
        sampling_params=common_pb2.SamplingParams(max_tokens=9, temperature=1.0, seed=11),
    )  # fmt: skip


async def sample(address: str, message: rollout_pb2.SampleRequest) -> rollout_pb2.SampleResponse:
    async with open_channel(address) as channel:
        return await rollout_pb2_grpc.RolloutServiceStub(channel).Sample(message)


async def test_routes_of_every_position_equal_the_routers_top_k(moe_rollout):
    reply = await sample(moe_rollout, request())
    model = AutoModelForCausalLM.from_pretrained(resolve_model("anvil-tiny-moe"), dtype=torch.float32).eval()
    layers, top_k = model.config.num_hidden_layers, model.config.num_experts_per_tok
    assert (reply.routed_moe_layers, reply.routed_top_k) == (layers, top_k)
    for sequence in reply.sequences:
        read = PROMPT + list(sequence.tokens)[:-1]  # the positions the model read: a datum's model_input
        routes = np.asarray(sequence.routed_experts).reshape(len(read), layers, top_k)
        with torch.no_grad():
            router_logits = model(input_ids=torch.tensor([read]), output_router_logits=True).router_logits
        for layer, logits in enumerate(router_logits):
            expected = torch.topk(logits, top_k, dim=-1).indices.sort(dim=-1).values.numpy()
            np.testing.assert_array_equal(np.sort(routes[:, layer], axis=-1), expected, err_msg=f"layer {layer}")


async def test_routes_only_when_asked(moe_rollout):
    reply = await sample(moe_rollout, request(record=False))
    assert all(not sequence.routed_experts for sequence in reply.sequences)
    assert (reply.routed_moe_layers, reply.routed_top_k) == (0, 0)


async def test_a_dense_model_or_an_engine_without_routes_refuses(served, engine):
    """anvil-tiny is dense; vLLM's CPU build cannot record routes at all. Either way the server goes on."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await sample(served.address, request())
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    says = "cannot record routed experts" if engine == "vllm" else "needs a Mixture-of-Experts model"
    assert says in refused.value.details()
    assert len((await sample(served.address, request(record=False))).sequences) == 3
