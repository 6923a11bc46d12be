"""Top-k and target prompt logprobs through the official SDK (what distillation recipes ask a teacher for),
checked against the full log-softmax of a transformers forward pass of the served model: the top k in
order with position 0 and the positions before `prompt_logprobs_last_n` unscored, and targets in the
request's dense or CSR layout with 0.0 where the request had -1. Tolerance 1e-4 on float32 logprobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.rollout.helpers import next_token_logprobs

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 is a dev dependency (pip install -e .[dev])")
from tinker import types  # noqa: E402

PROMPT = [4, 17, 230, 96, 41, 8, 300]
TOL = 1e-4


@pytest.fixture(scope="module")
def expected_LV(tiny_model_dir) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return next_token_logprobs(model, PROMPT)


@pytest.fixture(scope="module")
def sampler(service_client):
    return service_client.create_sampling_client(base_model="anvil-tiny").result()


def test_topk_prompt_logprobs_are_the_models_top_k(sampler, expected_LV):
    k = 4
    response = sampler.sample(
        types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=1), topk_prompt_logprobs=k
    ).result()
    rows = response.topk_prompt_logprobs
    assert len(rows) == len(PROMPT) and rows[0] is None
    values, tokens = torch.topk(expected_LV, k, dim=-1)
    for position, row in enumerate(rows[1:], start=1):
        assert [token for token, _ in row] == tokens[position - 1].tolist()
        torch.testing.assert_close(torch.tensor([lp for _, lp in row]), values[position - 1], atol=TOL, rtol=0)

    last_two = sampler.sample(
        types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=1), include_prompt_logprobs=True,
        topk_prompt_logprobs=k, prompt_logprobs_last_n=2,
    ).result()  # fmt: skip
    assert last_two.topk_prompt_logprobs[:-2] == [None] * (len(PROMPT) - 2)
    assert last_two.topk_prompt_logprobs[-2:] == rows[-2:]


def test_target_prompt_logprobs_dense_and_sparse(sampler, expected_LV):
    dense_ids = [[7, -1], [100, 200], [-1, -1], [511, 3]]  # rows 0..3 are prompt positions 1..4
    dense = types.TensorData(data=np.array(dense_ids, dtype=np.int64).ravel().tolist(), dtype="int64", shape=[4, 2])
    response = sampler.sample(
        types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=1), target_prompt_logprobs=dense
    ).result()
    answer = response.target_prompt_logprobs
    assert answer.shape == [4, 2] and answer.dtype == "float32"
    got = np.asarray(answer.data, dtype=np.float32).reshape(4, 2)
    for row, ids in enumerate(dense_ids):
        for column, token in enumerate(ids):
            want = 0.0 if token == -1 else float(expected_LV[row, token])
            assert abs(got[row, column] - want) <= TOL, (row, column)

    # CSR [6, 3]: row 0 asks for 2 ids, row 1 none, row 5 one (position 6, the prompt's last)
    sparse = types.TensorData(
        data=[12, 40, 250], dtype="int64", shape=[6, 3], sparse_crow_indices=[0, 2, 2, 2, 2, 2, 3],
        sparse_col_indices=[0, 2, 1],
    )  # fmt: skip
    response = sampler.sample(
        types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=1), target_prompt_logprobs=sparse
    ).result()
    answer = response.target_prompt_logprobs
    assert answer.sparse_crow_indices == [0, 2, 2, 2, 2, 2, 3] and answer.sparse_col_indices == [0, 2, 1]
    want = [expected_LV[0, 12], expected_LV[0, 40], expected_LV[5, 250]]
    torch.testing.assert_close(torch.tensor(answer.data, dtype=torch.float32), torch.stack(want), atol=TOL, rtol=0)


def test_bad_targets_are_refused_naming_the_fix(sampler):
    too_many_rows = types.TensorData(data=[5] * len(PROMPT), dtype="int64", shape=[len(PROMPT), 1])
    with pytest.raises(tinker.RequestFailedError, match="row i is scored at prompt position i"):
        sampler.sample(
            types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=1),
            target_prompt_logprobs=too_many_rows,
        ).result()  # fmt: skip
    out_of_vocab = types.TensorData(data=[100_000], dtype="int64", shape=[1, 1])
    with pytest.raises(tinker.RequestFailedError, match="token id 100000"):
        sampler.sample(
            types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=1),
            target_prompt_logprobs=out_of_vocab,
        ).result()  # fmt: skip
    assert sampler.sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=1)).result()
