"""TRL's `GRPOTrainer` on one of Anvil's tasks, set up like the Anvil run it is compared with (bench/peers.py).

Same model directory (the built-in anvil-tiny), same prompts in the same order (problem i of the task's
generator, chat-formatted by the model's own template), same reward (coordinator.envs.answer_env.grade on
the completion's text, special tokens removed), same hyper-parameters: B prompts x G samples per step,
the completion cap, temperature 1, constant learning rate, Adam betas 0.9 / 0.95 and eps 1e-8, gradient
clipping 1.0, no KL, group-normalised advantages, one pass per batch (num_iterations = 1). Settings TRL
needs changed to match: `lr_scheduler_type="constant"` (its default decays linearly), the betas (its
default beta2 is 0.999), `shuffle_dataset=False` (keep Anvil's prompt order), gradient checkpointing off,
CPU. Its loss normalisation is left at TRL's default and recorded; with one-token answers all of them
differ only by a constant factor.

Generation runs inside the trainer's step, so its learner idles while it generates: the idle fraction
is the time in `_generate_and_score_completions` over the step's time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from coordinator.envs.answer_env import grade
from coordinator.envs.tasks import GeneratedTask


def trl_rows(
    model_dir: Path, task: str, task_seed: int, seed: int, steps: int, prompts: int, group_size: int,
    max_tokens: int, learning_rate: float, out_dir: Path, stop_at: float | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """Per step: step, wall_s (since training started), reward, idle_s (generating). The prompts come from
    the task's generator at `task_seed` (as Anvil's run draws them); `seed` seeds TRL's sampling, as Anvil's
    run-level seed does its own. Stops early once the 5-step mean reward reaches `stop_at`. Also returns
    the settings used."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.manual_seed(seed)
    source = GeneratedTask(task, task_seed)
    problems = [source.problem(i) for i in range(steps * prompts)]
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": p.prompt}], "answer": p.answer} for p in problems]
    )

    def reward(completions: list, answer: list[str], **_: Any) -> list[float]:
        return [grade(c[0]["content"], a, ended_with_eos=True).reward for c, a in zip(completions, answer, strict=True)]

    settings = dict(
        output_dir=str(out_dir), per_device_train_batch_size=prompts * group_size, num_generations=group_size,
        max_completion_length=max_tokens, temperature=1.0, learning_rate=learning_rate,
        lr_scheduler_type="constant", adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        beta=0.0, num_iterations=1, steps_per_generation=1, scale_rewards="group", shuffle_dataset=False,
        gradient_checkpointing=False, use_cpu=True, bf16=False, max_steps=steps, logging_steps=1, report_to=[],
        save_strategy="no", seed=seed, dataloader_num_workers=0,
    )  # fmt: skip
    config = trl.GRPOConfig(**settings)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    rows: list[dict[str, Any]] = []
    clock = {"start": 0.0, "idle": 0.0}
    generate = trainer._generate_and_score_completions

    def timed_generate(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            clock["idle"] += time.perf_counter() - began

    trainer._generate_and_score_completions = timed_generate

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["start"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                rows.append(
                    {"step": state.global_step, "wall_s": time.perf_counter() - clock["start"],
                     "reward": float(logs["reward"]), "idle_s": clock["idle"]}
                )  # fmt: skip
                recent = [r["reward"] for r in rows[-5:]]
                if stop_at is not None and len(recent) == 5 and sum(recent) / 5 >= stop_at:
                    control.should_training_stop = True

    trainer.add_callback(Record())
    trainer.train()
    settings["loss_type"] = config.loss_type
    settings["epsilon"] = config.epsilon
    settings["trl_version"] = trl.__version__
    return rows, settings
