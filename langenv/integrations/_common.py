"""What both integrations share: resolving a task, and grading completions without a silent 0."""

from __future__ import annotations

from typing import Sequence

from langenv import grading
from langenv.tasks.base import Task, make_task


def resolve_task(task: str | Task) -> Task:
    """A registered task by name (``"gsm8k"``, ``"math"``, ``"arithmetic"``, ...), or the task itself."""
    return make_task(task) if isinstance(task, str) else task


def completion_text(completion) -> str:
    """The text of a completion as trainers pass it: a string, or a conversation (a list of
    ``{"role", "content"}`` messages, the last one the model's).

    Raises:
        TypeError: anything else, naming its type.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"completion: expected a string or a list of chat messages, got {type(completion).__name__}")


def grade_rewards(completions: Sequence[str], references: Sequence[str], kind: str | None) -> list[float]:
    """1.0 / 0.0 per completion from `langenv.grading.grade_batch`.

    Raises:
        langenv.grading.GradingError: the grader could not check a completion (status "error"): an
            infrastructure failure is never returned as reward 0 (verl PR #5635's failure mode).
        ValueError: different numbers of completions and references.
    """
    if len(completions) != len(references):
        raise ValueError(f"got {len(completions)} completions but {len(references)} references")
    grades = grading.grade_batch(list(completions), [str(r) for r in references], kind=kind)
    errors = [g for g in grades if g.status == "error"]
    if errors:
        raise grading.GradingError(f"{len(errors)} of {len(grades)} completions could not be graded: {errors[0].cause}")
    return [g.reward for g in grades]
