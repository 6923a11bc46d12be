"""Built-in tasks, dataset sources and the answer environment's reward."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from coordinator.envs import build_source
from coordinator.envs.answer_env import AnswerEnv, grade
from coordinator.envs.datasets import DatasetSource
from coordinator.envs.tasks import GENERATORS, GeneratedTask
from protos.errors import InvalidArgument, NotFound


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generated_problems_are_reproducible_and_verifiable(name):
    task, again = GeneratedTask(name, seed=3), GeneratedTask(name, seed=3)
    problems = [task.problem(i) for i in range(50)]
    assert problems == [again.problem(i) for i in range(50)]
    assert len({p.prompt for p in problems}) > 5, "problems vary"
    for problem in problems:
        if name == "copy_digit":
            assert problem.prompt == f"Copy {problem.answer}"
        elif name == "next_digit":
            assert int(problem.answer) == (int(problem.prompt.removeprefix("After ")) + 1) % 10
        elif name == "addition":
            a, b = problem.prompt.rstrip("=").split("+")
            assert int(problem.answer) == int(a) + int(b)
        else:
            assert problem.answer.split() == problem.prompt.removeprefix("Reverse ").split()[::-1]
    assert GeneratedTask(name, seed=4).problem(0) != task.problem(0) or name == "copy_digit"


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown built-in task"):
        GeneratedTask("chess")


@pytest.mark.parametrize(
    ("text", "answer", "reward", "correct"),
    [
        ("7", "7", 1.0, 1.0),
        (" 7 ", "7", 1.0, 1.0),
        ("7 and more", "7", 0.5, 0.0),
        ("3", "7", 0.0, 0.0),
        ("", "7", 0.0, 0.0),
        ("9 1", "9 1 4", 0.5 * 3 / 5, 0.0),
        ("9 1 4", "9 1 4", 1.0, 1.0),
    ],
)
def test_grade(text, answer, reward, correct):
    score = grade(text, answer, ended_with_eos=True)
    assert score.reward == pytest.approx(reward)
    assert score.metrics["correct"] == correct


async def test_answer_env_renders_the_chat_prompt_and_scores_tokens(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    env = AnswerEnv(GeneratedTask("copy_digit").problem(0), tokenizer)
    prompt = await env.prompt_tokens()
    assert tokenizer.decode(prompt) == f"<|user|>Copy {env.problem.answer}<|end|><|assistant|>"
    right = tokenizer(env.problem.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert (await env.score(right)).reward == 1.0
    wrong = tokenizer("x" + env.problem.answer, add_special_tokens=False)["input_ids"]
    assert (await env.score(wrong)).reward == 0.0


def test_jsonl_and_parquet_datasets(tmp_path):
    rows = [{"prompt": "2+2=", "answer": "4"}, {"prompt": "Copy 5", "answer": "5"}]
    jsonl = tmp_path / "problems.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "problems.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet):
        source = build_source("ignored", path, seed=0)
        assert isinstance(source, DatasetSource) and source.num_problems == 2
        assert [source.problem(i).prompt for i in range(4)] == ["2+2=", "Copy 5", "2+2=", "Copy 5"]
        assert source.problem(3).index == 3 and source.problem(3).answer == "5"


def test_bad_datasets_are_refused(tmp_path):
    with pytest.raises(NotFound):
        DatasetSource(tmp_path / "missing.jsonl")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(InvalidArgument, match="lacks column"):
        DatasetSource(wrong)
    text = tmp_path / "problems.txt"
    text.write_text("nope")
    with pytest.raises(InvalidArgument, match=r"jsonl or \.parquet"):
        DatasetSource(text)
