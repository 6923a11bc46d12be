"""The torch backend's token-budget micro-batches, packing and chunked logprobs against an independent
computation: each datum alone through a plain Hugging Face forward (no packing, no padding), its
log-softmax, the loss summed, and torch.autograd's gradients. Whole request, many micro-batches,
activation checkpointing and tiny logprob chunks must all give the same logprobs, loss, metrics,
gradients and AdamW step (fp32; tolerances below)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from learner.backends.packing import combine_metrics, plan_micro_batches
from learner.backends.prefix_sharing import prefix_runs
from learner.backends.torch_backend import TorchBackend
from learner.batch import Datum, TrainingBatch
from learner.config import TorchBackendConfig
from learner.losses import DATUM_INDEX, LOSSES
from protos.adam import AdamParams

LENGTHS = [5, 31, 2, 17, 40, 9, 23, 3]
ATOL = 2e-5


def make_batch(vocab: int, targets_per_position: int = 1, seed: int = 0) -> TrainingBatch:
    rng = np.random.default_rng(seed)
    data = []
    for length in LENGTHS:
        inputs = {
            "logprobs": rng.normal(-3.0, 0.5, length).astype(np.float32),
            "advantages": rng.normal(0.0, 1.0, length).astype(np.float32),
        }
        if targets_per_position > 1:
            inputs = {"weights": rng.random(length * targets_per_position).astype(np.float32)}
        data.append(
            Datum(
                model_input=rng.integers(5, vocab, length).astype(np.int64),
                target_tokens=rng.integers(5, vocab, length * targets_per_position).astype(np.int64),
                targets_per_position=targets_per_position,
                loss_inputs=inputs,
            )
        )
    return TrainingBatch(data, frozenset(data[0].loss_inputs))


def reference(model_dir, batch: TrainingBatch, loss_name: str) -> tuple[list[np.ndarray], float, dict]:
    """Each datum alone through Hugging Face, the loss over all of them, and the gradients."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    logprobs = []
    for datum in batch.data:
        logits = model(input_ids=torch.from_numpy(datum.model_input)[None]).logits[0]
        targets = torch.from_numpy(datum.target_tokens).view(len(datum.model_input), -1)
        logprobs.append(torch.log_softmax(logits, -1).gather(1, targets).reshape(-1))
    inputs = {
        name: torch.from_numpy(np.concatenate([d.loss_inputs[name] for d in batch.data])) for name in batch.input_names
    }
    inputs[DATUM_INDEX] = torch.cat([torch.full((len(d.target_tokens),), i) for i, d in enumerate(batch.data)])
    spec = LOSSES[loss_name]
    loss, _ = spec.fn(torch.cat(logprobs), inputs, dict(spec.defaults))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return [lp.detach().numpy() for lp in logprobs], loss.item(), grads


def run(model_dir, batch: TrainingBatch, loss_name: str, **settings) -> tuple[TorchBackend, object]:
    backend = TorchBackend(model_dir, TorchBackendConfig(device="cpu", **settings), seed=0)
    spec = LOSSES[loss_name]
    return backend, backend.forward(batch, spec, dict(spec.defaults), backward=True)


SETTINGS = {
    "whole request": {},
    "8 micro-batches": {"max_tokens_per_micro_batch": 16},
    "micro-batches + checkpointing + 7-token logprob chunks": {
        "max_tokens_per_micro_batch": 48,
        "activation_checkpointing": True,
        "logprob_chunk_tokens": 7,
    },
}


@pytest.mark.parametrize("loss_name", ["ppo", "gspo"])
@pytest.mark.parametrize("label", list(SETTINGS))
def test_micro_batched_packed_equals_each_datum_alone(tiny_model_dir, loss_name: str, label: str):
    batch = make_batch(vocab=512)
    expected_logprobs, expected_loss, expected_grads = reference(tiny_model_dir, batch, loss_name)
    backend, result = run(tiny_model_dir, batch, loss_name, **SETTINGS[label])
    for got, want in zip(result.logprobs, expected_logprobs, strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert result.metrics["loss:sum"] == pytest.approx(expected_loss, abs=1e-4)
    expected_batches = len(plan_micro_batches(LENGTHS, backend._config.max_tokens_per_micro_batch))
    assert result.metrics["learner/micro_batches:sum"] == expected_batches
    for name, parameter in backend.model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected_grads[name], atol=5e-5, rtol=1e-4, msg=name)


def test_micro_batches_change_nothing_in_metrics_or_the_optimizer_step(tiny_model_dir):
    batch = make_batch(vocab=512, seed=1)
    whole, whole_result = run(tiny_model_dir, batch, "gspo")
    split, split_result = run(tiny_model_dir, batch, "gspo", max_tokens_per_micro_batch=20)
    for name in ("loss:sum", "sequence_ratio:mean", "clip_fraction:mean"):
        assert split_result.metrics[name] == pytest.approx(whole_result.metrics[name], abs=1e-5), name
    # Adam normalises every gradient element: with Tinker's eps (1e-12) a gradient of ~1e-9 steps by a full
    # +-lr, and fp32 rounding (the micro-batched gradients differ by ~1e-8) can flip its sign - it did on one
    # CPU. An eps of 1e-5 keeps such elements' updates small, so the steps must agree within 1 % of lr.
    params = AdamParams(learning_rate=1e-2, eps=1e-5)
    whole.optim_step(params)
    split.optim_step(params)
    for (name, a), (_, b) in zip(whole.model.named_parameters(), split.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-2 * params.learning_rate, rtol=0, msg=name)


def test_multi_target_cross_entropy_packed_and_chunked(tiny_model_dir):
    batch = make_batch(vocab=512, targets_per_position=3, seed=2)
    expected_logprobs, expected_loss, _ = reference(tiny_model_dir, batch, "cross_entropy")
    _, result = run(tiny_model_dir, batch, "cross_entropy", max_tokens_per_micro_batch=24, logprob_chunk_tokens=5)
    for got, want in zip(result.logprobs, expected_logprobs, strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert result.metrics["loss:sum"] == pytest.approx(expected_loss, abs=1e-4)


def test_plan_and_metric_combination():
    assert plan_micro_batches([5, 5, 5, 20, 1], 10) == [[0, 1], [2], [3], [4]]
    assert plan_micro_batches([], 10) == []
    parts = [({"loss:sum": 1.0, "ratio:mean": 1.0, "seq:mean": 2.0, "m:max": 3.0}, 10, 1),
             ({"loss:sum": 2.0, "ratio:mean": 4.0, "seq:mean": 5.0, "m:max": 1.0}, 30, 3)]  # fmt: skip
    combined = combine_metrics(parts, per_datum=frozenset({"seq:mean"}))
    assert combined == {"loss:sum": 3.0, "ratio:mean": 3.25, "seq:mean": 4.25, "m:max": 3.0}


def grpo_batch(vocab: int, seed: int = 3) -> TrainingBatch:
    """Groups of completions of one prompt each (prompts of 6, 9 and 12 tokens, completions of 1 to 7),
    then two datums that share nothing: the shape the shared-prefix path is for, and what it must leave."""
    rng = np.random.default_rng(seed)
    data = []
    for prompt_length, group_size in ((9, 5), (6, 4), (12, 3), (9, 4)):
        prompt = rng.integers(5, vocab, prompt_length)
        for _ in range(group_size):
            completion = rng.integers(5, vocab, int(rng.integers(1, 8)))
            tokens = np.concatenate([prompt, completion]).astype(np.int64)
            n = len(tokens) - 1
            inputs = {"logprobs": rng.normal(-3.0, 0.5, n).astype(np.float32),
                      "advantages": rng.normal(0.0, 1.0, n).astype(np.float32)}  # fmt: skip
            data.append(Datum(tokens[:-1], tokens[1:], 1, inputs))
    for length in (7, 3):
        tokens = rng.integers(5, vocab, length + 1).astype(np.int64)
        inputs = {"logprobs": np.full(length, -3.0, np.float32), "advantages": np.ones(length, np.float32)}
        data.append(Datum(tokens[:-1], tokens[1:], 1, inputs))
    return TrainingBatch(data, frozenset({"logprobs", "advantages"}))


@pytest.mark.parametrize(
    ("share_prefixes", "chunk"),
    [(True, 1024), (True, 5), (False, 1024)],
    ids=["shared", "shared, 5-row logprob chunks", "packed"],
)
def test_shared_prefixes_equal_each_datum_alone(tiny_model_dir, share_prefixes: bool, chunk: int):
    batch = grpo_batch(vocab=512)
    runs = prefix_runs([d.model_input for d in batch.data])
    assert runs is not None and [len(r.members) for r in runs] == [5, 4, 3, 4, 1, 1], "one run per group"
    # The prompt, or one token less where a member's model_input is the prompt alone (a one-token completion).
    assert all(p - 1 <= r.prefix <= p for r, p in zip(runs[:4], (9, 6, 12, 9), strict=True))
    assert runs[4].prefix == runs[5].prefix == 0
    expected_logprobs, expected_loss, expected_grads = reference(tiny_model_dir, batch, "ppo")
    backend, result = run(tiny_model_dir, batch, "ppo", share_prefixes=share_prefixes, logprob_chunk_tokens=chunk)
    for got, want in zip(result.logprobs, expected_logprobs, strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert result.metrics["loss:sum"] == pytest.approx(expected_loss, abs=1e-4)
    for name, parameter in backend.model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected_grads[name], atol=5e-5, rtol=1e-4, msg=name)


def test_prefix_runs_only_where_sharing_pays():
    same = np.arange(10, 30)
    assert prefix_runs([same[:12], same[:15]]) is not None
    assert prefix_runs([np.arange(10), np.arange(50, 60)]) is None, "nothing shared"
    assert prefix_runs([same[:6], same[:6], np.arange(100, 140)]) is None, "5 shared tokens of 52 save too little"


def test_prefix_runs_one_per_group_when_groups_share_a_template():
    """copy_digit's shape: 16 groups x 32 of 7-token prompts that all start with the same 4 template tokens.
    Merging every group into one run sharing those 4 would run 3 tokens per datum instead of 1."""
    template = np.array([4, 40, 405, 226])
    sequences = [np.concatenate([template, [digit, 2, 5]]) for digit in range(16) for _ in range(32)]
    runs = prefix_runs(sequences)
    assert runs is not None and [(len(r.members), r.prefix) for r in runs] == [(32, 6)] * 16


def exhaustive_best_saving(sequences: list[np.ndarray]) -> int:
    """The most tokens any split into consecutive runs saves, over every split (independent of prefix_runs)."""
    best = [0] * (len(sequences) + 1)
    for end in range(1, len(sequences) + 1):
        for start in range(end):
            members = sequences[start:end]
            shared = min(len(s) - 1 for s in members)
            for s in members[1:]:
                differ = [i for i, (a, b) in enumerate(zip(members[0], s, strict=False)) if a != b]
                shared = min(shared, differ[0]) if differ else shared
            run = (len(members) - 1) * shared if len(members) > 1 and shared >= 4 else 0
            best[end] = max(best[end], best[start] + run)
    return best[-1]


@pytest.mark.parametrize("seed", range(20))
def test_prefix_runs_save_as_much_as_any_split(seed: int):
    rng = np.random.default_rng(seed)
    base = rng.integers(5, 9, 20)
    stems = [np.concatenate([base[: rng.integers(4, 14)], rng.integers(5, 9, 20)]) for _ in range(3)]
    picks = [rng.integers(3) for _ in range(14)]  # nested shared prefixes of many lengths, in runs and not
    sequences = [np.concatenate([stems[i][: rng.integers(6, 20)], rng.integers(5, 9, 2)]) for i in picks]
    runs = prefix_runs(sequences)
    saved = sum((len(r.members) - 1) * r.prefix for r in runs) if runs else 0
    want = exhaustive_best_saving(sequences)
    assert saved == want or (runs is None and want < 0.25 * sum(len(s) for s in sequences))
    for run in runs or []:  # every run's prefix really is shared, and leaves each member a token
        assert all(len(sequences[m]) > run.prefix for m in run.members)
        assert all((sequences[m][: run.prefix] == sequences[run.members[0]][: run.prefix]).all() for m in run.members)


def duplicated_batch(vocab: int, seed: int = 5) -> TrainingBatch:
    """copy_digit's shape: groups of one-token completions, so every member's model_input is its prompt
    (identical within a group); the targets and loss inputs differ per member. One lone datum besides."""
    rng = np.random.default_rng(seed)
    data = []
    for prompt_length, group_size in ((7, 6), (7, 5), (4, 3)):
        prompt = np.concatenate([[4, 40, 405], rng.integers(5, vocab, prompt_length - 3)]).astype(np.int64)
        for _ in range(group_size):
            tokens = np.concatenate([prompt, rng.integers(5, vocab, 1)])
            n = len(tokens) - 1
            inputs = {"logprobs": rng.normal(-3.0, 0.5, n).astype(np.float32),
                      "advantages": rng.normal(0.0, 1.0, n).astype(np.float32)}  # fmt: skip
            data.append(Datum(tokens[:-1], tokens[1:], 1, inputs))
    tokens = rng.integers(5, vocab, 9).astype(np.int64)
    data.append(Datum(tokens[:-1], tokens[1:], 1, {"logprobs": np.full(8, -3.0, np.float32),
                                                    "advantages": np.ones(8, np.float32)}))  # fmt: skip
    return TrainingBatch(data, frozenset({"logprobs", "advantages"}))


@pytest.mark.parametrize("settings", [{}, {"activation_checkpointing": True}, {"logprob_chunk_tokens": 3}])
def test_identical_sequences_run_once_and_equal_each_datum_alone(tiny_model_dir, settings, monkeypatch):
    from learner.backends import prefix_sharing

    batch = duplicated_batch(vocab=512)
    distinct_counts = []
    original = prefix_sharing._distinct
    monkeypatch.setattr(
        prefix_sharing, "_distinct", lambda s: distinct_counts.append(len(original(s)[0])) or original(s)
    )
    expected_logprobs, expected_loss, expected_grads = reference(tiny_model_dir, batch, "ppo")
    backend, result = run(tiny_model_dir, batch, "ppo", **settings)
    assert distinct_counts[0] == 4, "three prompts and the lone datum: 15 sequences run as 4"
    for got, want in zip(result.logprobs, expected_logprobs, strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert result.metrics["loss:sum"] == pytest.approx(expected_loss, abs=1e-4)
    for name, parameter in backend.model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected_grads[name], atol=5e-5, rtol=1e-4, msg=name)
