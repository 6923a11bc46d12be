"""Fireworks' full-parameter RL workflow, written only against the `fireworks-ai` 1.2.30 training SDK.

Pointed at `anvil serve` by `base_url`, it runs the seed workflow of Fireworks' RLOR service mode on a
self-hosted machine: create a deployment (rollout replicas) → create a service-mode trainer job with
lora_rank 0 → connect FiretitanServiceClient → forward → forward_backward_custom (a policy-gradient loss
in torch) → optim_step → WeightSyncer.save_and_hotload (a base snapshot, then a delta) → sample from the
deployment → save_state / load_state_with_optimizer → delete.

    anvil serve --set port=8000 &
    python examples/fireworks_rl_driver.py --base-url http://127.0.0.1:8000 --api-key fw-anything

It prints one JSON line: the sampled sequences with the deployment's logprobs and the trainer's
logprobs of the same tokens (they should agree), and the snapshot sizes.
"""

from __future__ import annotations

import argparse
import json
import uuid

import torch
from fireworks.training.sdk import (
    AdamParams,
    Datum,
    DeploymentConfig,
    DeploymentManager,
    FiretitanSamplingClient,
    FiretitanServiceClient,
    ModelInput,
    SamplingParams,
    TrainerJobConfig,
    TrainerJobManager,
    WeightSyncer,
)


def datum(tokens: list[int], weights: list[float]) -> Datum:
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--base-model", default="anvil-tiny")
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="do not delete the job and the deployment")
    args = parser.parse_args()
    suffix = uuid.uuid4().hex[:6]

    deployments = DeploymentManager(api_key=args.api_key, base_url=args.base_url)
    deployment_id = f"rl-serving-{suffix}"
    deployments.create_or_get(DeploymentConfig(deployment_id=deployment_id, base_model=args.base_model))
    deployments.wait_for_ready(deployment_id)

    try:
        run_job(args, deployments, deployment_id, suffix)
    finally:
        if not args.keep:
            deployments.delete(deployment_id)


def run_job(args: argparse.Namespace, deployments: DeploymentManager, deployment_id: str, suffix: str) -> None:
    trainers = TrainerJobManager(api_key=args.api_key, base_url=args.base_url)
    endpoint = trainers.create_and_wait(
        TrainerJobConfig(
            base_model=args.base_model, lora_rank=args.lora_rank, learning_rate=1e-3, display_name="anvil-rl-trainer"
        )
    )
    try:
        service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=args.api_key)
        policy = service.create_training_client(base_model=args.base_model, lora_rank=0)

        prompt = [4, 40, 405, 226, 28]
        data = [datum([*prompt, 7, 9], [0.0] * 4 + [1.0, 1.0]), datum([*prompt, 11], [0.0] * 4 + [1.0])]
        before = policy.forward(data, "cross_entropy").result()

        def policy_gradient(batch, logprobs_list):  # REINFORCE on the completion tokens, advantage +1 / -1
            advantages = [1.0, -1.0]
            loss = sum(-a * (lp * torch.tensor(d.loss_fn_inputs["weights"].data)).sum()
                       for a, lp, d in zip(advantages, logprobs_list, batch, strict=True))  # fmt: skip
            return loss, {"pg_loss": float(loss)}

        custom = policy.forward_backward_custom(data, policy_gradient).result()
        step = policy.optim_step(
            AdamParams(learning_rate=1e-3), grad_accumulation_normalization="num_loss_tokens"
        ).result()

        syncer = WeightSyncer(
            policy_client=policy, deploy_mgr=deployments, deployment_id=deployment_id, base_model=args.base_model
        )
        base_snapshot = syncer.save_and_hotload("step-1")
        policy.forward_backward_custom(data, policy_gradient).result()
        policy.optim_step(AdamParams(learning_rate=1e-6), grad_accumulation_normalization="num_loss_tokens").result()
        delta_snapshot = syncer.save_and_hotload("step-2")

        sampler = FiretitanSamplingClient(syncer.get_deployment_sampler())
        response = sampler.sample(
            ModelInput.from_ints(prompt), 2, SamplingParams(max_tokens=6, temperature=1.0)
        ).result()
        samples = []
        for sequence in response.sequences:
            tokens = prompt + list(sequence.tokens)
            learner = policy.forward([datum(tokens, [0.0] * (len(tokens) - 1))], "cross_entropy").result()
            learner_lp = learner.loss_fn_outputs[0]["logprobs"].data[len(prompt) - 1 :]
            samples.append({"tokens": list(sequence.tokens), "sampler": list(sequence.logprobs), "learner": learner_lp})

        saved = policy.save_state(f"ckpt-{suffix}").result()
        checkpoints = policy.list_checkpoints()
        policy.load_state_with_optimizer(saved.path).result()
        after_load = policy.forward(data, "cross_entropy").result()
        service.close()
        print(json.dumps({
            "deployment": deployment_id,
            "job": endpoint.job_id,
            "forward_before": [o["logprobs"].data for o in before.loss_fn_outputs],
            "custom_loss": custom.metrics.get("loss:sum"),
            "optim_metrics": step.metrics,
            "snapshots": [base_snapshot, delta_snapshot],
            "samples": samples,
            "state_path": saved.path,
            "checkpoints": checkpoints,
            "forward_after_load": [o["logprobs"].data for o in after_load.loss_fn_outputs],
        }))  # fmt: skip
    finally:
        if not args.keep:
            trainers.delete(endpoint.job_id)


if __name__ == "__main__":
    main()
