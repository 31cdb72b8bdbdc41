"""langenv's grader and tasks for verl's rule-based reward manager.

verl calls a custom reward function as ``compute_score(data_source, solution_str, ground_truth,
extra_info)`` (``custom_reward_function.path`` / ``.name`` in its trainer config) and reads RL data
from parquet files whose rows hold ``data_source``, ``prompt`` (chat messages), ``ability``,
``reward_model`` (``{"style": "rule", "ground_truth": ...}``) and ``extra_info``. `export_parquet`
writes a task in that format and `compute_score` grades it:

    python -c "from langenv.integrations.verl import export_parquet; export_parquet('gsm8k', 'train', 'gsm8k-train.parquet')"
    # verl: data.train_files=gsm8k-train.parquet custom_reward_function.path=$(python -c 'import langenv.integrations.verl as m; print(m.__file__)') custom_reward_function.name=compute_score
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from langenv.integrations._common import grade_rewards, resolve_task
from langenv.tasks.base import Task

#: ``data_source`` values written by `export_parquet`: ``langenv/<task name>``.
SOURCE_PREFIX = "langenv/"


def grading_kind(data_source: str, extra_info: dict | None = None) -> str | None:
    """The grading kind of a row: ``extra_info["grading_kind"]`` when present, else the registered
    task named by ``data_source`` (``langenv/gsm8k`` -> the GSM8K task's kind), else None (the grader
    detects it from the reference)."""
    if extra_info and extra_info.get("grading_kind"):
        return str(extra_info["grading_kind"])
    name = data_source.removeprefix(SOURCE_PREFIX)
    try:
        return resolve_task(name).grading_kind
    except (KeyError, ValueError):
        return None


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    """1.0 if ``solution_str``'s final answer is equivalent to ``ground_truth``, else 0.0.

    Raises:
        langenv.grading.GradingError: the grader could not check it (an infrastructure failure is
            never a 0 score).
    """
    return grade_rewards([solution_str], [ground_truth], grading_kind(data_source, extra_info))[0]


def verl_rows(task: str | Task, split: str = "train", limit: int | None = None) -> list[dict[str, Any]]:
    """The task's problems as verl data rows (see the module docstring)."""
    task = resolve_task(task)
    rows = []
    for i, p in enumerate(list(task.load(split))[:limit]):
        rows.append({
            "data_source": SOURCE_PREFIX + task.name,
            "prompt": [{"role": "user", "content": task.prompt(p)}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": p.answer},
            "extra_info": {"split": split, "index": i, "problem_id": p.id, "grading_kind": task.grading_kind},
        })
    return rows


def export_parquet(task: str | Task, split: str, path: str | Path, limit: int | None = None) -> Path:
    """Write `verl_rows` to a parquet file (through `datasets`); returns the path."""
    import datasets

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(verl_rows(task, split, limit)).to_parquet(str(path))
    return path
