"""LoRA sessions (opt-in, torch backend): a PEFT adapter on the frozen base. Checked against independent
computations: a fresh session equals the base model; one AdamW step equals PEFT + torch.autograd +
torch.optim.AdamW from the same adapter; SaveWeights writes the adapter alone, which PEFT loads to the
learner's logprobs; state round trips; a torch-engine replica serves the published adapter merged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from learner.server import start_learner
from protos.anvil.v1 import common_pb2, learner_pb2, learner_pb2_grpc, rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from rollout.config import RolloutConfig, TorchEngineConfig
from rollout.server import start_rollout
from tests.learner.client import LearnerTestClient, random_rows

RANK = 4
ADAM = {"learning_rate": 5e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.01}


@pytest.fixture
async def lora_learner(learner_config):
    running, servicer = await start_learner(learner_config.model_copy(update={"allow_lora": True}))
    yield servicer, running.address
    await running.stop(0)


async def lora_client(channel, servicer, **options) -> LearnerTestClient:
    stub = learner_pb2_grpc.LearnerServiceStub(channel)
    request = learner_pb2.CreateSessionRequest(
        base_model="anvil-tiny", lora_rank=RANK, seed=3, lora=learner_pb2.LoraOptions(**options)
    )
    created = await stub.CreateSession(request)
    assert created.info.lora_rank == RANK
    return LearnerTestClient(stub, servicer, created.session_id)


def logprobs_of(model: torch.nn.Module, rows: list[dict]) -> list[np.ndarray]:
    out = []
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.as_tensor(row["model_input"])[None]).logits[0].float()
            lp = torch.log_softmax(logits, -1).gather(1, torch.as_tensor(row["target_tokens"])[:, None])[:, 0]
            out.append(lp.numpy())
    return out


async def test_lora_needs_the_opt_in_and_a_sane_rank(learner):
    _, address = learner
    async with open_channel(address) as channel:
        stub = learner_pb2_grpc.LearnerServiceStub(channel)
        with pytest.raises(Exception, match="allow_lora = true") as refused:
            await stub.CreateSession(learner_pb2.CreateSessionRequest(base_model="anvil-tiny", lora_rank=8))
        assert refused.value.code().name == "FAILED_PRECONDITION"
        with pytest.raises(Exception, match="negative") as negative:
            await stub.CreateSession(learner_pb2.CreateSessionRequest(base_model="anvil-tiny", lora_rank=-1))
        assert negative.value.code().name == "INVALID_ARGUMENT"


async def test_a_lora_step_equals_peft_with_autograd_and_adamw(lora_learner, tiny_model_dir, tmp_path):
    servicer, address = lora_learner
    async with open_channel(address) as channel:
        client = await lora_client(channel, servicer)
        vocab = client.backend.description.vocab_size
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        rows = random_rows(vocab, seed=5)

        # A new adapter (B = 0) computes the base model exactly; only the adapter is trainable.
        outputs, _ = await client.forward(rows)
        for got, want in zip(outputs, logprobs_of(base, rows), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        trainable = {n for n, p in client.model.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        assert any("lm_head.lora_A" in n for n in trainable), "train_unembed: the output layer is adapted"
        assert client.backend.description.num_parameters == sum(
            p.numel() for p in client.model.parameters() if p.requires_grad
        )

        # The reference: the initial adapter in PEFT, the same loss by autograd, torch's AdamW.
        initial = tmp_path / "initial"
        initial.mkdir()
        client.backend.save_weights(initial)
        reference = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), initial, is_trainable=True
        ).eval()
        params = [p for p in reference.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=ADAM["learning_rate"], betas=(ADAM["beta1"], ADAM["beta2"]), eps=ADAM["eps"],
            weight_decay=ADAM["weight_decay"],
        )  # fmt: skip
        loss = 0.0
        for row in rows:
            logits = reference(input_ids=torch.as_tensor(row["model_input"])[None]).logits[0].float()
            lp = torch.log_softmax(logits, -1).gather(1, torch.as_tensor(row["target_tokens"])[:, None])[:, 0]
            loss = loss - (torch.as_tensor(row["weights"]) * lp).sum()
        loss.backward()
        optimizer.step()

        await client.forward_backward(rows)
        await client.optim_step(**ADAM)
        saved = await client.save_weights("after-1")
        files = sorted(p.name for p in Path(saved.path).iterdir())
        assert "adapter_config.json" in files and "model.safetensors" not in files, files
        adapter = load_file(f"{saved.path}/adapter_model.safetensors")
        assert all(".lora_A." in n or ".lora_B." in n for n in adapter), "the adapter alone, not the base"
        want = {n.replace(".default", ""): p.detach() for n, p in reference.named_parameters() if p.requires_grad}
        assert set(adapter) == set(want)
        # Adam's first step moves every element by about lr (5e-2) whatever its gradient, so an element whose
        # gradient is near eps (1e-8) carries fp32 summation-order noise: 5e-5 is 1e-3 of one step.
        for name, tensor in adapter.items():
            torch.testing.assert_close(tensor, want[name], rtol=1e-4, atol=5e-5)

        # PEFT loads the saved adapter onto the untouched base to the learner's own logprobs.
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), saved.path).eval()
        outputs, _ = await client.forward(rows)
        for got, expected in zip(outputs, logprobs_of(loaded, rows), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        base_weights = dict(base.named_parameters())
        for name, p in client.model.get_base_model().named_parameters():
            if not p.requires_grad:
                key = name.replace(".base_layer", "")
                assert torch.equal(p, base_weights[key]), f"the frozen base changed: {name}"


async def test_lora_state_round_trips_and_refuses_a_full_session(lora_learner):
    servicer, address = lora_learner
    async with open_channel(address) as channel:
        client = await lora_client(channel, servicer, skip_unembed=True, alpha=16)
        vocab = client.backend.description.vocab_size
        assert not any("lm_head.lora" in n for n, _ in client.model.named_parameters())
        for step in range(2):
            await client.forward_backward(random_rows(vocab, seed=step))
            await client.optim_step(**ADAM)
        saved = await client.save_state("two")
        rows = random_rows(vocab, seed=9)
        expected, _ = await client.forward(rows)

        other = await lora_client(channel, servicer, skip_unembed=True, alpha=16)
        await other.load_state(saved.path)
        got, _ = await other.forward(rows)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
        full = await LearnerTestClient.create(channel, servicer)
        with pytest.raises(Exception, match="LoRA") as refused:
            await full.load_state(saved.path)
        assert refused.value.code().name == "FAILED_PRECONDITION"


async def test_a_published_adapter_is_served_merged_by_a_torch_replica(lora_learner, tiny_model_dir):
    servicer, address = lora_learner
    replica, _ = await start_rollout(
        RolloutConfig(model=tiny_model_dir, model_name="anvil-tiny", engine=TorchEngineConfig(device="cpu"))
    )
    try:
        async with open_channel(address) as channel, open_channel(replica.address) as rollout_channel:
            client = await lora_client(channel, servicer)
            vocab = client.backend.description.vocab_size
            for step in range(2):
                await client.forward_backward(random_rows(vocab, seed=step))
                await client.optim_step(**ADAM)
            published = await client.stub.PublishWeights(
                learner_pb2.PublishWeightsRequest(
                    session_id=client.session_id,
                    seq_id=client.take_seq_id(),
                    targets=[common_pb2.WeightTarget(address=replica.address)],
                    transport="stream",  # asked for; a LoRA session sends its adapter directory anyway
                )
            )
            assert published.version == 2 and all(t.ok for t in published.targets)
            assert published.model_bytes < 0.2 * sum(p.numel() * 4 for p in client.model.parameters())
            tokens = [int(t) for t in np.random.default_rng(0).integers(0, vocab, 12)]
            served = await rollout_pb2_grpc.RolloutServiceStub(rollout_channel).ComputeLogprobs(
                rollout_pb2.ComputeLogprobsRequest(tokens=tokens)
            )
            assert served.weight_version == 2
            learner_lp, _ = await client.forward(
                [{"model_input": tokens[:-1], "target_tokens": tokens[1:], "weights": np.zeros(11, np.float32)}]
            )
            np.testing.assert_allclose(served.logprobs, learner_lp[0], rtol=1e-4, atol=1e-4)
    finally:
        await replica.stop(0)
