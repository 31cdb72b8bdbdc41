"""langenv's grader and tasks for TRL's ``GRPOTrainer`` (TRL >= 1.16; ``pip install trl``).

    from langenv.integrations.trl import reward_function, trl_dataset
    from trl import GRPOConfig, GRPOTrainer

    trainer = GRPOTrainer(model=model, reward_funcs=reward_function("gsm8k"),
                          train_dataset=trl_dataset("gsm8k", "train"), args=GRPOConfig(...))

The dataset has TRL's ``prompt`` column (the task's prompt, as plain text or, with ``chat=True``, a
one-message conversation) and an ``answer`` column that TRL passes to the reward function by name.
"""

from __future__ import annotations

from typing import Any, Callable

from langenv.integrations._common import completion_text, grade_rewards, resolve_task
from langenv.tasks.base import Task


def reward_function(task: str | Task, answer_column: str = "answer") -> Callable[..., list[float]]:
    """A TRL reward function (``reward_funcs=``) grading completions with the task's grader.

    TRL calls it as ``fn(prompts=..., completions=..., <dataset columns>=..., **kwargs)``; it returns
    1.0 for a correct final answer, else 0.0, one per completion (conversational completions: the last
    message's content).

    Raises (when called):
        KeyError: the dataset has no ``answer_column`` column (the message names the columns TRL passed).
        langenv.grading.GradingError: the grader could not check a completion — never a silent 0.
    """
    task = resolve_task(task)

    def reward(prompts: list | None = None, completions: list | None = None, **columns: Any) -> list[float]:
        if answer_column not in columns:
            raise KeyError(f"langenv reward for {task.name!r}: the dataset has no {answer_column!r} column (columns "
                           f"passed by TRL: {sorted(k for k in columns if not k.startswith(('trainer_', 'log_')))})")
        return grade_rewards([completion_text(c) for c in completions or []], columns[answer_column], task.grading_kind)

    reward.__name__ = f"langenv_{task.name}_correct"  # TRL logs rewards under the function's name
    return reward


def trl_dataset(task: str | Task, split: str = "train", limit: int | None = None, chat: bool = False):
    """The task's problems as a `datasets.Dataset` with columns ``prompt`` (the task's prompt; with
    ``chat=True`` a ``[{"role": "user", "content": prompt}]`` conversation), ``answer`` and
    ``problem_id``, the first ``limit`` problems of ``split``."""
    import datasets

    task = resolve_task(task)
    problems = list(task.load(split))[:limit]
    prompts = [task.prompt(p) for p in problems]
    return datasets.Dataset.from_dict({
        "prompt": [[{"role": "user", "content": t}] for t in prompts] if chat else prompts,
        "answer": [p.answer for p in problems],
        "problem_id": [p.id for p in problems],
    })
