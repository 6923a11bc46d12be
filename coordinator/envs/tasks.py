"""Built-in tasks that anvil-tiny learns on a CPU, with verifiable rewards.

Each task generates problem i from a generator seeded by (task seed, i), so problems are endless and
reproducible. Prompts use the built-in chat format (coordinator.models):

    copy_digit   "Copy 7"        -> "7"      a one-token copy: learnable from scratch in a few minutes
    next_digit   "After 7"       -> "8"      the next digit, cyclic (after 9 comes 0): one-token arithmetic
    addition     "3+5="          -> "8"      single-digit sums (answers 0..18)
    reverse      "Reverse 4 1 9" -> "9 1 4"  string manipulation over digits
"""

from __future__ import annotations

import random
from collections.abc import Callable

from coordinator.envs.base import Problem, ProblemSource


def _copy_digit(rng: random.Random) -> tuple[str, str]:
    digit = str(rng.randrange(10))
    return f"Copy {digit}", digit


def _next_digit(rng: random.Random) -> tuple[str, str]:
    digit = rng.randrange(10)
    return f"After {digit}", str((digit + 1) % 10)


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(10), rng.randrange(10)
    return f"{a}+{b}=", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    digits = [str(rng.randrange(10)) for _ in range(3)]
    return f"Reverse {' '.join(digits)}", " ".join(reversed(digits))


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "copy_digit": _copy_digit,
    "next_digit": _next_digit,
    "addition": _addition,
    "reverse": _reverse,
}


class GeneratedTask(ProblemSource):
    def __init__(self, name: str, seed: int = 0) -> None:
        if name not in GENERATORS:
            raise ValueError(f"unknown built-in task {name!r}; choose one of {sorted(GENERATORS)}")
        self.name = name
        self._generate = GENERATORS[name]
        self._seed = seed

    @property
    def num_problems(self) -> int | None:
        return None

    def problem(self, index: int) -> Problem:
        prompt, answer = self._generate(random.Random(f"{self.name}:{self._seed}:{index}"))
        return Problem(index, prompt, answer)
