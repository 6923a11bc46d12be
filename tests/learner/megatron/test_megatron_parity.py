"""The Megatron backend (torchrun ranks on gloo, fp32) against the PyTorch backend on the same HF weights.

The reference is an in-process TorchBackend fed the very same Arrow batches; the Megatron learner is a
real gRPC server whose ranks run in lockstep. Weights are compared through SaveWeights' directory, so
every check also covers the TP gather and the Megatron -> HF conversion.

Tolerances (float32 on CPU; TP splits the matmul reductions, so sums round differently):
  logprobs   atol 1e-5, rtol 1e-5     (measured max |diff| ~5e-7)
  loss / grad-norm metrics  rel 1e-4
  parameters after 3 AdamW steps (lr 1e-3, eps 1e-8, weight decay, clipping): every element within
      1e-4 (3% of the largest possible 3-step move, 3e-3), and at most 1 in 10^4 elements beyond 1e-5.
      AdamW divides by sqrt(v) + eps, so an element whose gradient is near rounding noise moves by up to
      lr in a direction the noise picks. Measured: <= 4 such elements per tensor, max |diff| 4.1e-5
      (with Tinker's eps 1e-12 the same run reaches 1.2e-4, hence eps 1e-8, the RL loop's default).
      An expert that few tokens reach has more such elements: on the MoE, every element within 3e-4 (10 %
      of the largest move; measured 1.3e-4 with DP=2, where the replicas' gradients add in another order).
"""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from coordinator.models import resolve_model
from learner.backends.torch_backend import TorchBackend
from learner.batch import batch_from_arrow
from learner.config import TorchBackendConfig
from learner.losses import resolve_loss
from protos.adam import AdamParams
from protos.arrow_schemas import encode_batch, make_batch
from protos.channels import open_channel
from tests.learner.client import LearnerTestClient, random_rows
from tests.learner.megatron.needs import require_megatron
from tests.learner.test_training_math import reference_logprobs

LOGPROB_TOL = {"atol": 1e-5, "rtol": 1e-5}
PARAM_MAX_DIFF = 1e-4
MOE_PARAM_MAX_DIFF = 3e-4
PARAM_CLOSE = 1e-5
PARAM_OUTLIER_FRACTION = 1e-4
DEEPSEEK_TOLERANCE = {"loss_abs": 1e-4, "param_max_diff": 1e-3}
"""DeepSeek's perturbed weights give gradient norms of 200-400, clipped to 1, so an element that the batch
barely touches has a gradient near AdamW's eps, where rounding moves it by up to one step (lr 1e-3): one
embedding element of 98,304 differed by 4.8e-4 at TP2 x EP2 while every metric and gradient norm agreed to
2e-6. Its losses are sums of terms of both signs near 0 (0.23 from ~33 terms of size ~1), so their absolute
rounding is ~1e-5 per DP split. The outlier fraction stays as strict as for every other model."""
ADAM = AdamParams(learning_rate=1e-3, weight_decay=0.01, grad_clip_norm=1.0, eps=1e-8)
LAYOUTS = {
    "tp1": (1, 1), "tp2": (2, 2), "tp1-dp2": (1, 2), "pp2": (1, 2, 2), "pp2-mb16": (1, 2, 2, 16),
    "tp2-ckpt": (2, 2, 1, None, True), "ep2": (1, 2, 1, None, False, 2), "ep2-mb16": (1, 2, 1, 16, False, 2),
    "tp2-ep2": (2, 2, 1, None, False, 2),
}  # fmt: skip
"""(tp, world[, pp[, max_tokens_per_micro_batch[, activation_checkpointing[, ep]]]]): "pp2-mb16" splits every test
batch into 3-4 micro-batches (a datum longer than 16 tokens goes alone) that go through both stages on
megatron's 1F1B schedule; "tp2-ckpt" recomputes every layer's activations in backward; "ep2" splits an MoE's
experts over the two DP replicas (tokens reach them by all-to-all), "ep2-mb16" with micro-batches, so one
replica runs fewer than the other and pads with fillers (the all-to-all needs both at every layer); "tp2-ep2"
runs an MoE with sequence parallelism, its experts split over the two TP ranks."""

pytestmark = pytest.mark.integration
require_megatron()


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def models(tiny_model_dir, qwen2_model_dir, deepseek_model_dir, hf_model):
    """name -> (HF directory, transformers model): Llama (anvil-tiny, untied), Qwen2 (tied, qkv bias) and
    Qwen3 (anvil-tiny-qwen3: q/k norms, Megatron's qk_layernorm), Qwen3-MoE (anvil-tiny-moe: 8 experts,
    top-2, Megatron's router and SequentialMLP experts behind the all-to-all dispatcher) and DeepSeek-V3
    (conftest's deepseek_model_dir: MLA, a dense first layer, a shared expert, a sigmoid router with a bias
    and grouped top-k)."""
    qwen2 = AutoModelForCausalLM.from_pretrained(qwen2_model_dir, dtype=torch.float32).eval()
    qwen3_dir = resolve_model("anvil-tiny-qwen3")
    qwen3 = AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32).eval()
    moe_dir = resolve_model("anvil-tiny-moe")
    moe = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    return {
        "llama": (tiny_model_dir, hf_model), "qwen2": (qwen2_model_dir, qwen2), "qwen3": (qwen3_dir, qwen3),
        "qwen3-moe": (moe_dir, moe),
        "deepseek": (deepseek_model_dir, AutoModelForCausalLM.from_pretrained(deepseek_model_dir).eval()),
    }  # fmt: skip


def torch_backend(model_dir) -> TorchBackend:
    return TorchBackend(model_dir, TorchBackendConfig(device="cpu"), seed=0)


def rows_for(loss_fn: str, hf_model, seed: int) -> list[dict]:
    vocab = hf_model.config.vocab_size
    if loss_fn == "cross_entropy":
        return random_rows(vocab, lengths=(5, 9, 7, 12), seed=seed)
    # (the reference is per-datum and unpadded, like test_training_math's)
    rows = random_rows(vocab, lengths=(5, 9, 7, 12), seed=seed, inputs=("advantages",))
    rng = np.random.default_rng(seed + 100)
    with torch.no_grad():  # sampler logprobs near the model's own, so some PPO/CISPO ratios clip
        for row in rows:
            lp = reference_logprobs(hf_model, row).numpy()
            row["logprobs"] = (lp + rng.uniform(-0.6, 0.6, size=lp.shape)).astype(np.float32)
    return rows


def torch_forward(backend: TorchBackend, rows, loss_fn: str, backward: bool):
    batch = batch_from_arrow(encode_batch(make_batch(rows)), vocab_size=backend.description.vocab_size)
    loss, config = resolve_loss(loss_fn, batch.input_names, {}, batch.multi_target)
    return backend.forward(batch, loss, config, backward)


async def megatron_client(channel, model_dir=None) -> LearnerTestClient:
    return await LearnerTestClient.create(channel, servicer=None, base_model=str(model_dir or "anvil-tiny"))


def saved_tensors(path: str) -> dict[str, torch.Tensor]:
    return load_file(f"{path}/model.safetensors")


@pytest.mark.parametrize(
    ("model", "layout"),
    [
        *(("llama", layout) for layout in LAYOUTS),
        ("qwen2", "tp2"),
        ("qwen2", "pp2"),
        ("qwen3", "tp2"),
        ("qwen3-moe", "tp1"),
        ("qwen3-moe", "pp2"),
        ("qwen3-moe", "ep2"),
        ("qwen3-moe", "tp2-ep2"),
        ("qwen3-moe", "tp2"),
        *(("deepseek", layout) for layout in ("tp1", "pp2", "tp2-ep2")),  # TP x EP: each of them too
    ],
)
async def test_logprobs_match_the_torch_backend(megatron_learners, models, model, layout):
    learner = megatron_learners(*LAYOUTS[layout])
    model_dir, hf = models[model]
    vocab = hf.config.vocab_size
    rng = np.random.default_rng(7)
    rows = random_rows(vocab, lengths=(3, 17, 8, 11, 1), seed=5)
    multi = [  # K = 3 targets per position, cross_entropy only
        {"model_input": rng.integers(0, vocab, n), "target_tokens": rng.integers(0, vocab, n * 3),
         "weights": rng.normal(size=n * 3).astype(np.float32), "targets_per_position": 3}
        for n in (4, 6)
    ]  # fmt: skip
    reference = torch_backend(model_dir)
    async with open_channel(learner.address) as channel:
        client = await megatron_client(channel, model_dir)
        for batch_rows in (rows, multi):
            expected = torch_forward(reference, batch_rows, "cross_entropy", backward=False)
            logprobs, metrics = await client.forward(batch_rows)
            for got, want in zip(logprobs, expected.logprobs, strict=True):
                np.testing.assert_allclose(got, want, **LOGPROB_TOL)
            assert metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-4)
        await client.stub.CloseSession(close_request(client))


@pytest.mark.parametrize(
    ("loss_fn", "layout", "model", "grad_scale"),
    [(loss, "tp2", "llama", 1.0) for loss in ("cross_entropy", "importance_sampling", "ppo", "cispo")]
    + [("dro", "tp2", "llama", 0.05), ("ppo", "tp1", "llama", 1.0), ("importance_sampling", "tp1-dp2", "llama", 0.1)]
    + [("cispo", "tp2", "qwen2", 1.0), ("cross_entropy", "pp2", "llama", 1.0), ("ppo", "pp2", "qwen2", 1.0)]
    + [("ppo", "tp2", "qwen3", 1.0)]
    + [("gspo", "tp1-dp2", "llama", 1.0)]  # a per-sequence ratio over datums split between DP replicas
    + [("ppo", "pp2-mb16", "llama", 1.0), ("gspo", "pp2-mb16", "qwen2", 1.0)]  # micro-batches vs one batch
    + [("ppo", "tp2-ckpt", "llama", 1.0)]  # activations recomputed in backward
    + [("ppo", "tp1", "qwen3-moe", 1.0), ("importance_sampling", "tp1-dp2", "qwen3-moe", 1.0)]
    + [("ppo", "ep2", "qwen3-moe", 1.0), ("cross_entropy", "ep2-mb16", "qwen3-moe", 1.0)]
    + [("ppo", "tp2-ep2", "qwen3-moe", 1.0)]
    + [("ppo", "tp1", "deepseek", 1.0), ("cross_entropy", "pp2", "deepseek", 1.0)]
    + [("ppo", "tp2-ep2", "deepseek", 1.0)],
)
async def test_three_adamw_steps_match_the_torch_backend(megatron_learners, models, loss_fn, layout, model, grad_scale):
    adam = dataclasses.replace(ADAM, grad_scale=grad_scale)  # grad_scale: OptimStep's normalisation factor
    learner = megatron_learners(*LAYOUTS[layout])
    model_dir, hf_model = models[model]
    reference = torch_backend(model_dir)
    async with open_channel(learner.address) as channel:
        client = await megatron_client(channel, model_dir)
        for step in range(3):
            rows = rows_for(loss_fn, hf_model, seed=step)
            expected = torch_forward(reference, rows, loss_fn, backward=True)
            expected_step = reference.optim_step(adam)
            _, metrics = await client.forward_backward(rows, loss_fn)
            stepped = await client.optim_step(
                learning_rate=adam.learning_rate, weight_decay=adam.weight_decay, grad_clip_norm=adam.grad_clip_norm,
                eps=adam.eps, grad_scale=adam.grad_scale,
            )  # fmt: skip
            loss_abs = DEEPSEEK_TOLERANCE["loss_abs"] if model == "deepseek" else 1e-5
            assert metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-4, abs=loss_abs)
            for key in ("ratio:mean", "clip_fraction:mean"):
                if key in expected.metrics:
                    assert metrics[key] == pytest.approx(expected.metrics[key], rel=1e-4, abs=1e-6)
            assert stepped.step == step + 1
            assert stepped.metrics["grad_norm:mean"] == pytest.approx(expected_step["grad_norm:mean"], rel=1e-4)
        saved = await client.save_weights(f"after-3-{loss_fn}")
        await client.stub.CloseSession(close_request(client))
    weights = saved_tensors(saved.path)
    parameters = dict(reference.named_weights())  # by checkpoint name: an MoE's experts one by one
    assert set(weights) == set(parameters)
    assert_weights_match(weights, parameters, DEEPSEEK_TOLERANCE["param_max_diff"] if model == "deepseek" else None)
    original = load_file(model_dir / "model.safetensors")
    moved = max((p - original[n]).abs().max().item() for n, p in parameters.items())
    assert moved > 1e-3, "the steps must change the weights for the comparison to mean anything"


def assert_weights_match(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], max_diff: float | None = None
) -> None:
    outliers = total = 0
    for name, expected in want.items():
        difference = (got[name] - expected).abs()
        limit = max_diff or (MOE_PARAM_MAX_DIFF if ".mlp.experts." in name else PARAM_MAX_DIFF)
        assert difference.max().item() <= limit, f"{name}: max |diff| {difference.max().item():.3g}"
        outliers += int((difference > PARAM_CLOSE).sum())
        total += difference.numel()
    assert outliers <= PARAM_OUTLIER_FRACTION * total, f"{outliers} of {total} elements differ by > {PARAM_CLOSE}"


def close_request(client):
    from protos.anvil.v1 import learner_pb2

    return learner_pb2.CloseSessionRequest(session_id=client.session_id)


@pytest.mark.parametrize(
    ("model", "layout"),
    [
        ("llama", "tp1"),
        ("llama", "tp2"),
        ("qwen2", "tp2"),
        ("llama", "pp2"),
        ("qwen2", "pp2"),
        ("qwen3", "tp2"),
        ("qwen3-moe", "tp1"),
        ("qwen3-moe", "ep2"),
        ("qwen3-moe", "tp2-ep2"),
        ("deepseek", "tp2-ep2"),
    ],
)
async def test_hf_to_megatron_to_hf_round_trip_is_exact(megatron_learners, models, model, layout, tmp_path):
    """Load HF weights into the shards, gather them back through SaveWeights: bit-identical, same files."""
    learner = megatron_learners(*LAYOUTS[layout])
    model_dir = models[model][0]
    async with open_channel(learner.address) as channel:
        client = await megatron_client(channel, model_dir)
        saved = await client.save_weights("round-trip")
        await client.stub.CloseSession(close_request(client))
    original = load_file(model_dir / "model.safetensors")
    weights = saved_tensors(saved.path)
    assert set(weights) == set(original)
    for name, tensor in original.items():
        assert weights[name].dtype == tensor.dtype and torch.equal(weights[name], tensor), name
    reference_dir = tmp_path / "torch-saved"
    reference_dir.mkdir()
    torch_backend(model_dir).save_weights(reference_dir)
    assert _file_names(saved.path) - {"COMPLETE", "manifest.json"} == _file_names(reference_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(saved.path, dtype=torch.float32)
    assert reloaded.config.vocab_size == models[model][1].config.vocab_size


def _file_names(path) -> set[str]:
    from pathlib import Path

    return {p.name for p in Path(path).iterdir()}


@pytest.mark.parametrize(
    ("model", "saved_at", "loaded_at"),
    [("llama", "tp2", "tp1"), ("qwen2", "pp2", "tp2"), ("qwen3-moe", "ep2", "tp1"), ("deepseek", "tp2-ep2", "pp2")],
    ids=["tp2-to-tp1", "pp2-to-tp2", "moe-ep2-to-ep1", "deepseek-tp2-ep2-to-pp2"],
)
async def test_state_continues_identically_at_another_layout(megatron_learners, models, model, saved_at, loaded_at):
    """dist_checkpointing resharding: model and AdamW moments saved at one layout, loaded at another."""
    tp2, tp1 = megatron_learners(*LAYOUTS[saved_at]), megatron_learners(*LAYOUTS[loaded_at])
    model_dir, hf_model = models[model]
    adam = {"learning_rate": 1e-3, "weight_decay": 0.01, "grad_clip_norm": 1.0, "eps": 1e-8}
    steps = [rows_for("ppo", hf_model, seed=10 + i) for i in range(3)]
    async with open_channel(tp2.address) as channel:
        client = await megatron_client(channel, model_dir)
        for rows in steps[:2]:
            await client.forward_backward(rows, "ppo")
            await client.optim_step(**adam)
        state = await client.save_state("at-step-2", client_state=b"cursor")
        _, metrics_tp2 = await client.forward_backward(steps[2], "ppo")
        stepped_tp2 = await client.optim_step(**adam)
        weights_tp2 = saved_tensors((await client.save_weights("tp2-step-3")).path)
        await client.stub.CloseSession(close_request(client))
    async with open_channel(tp1.address) as channel:
        client = await megatron_client(channel, model_dir)
        loaded = await client.load_state(state.path)
        assert (loaded.step, loaded.client_state) == (2, b"cursor")
        _, metrics_tp1 = await client.forward_backward(steps[2], "ppo")
        stepped_tp1 = await client.optim_step(**adam)
        weights_tp1 = saved_tensors((await client.save_weights("tp1-step-3")).path)
        fresh = await megatron_client(channel, model_dir)  # without the optimizer: moments start again from zero
        await fresh.load_state(state.path, with_optimizer=False)
        await fresh.forward_backward(steps[2], "ppo")
        await fresh.optim_step(**adam)
        weights_fresh = saved_tensors((await fresh.save_weights("tp1-fresh-adam")).path)
        for opened in (client, fresh):
            await opened.stub.CloseSession(close_request(opened))
    assert stepped_tp1.step == stepped_tp2.step == 3
    assert metrics_tp1["loss:sum"] == pytest.approx(metrics_tp2["loss:sum"], rel=1e-5)
    assert stepped_tp1.metrics["grad_norm:mean"] == pytest.approx(stepped_tp2.metrics["grad_norm:mean"], rel=1e-5)
    assert_weights_match(weights_tp1, weights_tp2)
    differs = max((weights_fresh[n] - weights_tp2[n]).abs().max().item() for n in weights_tp2)
    assert differs > 1e-4, "restored AdamW moments must matter, or the check above proves nothing about them"


async def test_bad_requests_come_back_as_statuses_and_change_nothing(megatron_learners, tiny_model_dir, tmp_path):
    from learner.checkpoint import write_checkpoint
    from protos.anvil.v1 import learner_pb2

    learner = megatron_learners(2, 2)
    torch_state = write_checkpoint(
        tmp_path / "torch-state", torch_backend(tiny_model_dir).save_state, False, {"kind": "state", "step": 0}
    )
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        '{"model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 1, "n_head": 2}'
    )
    rows = random_rows(512, lengths=(6,), seed=3)
    async with open_channel(learner.address) as channel:
        client = await megatron_client(channel)
        before, _ = await client.forward(rows)
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await client.load_state(str(torch_state))
        assert rejected.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'torch' backend" in rejected.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await client.stub.CreateSession(learner_pb2.CreateSessionRequest(base_model=str(gpt2)))
        assert rejected.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'gpt2'" in rejected.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await client.forward([{**rows[0], "target_tokens": np.full(6, 512)}])
        assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        after, _ = await client.forward(rows)  # the ranks are still in step and the weights unchanged
        np.testing.assert_array_equal(after[0], before[0])
        await client.stub.CloseSession(close_request(client))
