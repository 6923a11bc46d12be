"""Sampling on a real rollout server, for each engine: logprobs against transformers, seeds, stops,
lengths, concurrency. Tolerance: 1e-4 absolute on float32 logprobs (measured gaps are ~1e-5)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from transformers import AutoTokenizer

from protos.anvil.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from tests.rollout.helpers import next_token_logprobs, teacher_forced_logprobs

PROMPT = [4, 295, 289, 226, 22, 23, 16, 28, 36, 2, 5]  # "<|user|>What is 12+7?<|end|><|assistant|>"
TOL = 1e-4


def sample_request(n=4, max_tokens=16, include_prompt_logprobs=False, **params) -> rollout_pb2.SampleRequest:
    params.setdefault("ignore_eos", True)
    return rollout_pb2.SampleRequest(
        prompt_tokens=PROMPT,
        num_samples=n,
        sampling_params=common_pb2.SamplingParams(max_tokens=max_tokens, **params),
        include_prompt_logprobs=include_prompt_logprobs,
    )


async def sample(served, request):
    async with open_channel(served.address) as channel:
        return await rollout_pb2_grpc.RolloutServiceStub(channel).Sample(request)


async def test_get_info_describes_the_engine(served, engine):
    async with open_channel(served.address) as channel:
        info = await rollout_pb2_grpc.RolloutServiceStub(channel).GetInfo(rollout_pb2.RolloutServiceGetInfoRequest())
    assert info.engine == engine
    assert info.vocab_size == 512 and info.max_context_length == 512
    assert info.weight_version == served.version


async def test_sampled_logprobs_match_transformers(served):
    reply = await sample(served, sample_request(n=4, temperature=1.0, seed=7, include_prompt_logprobs=True))
    assert reply.weight_version == served.version
    assert len(reply.sequences) == 4
    for sequence in reply.sequences:
        assert len(sequence.tokens) == 16 and len(sequence.logprobs) == 16
        expected = teacher_forced_logprobs(served.model, PROMPT + list(sequence.tokens))[len(PROMPT) - 1 :]
        torch.testing.assert_close(torch.tensor(list(sequence.logprobs)), expected, atol=TOL, rtol=0)
    expected_prompt = teacher_forced_logprobs(served.model, PROMPT)
    torch.testing.assert_close(torch.tensor(list(reply.prompt_logprobs)), expected_prompt, atol=TOL, rtol=0)


async def test_prompt_topk_and_target_logprobs_match_transformers(served):
    """Top-k prompt logprobs and (position, token) targets, against the full log-softmax of a transformers
    forward pass: the top k in order, and targets the prompt does not hold (distillation's case)."""
    k, positions, tokens = 5, [1, 3, 3, len(PROMPT) - 1], [7, 100, 200, 511]
    request = sample_request(n=1, max_tokens=2, include_prompt_logprobs=True)
    request.prompt_logprobs_top_k = k
    request.prompt_target_positions.extend(positions)
    request.prompt_target_tokens.extend(tokens)
    reply = await sample(served, request)
    expected_LV = next_token_logprobs(served.model, PROMPT)
    top_values, top_tokens = torch.topk(expected_LV, k, dim=-1)
    assert list(reply.prompt_topk_tokens) == top_tokens.flatten().tolist()
    torch.testing.assert_close(torch.tensor(list(reply.prompt_topk_logprobs)), top_values.flatten(), atol=TOL, rtol=0)
    expected_targets = expected_LV[torch.tensor(positions) - 1, torch.tensor(tokens)]
    torch.testing.assert_close(torch.tensor(list(reply.prompt_target_logprobs)), expected_targets, atol=TOL, rtol=0)
    assert len(reply.prompt_logprobs) == len(PROMPT) - 1


async def test_prompt_targets_out_of_the_prompt_are_refused(served):
    cases = [
        ([0], [5], "positions are 1 to"),
        ([1, 2], [5], "one position per token"),
        ([len(PROMPT)], [5], "positions are 1 to"),
        ([1], [512], "token id 512"),
    ]
    for positions, tokens, says in cases:
        request = sample_request(n=1, max_tokens=1)
        request.prompt_target_positions.extend(positions)
        request.prompt_target_tokens.extend(tokens)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await sample(served, request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in refused.value.details()


async def test_logprobs_are_raw_even_at_other_temperatures(served):
    """Sampler logprobs are log_softmax(logits) (temperature 1), what the learner computes."""
    reply = await sample(served, sample_request(n=2, temperature=0.7, seed=3))
    for sequence in reply.sequences:
        expected = teacher_forced_logprobs(served.model, PROMPT + list(sequence.tokens))[len(PROMPT) - 1 :]
        torch.testing.assert_close(torch.tensor(list(sequence.logprobs)), expected, atol=TOL, rtol=0)


async def test_compute_logprobs_match_transformers(served):
    tokens = [*PROMPT, 30, 31, 2]
    async with open_channel(served.address) as channel:
        reply = await rollout_pb2_grpc.RolloutServiceStub(channel).ComputeLogprobs(
            rollout_pb2.ComputeLogprobsRequest(tokens=tokens)
        )
    expected = teacher_forced_logprobs(served.model, tokens)
    torch.testing.assert_close(torch.tensor(list(reply.logprobs)), expected, atol=TOL, rtol=0)


async def test_greedy_follows_the_argmax(served):
    reply = await sample(served, sample_request(n=1, temperature=0.0, max_tokens=8))
    tokens = list(PROMPT)
    with torch.no_grad():
        for _ in range(8):
            tokens.append(int(served.model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    assert list(reply.sequences[0].tokens) == tokens[len(PROMPT) :]


async def test_same_seed_same_tokens(served):
    first = await sample(served, sample_request(n=3, seed=1234, top_k=50, top_p=0.9))
    again = await sample(served, sample_request(n=3, seed=1234, top_k=50, top_p=0.9))
    other = await sample(served, sample_request(n=3, seed=4321, top_k=50, top_p=0.9))
    assert [list(s.tokens) for s in first.sequences] == [list(s.tokens) for s in again.sequences]
    assert [list(s.tokens) for s in first.sequences] != [list(s.tokens) for s in other.sequences]


async def test_top_k_one_is_greedy(served):
    greedy = await sample(served, sample_request(n=1, temperature=0.0, max_tokens=6))
    top1 = await sample(served, sample_request(n=2, temperature=1.0, top_k=1, seed=5, max_tokens=6))
    for sequence in top1.sequences:
        assert list(sequence.tokens) == list(greedy.sequences[0].tokens)


async def test_max_tokens_ends_with_length(served):
    reply = await sample(served, sample_request(n=2, max_tokens=5, seed=1))
    for sequence in reply.sequences:
        assert len(sequence.tokens) == 5
        assert sequence.stop_reason == common_pb2.STOP_REASON_LENGTH


async def test_stop_token_ends_the_sequence_including_it(served):
    greedy = list((await sample(served, sample_request(n=1, temperature=0.0, max_tokens=12))).sequences[0].tokens)
    stop_token = greedy[4]
    first_hit = greedy.index(stop_token)
    reply = await sample(served, sample_request(n=1, temperature=0.0, max_tokens=12, stop_token_ids=[stop_token]))
    sequence = reply.sequences[0]
    assert list(sequence.tokens) == greedy[: first_hit + 1]
    assert sequence.stop_reason == common_pb2.STOP_REASON_STOP


async def test_stop_string_ends_the_sequence_including_it(served, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    greedy = list((await sample(served, sample_request(n=1, temperature=0.0, max_tokens=12))).sequences[0].tokens)
    stop = next(text for text in (tokenizer.decode(greedy[i : i + 1]).strip() for i in range(3, 10)) if len(text) >= 2)
    reply = await sample(served, sample_request(n=1, temperature=0.0, max_tokens=12, stop_strings=[stop]))
    tokens = list(reply.sequences[0].tokens)
    assert stop in tokenizer.decode(tokens), "the stop text is included in the output"
    assert stop not in tokenizer.decode(tokens[:-1]), "generation ends at the token completing the stop text"
    assert tokens == greedy[: len(tokens)]
    assert reply.sequences[0].stop_reason == common_pb2.STOP_REASON_STOP


async def test_many_concurrent_samples_all_complete(served):
    async with open_channel(served.address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        replies = await asyncio.wait_for(
            asyncio.gather(*(stub.Sample(sample_request(n=2, max_tokens=8, seed=i)) for i in range(64))), timeout=300
        )
    assert len(replies) == 64
    assert all(len(r.sequences) == 2 and all(len(s.tokens) == 8 for s in r.sequences) for r in replies)


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"prompt_tokens": []}, "prompt_tokens is empty"),
        ({"prompt_tokens": [1, 512]}, "token id 512"),
        ({"prompt_tokens": [1, -1]}, "token id -1"),
        ({"num_samples": 0}, "num_samples is 0"),
        ({"num_samples": -2}, "num_samples is -2"),
        ({"max_tokens": -1}, "max_tokens is -1"),
        ({"max_tokens": 600}, "max_tokens is 600"),
        ({"prompt_tokens": [1] * 512}, "leaving no room"),
        ({"top_p": 0.0}, "top_p is 0.0"),
        ({"top_p": 1.5}, "top_p is 1.5"),
        ({"top_p": -0.1}, "top_p is -0.1"),
        ({"temperature": -1.0}, "temperature is -1.0"),
        ({"top_k": -5}, "top_k is -5"),
        ({"stop_token_ids": [9999]}, "token id 9999"),
    ],
)
async def test_bad_requests_are_invalid_and_the_server_keeps_serving(served, request_fields, message):
    import grpc

    params = {k: v for k, v in request_fields.items() if k not in ("prompt_tokens", "num_samples")}
    request = rollout_pb2.SampleRequest(
        prompt_tokens=request_fields.get("prompt_tokens", PROMPT),
        num_samples=request_fields.get("num_samples", 1),
        sampling_params=common_pb2.SamplingParams(**{"max_tokens": 4, **params}),
    )
    async with open_channel(served.address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Sample(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()
        assert len((await stub.Sample(sample_request(n=1, max_tokens=2))).sequences) == 1
