"""LoRA through the Tinker gateway, opted in (`lora_max_rank`), on `anvil serve` with a real vLLM replica:
the unmodified SDK trains a rank-8 adapter, its sampler weights reach vLLM as the adapter alone, and vLLM's
logprobs equal the training client's and PEFT's (the adapter loaded onto the base with transformers); a
full-parameter client's snapshot on the same replica serves without the adapter; weights_info, training
runs and create-from-state know the adapter; ranks over the limit are refused."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import grpc
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from protos.anvil.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from tests.coordinator.gateway.conftest import start_anvil_serve, stop_anvil_serve
from tests.coordinator.gateway.test_tinker_sdk import datum
from tests.rollout.helpers import teacher_forced_logprobs

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 is a dev dependency (pip install -e .[dev])")
from tinker import types  # noqa: E402

KEY = "tml-lora-serve-test"
SERVICE_KEY = "lora-serve-service-key"
PROMPT = [4, 17, 230, 96, 41, 8, 300, 22, 61]
ADAM = types.AdamParams(learning_rate=2e-2)


def training_logprobs(training, tokens: list[int]) -> torch.Tensor:
    out = training.forward([datum(tokens, weights=[0.0] * (len(tokens) - 1))], "cross_entropy").result()
    return torch.tensor(out.loss_fn_outputs[0]["logprobs"].tolist())


def adapter_of_rank(rank: int, model_dir: Path, directory: Path, targets: list[str]) -> Path:
    """A PEFT adapter made here with peft itself (B random, so it is not a no-op)."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=rank, target_modules=targets))
    model.save_pretrained(directory)
    return directory


async def check_replica(address: str, adapter_dir: Path, tmp_path: Path, model_dir: Path) -> dict:
    async with open_channel(address, api_key=SERVICE_KEY) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        info = await stub.GetInfo(rollout_pb2.RolloutServiceGetInfoRequest())
        refused = []
        too_big = adapter_of_rank(16, model_dir, tmp_path / "rank16", ["q_proj", "v_proj"])
        mismatched = tmp_path / "mismatched"
        shutil.copytree(adapter_dir, mismatched)
        tensors = load_file(mismatched / "adapter_model.safetensors")
        name = next(n for n in tensors if ".lora_A." in n)
        tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
        save_file(tensors, mismatched / "adapter_model.safetensors")
        for bad in (too_big, mismatched):
            try:
                await stub.LoadWeights(rollout_pb2.LoadWeightsRequest(path=str(bad), version=info.weight_version + 50))
            except grpc.aio.AioRpcError as error:
                refused.append(error.code().name)
        sampled = await stub.Sample(
            rollout_pb2.SampleRequest(
                prompt_tokens=PROMPT[:4], num_samples=2, sampling_params=common_pb2.SamplingParams(max_tokens=5)
            )
        )
        scored = await stub.ComputeLogprobs(rollout_pb2.ComputeLogprobsRequest(tokens=PROMPT))
        versions = [v for sequence in sampled.sequences for v in sequence.token_weight_versions]
        return {"refused": refused, "version": info.weight_version, "token_versions": versions,
                "logprobs": list(scored.logprobs)}  # fmt: skip


def test_a_lora_adapter_trains_and_vllm_serves_it(tmp_path: Path, tiny_model_dir: Path):
    settings = [
        "port=0", f'api_keys=["{KEY}"]', f'state_dir="{tmp_path / "state"}"', 'services.rollout_engine.type="vllm"',
        "lora_max_rank=8", f'services.api_key="{SERVICE_KEY}"',
    ]  # fmt: skip
    process, address = start_anvil_serve(tmp_path, settings)
    services = json.loads((tmp_path / "state" / "services.json").read_text())
    try:
        client = tinker.ServiceClient(base_url=f"http://{address}", api_key=KEY)
        rest = tinker.RestClient(base_url=f"http://{address}", api_key=KEY)
        with pytest.raises(Exception, match=r"outside 1\.\.8"):
            client.create_lora_training_client(base_model="anvil-tiny", rank=16).result()

        training = client.create_lora_training_client(base_model="anvil-tiny", rank=8).result()
        info = training.get_info()
        assert info.is_lora is True and info.lora_rank == 8
        for _ in range(3):  # teach it PROMPT: the adapter moves the model away from the base
            training.forward_backward([datum(PROMPT, weights=[1.0] * (len(PROMPT) - 1))], "cross_entropy").result()
            training.optim_step(ADAM).result()
        trained = training_logprobs(training, PROMPT)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        base_logprobs = teacher_forced_logprobs(base, PROMPT)
        assert (trained - base_logprobs).mean() > 0.05, "three SFT steps raise the prompt's logprobs"

        sampler = training.save_weights_and_get_sampling_client().result()
        served = torch.tensor(sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT)).result()[1:])
        torch.testing.assert_close(served, trained, atol=1e-4, rtol=0)
        assert len(sampler.sample(types.ModelInput.from_ints(PROMPT[:4]), 2, types.SamplingParams(max_tokens=4))
                   .result().sequences) == 2  # fmt: skip

        # What reached vLLM is the adapter alone; PEFT loads it onto the base to the same logprobs.
        named = training.save_weights_for_sampler("adapter").result().path
        weights_info = rest.get_weights_info_by_tinker_path(named).result()
        assert weights_info.is_lora is True and weights_info.lora_rank == 8
        [adapter_dir] = [p.parent for p in (tmp_path / "state").rglob("adapter/adapter_config.json")]
        adapter_bytes = sum(p.stat().st_size for p in adapter_dir.glob("*.safetensors"))
        assert adapter_bytes < 0.2 * sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
        torch.testing.assert_close(served, teacher_forced_logprobs(peft, PROMPT), atol=1e-4, rtol=0)

        # The replica itself: tokens carry the adapter's version; an adapter over its rank, or one that
        # does not fit the model, is refused with the fix and the served adapter stays.
        replica = asyncio.run(check_replica(services["rollout-0"]["address"], adapter_dir, tmp_path, tiny_model_dir))
        assert replica["refused"] == ["FAILED_PRECONDITION", "INVALID_ARGUMENT"], replica
        assert set(replica["token_versions"]) == {replica["version"]} and replica["version"] > 0
        torch.testing.assert_close(torch.tensor(replica["logprobs"]), trained, atol=1e-4, rtol=0)

        # A full-parameter client beside it: its snapshot on the same replica serves without the adapter.
        full = client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
        assert full.get_info().is_lora is False
        full_sampler = full.save_weights_and_get_sampling_client().result()
        plain = torch.tensor(full_sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT)).result()[1:])
        torch.testing.assert_close(plain, base_logprobs, atol=1e-4, rtol=0)
        again = torch.tensor(sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT)).result()[1:])
        torch.testing.assert_close(again, trained, atol=1e-4, rtol=0)

        # A LoRA state: weights_info and the training run say so; a client made from it is LoRA too.
        state = training.save_state("lora-state").result().path
        described = rest.get_weights_info_by_tinker_path(state).result()
        assert (described.is_lora, described.lora_rank, described.train_unembed) == (True, 8, True)
        run = rest.get_training_run(info.model_id).result()
        assert run.is_lora is True and run.lora_rank == 8
        resumed = client.create_training_client_from_state(state).result()
        assert resumed.get_info().is_lora is True
        torch.testing.assert_close(training_logprobs(resumed, PROMPT), trained, atol=1e-6, rtol=0)
        client.close("success").result()
    finally:
        stop_anvil_serve(process, tmp_path, services)
