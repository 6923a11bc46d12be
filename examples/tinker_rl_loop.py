"""A minimal GRPO-style RL loop written only against the official `tinker` SDK (unmodified).

Point it at Anvil's gateway and it trains the built-in `anvil-tiny` model, full-parameter (rank 0), to
copy a digit: the prompt is "Copy 7" in the model's chat format, the completion is one token, and the
reward is 1 for the right digit plus 0.5 for any digit. Each step: save the weights and get a sampling
client for them, sample a group per prompt, centre rewards within each group, and train with
`importance_sampling` on the sampled token.

    anvil serve &                                   # prints LISTENING 127.0.0.1:8000
    TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-anything python examples/tinker_rl_loop.py

Prints one line per step and, at the end, a JSON summary line with the mean reward of the first and
last five steps.
"""

from __future__ import annotations

import argparse
import json
import random

import tinker
from tinker import types


def build_prompt(tokenizer, digit: int) -> list[int]:
    messages = [{"role": "user", "content": f"Copy {digit}"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def reward(tokenizer, digit: int, token: int) -> float:
    text = tokenizer.decode([token]).strip()
    return (1.0 if text == str(digit) else 0.0) + (0.5 if text.isdigit() else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="anvil-tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--groups", type=int, default=8, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    args = parser.parse_args()

    rng = random.Random(0)
    service_client = tinker.ServiceClient()
    training_client = service_client.create_lora_training_client(base_model=args.base_model, rank=0).result()
    tokenizer = training_client.get_tokenizer()
    history = []
    for step in range(args.steps):
        sampling_client = training_client.save_weights_and_get_sampling_client().result()
        digits = [rng.randrange(10) for _ in range(args.groups)]
        prompts = [build_prompt(tokenizer, digit) for digit in digits]
        futures = [
            sampling_client.sample(
                types.ModelInput.from_ints(prompt),
                args.group_size,
                types.SamplingParams(max_tokens=1, temperature=1.0, stop=[]),
            )
            for prompt in prompts
        ]
        data, rewards = [], []
        for digit, prompt, future in zip(digits, prompts, futures, strict=True):
            sequences = future.result().sequences
            group = [reward(tokenizer, digit, seq.tokens[0]) for seq in sequences]
            rewards += group
            mean = sum(group) / len(group)
            for seq, value in zip(sequences, group, strict=True):
                if value == mean:
                    continue  # no signal in a group where every sample scored the same
                tokens = prompt + seq.tokens
                n = len(tokens) - 1
                data.append(
                    types.Datum(
                        model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={
                            "target_tokens": tokens[1:],
                            "logprobs": [0.0] * (n - 1) + [seq.logprobs[0]],
                            "advantages": [0.0] * (n - 1) + [value - mean],
                        },
                    )
                )
        if data:
            training_client.forward_backward(data, "importance_sampling").result()
            training_client.optim_step(types.AdamParams(learning_rate=args.learning_rate)).result()
        history.append(sum(rewards) / len(rewards))
        print(f"step {step + 1:3d}  reward {history[-1]:.3f}  datums {len(data)}", flush=True)
    service_client.close("success").result()
    first, last = history[:5], history[-5:]
    print(json.dumps({"first_reward": sum(first) / len(first), "last_reward": sum(last) / len(last)}))


if __name__ == "__main__":
    main()
