"""The single-turn answer environment: chat-formatted prompt, graded exact-match reward.

Reward (in [0, 1]) for a completion whose text (special tokens removed, stripped) is `text`:
    0.5  * the fraction of the answer that text matches as a prefix
  + 0.5  if text == answer (nothing after it but EOS)
Only right characters earn anything, and only an exact answer earns 1.0. There is deliberately no
credit for merely answer-shaped output (say, any digit): under on-policy sampling such credit is won
first by whichever token happens to be sampled most, and the policy collapses onto it whatever the
prompt. `correct` (exact match) is reported alongside.
"""

from __future__ import annotations

from coordinator.envs.base import Env, Problem, Score


def common_prefix(a: str, b: str) -> int:
    """Number of leading characters a and b share."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def grade(text: str, answer: str, ended_with_eos: bool) -> Score:
    text = text.strip()
    exact = text == answer
    reward = 0.5 * common_prefix(text, answer) / max(len(answer), 1)
    if exact:
        reward += 0.5
    return Score(min(reward, 1.0), {"correct": float(exact), "ended_with_eos": float(ended_with_eos)})


class AnswerEnv(Env):
    def __init__(self, problem: Problem, tokenizer) -> None:
        self.problem = problem
        self._tokenizer = tokenizer

    async def prompt_tokens(self) -> list[int]:
        text = self._tokenizer.apply_chat_template(
            [{"role": "user", "content": self.problem.prompt}], add_generation_prompt=True, tokenize=False
        )
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def reference_completion(self) -> list[int]:
        """The right answer as the policy should sample it: its tokens, then EOS (the supervised warmup's target)."""
        return [
            *self._tokenizer(self.problem.answer, add_special_tokens=False)["input_ids"],
            self._tokenizer.eos_token_id,
        ]

    async def score(self, completion_tokens: list[int]) -> Score:
        eos = self._tokenizer.eos_token_id
        ended = bool(completion_tokens) and completion_tokens[-1] == eos
        text = self._tokenizer.decode(completion_tokens, skip_special_tokens=True)
        return grade(text, self.problem.answer, ended)
