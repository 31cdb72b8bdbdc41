"""MATH (Hendrycks et al. 2021) as a langenv task, in VinePPO's format.

Splits are PRM800K's (12k train / MATH-500 test) with VinePPO's 500-problem validation subset.
Prompt: ``"[MATH_TASK] Problem:\\n{problem}\\n\\nSolution:"``; the SFT target is ``"\\n"`` plus the raw
solution with its ``\\boxed{}`` answer (McGill-NLP/VinePPO, configs/sft_*_for_MATH.jsonnet). Steps
come from the LaTeX-aware sentence splitter in `langenv.steps`.
"""

from __future__ import annotations

from functools import lru_cache

from langenv import steps
from langenv.data import load_split
from langenv.tasks.base import VINEPPO_PROMPT, VINEPPO_STOP, Problem


class MATHTask:
    """MATH competition problems; answers graded symbolically (math-verify behind our guards).

    Args:
        source: None for the packaged data, or a local path / hub dataset id.
    """

    name = "math"
    grading_kind = "math"
    stop_strings = VINEPPO_STOP

    def __init__(self, source: str | None = None) -> None:
        self.source = source

    def load(self, split: str) -> list[Problem]:
        return _load(split, self.source)

    def prompt(self, problem: Problem) -> str:
        return VINEPPO_PROMPT.format(problem=problem.question)

    def target(self, problem: Problem) -> str:
        return "\n" + problem.solution

    def split_steps(self, response: str) -> list[str]:
        return steps.split_math(response)


@lru_cache(maxsize=16)
def _load(split: str, source: str | None) -> list[Problem]:
    rows = load_split("math", split, source=source)
    problems = []
    for i, row in enumerate(rows):
        meta = tuple(sorted((k, str(row[k])) for k in ("subject", "level", "unique_id") if k in row))
        pid = row.get("unique_id") or f"math/{split}/{i}"
        problems.append(Problem(id=pid, question=row["problem"], solution=row["solution"], answer=row["answer"], meta=meta))
    return problems
