"""GSM8K (Cobbe et al. 2021) as a langenv task, in VinePPO's format.

Prompt: ``"[MATH_TASK] Problem:\\n{question}\\n\\nSolution:"``; the SFT target is ``"\\n"`` plus the
reference rationale with calculator annotations ``<<...>>`` removed, ending in ``#### N``
(McGill-NLP/VinePPO, tasks/gsm8k.py with use_original_format). Steps are lines, the answer line
merged into the last step. Grading follows the paper: only a ``#### N`` line is an answer (grading
kind "gsm8k_strict"; ``lenient_grading=True`` for the lenient "gsm8k" rules).
"""

from __future__ import annotations

import re
from functools import lru_cache

from langenv import steps
from langenv.data import load_split
from langenv.tasks.base import VINEPPO_PROMPT, VINEPPO_STOP, Problem

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def strip_calculator(rationale: str) -> str:
    """Remove GSM8K calculator annotations: ``"48/2 = <<48/2=24>>24"`` -> ``"48/2 = 24"``."""
    return _CALCULATOR.sub("", rationale)


class GSM8KTask:
    """GSM8K grade-school math word problems; numeric answers graded exactly.

    Args:
        source: None for the packaged data, or a local path / hub dataset id (see
            `langenv.data.load_split`).
        lenient_grading: False (default): the paper's rule, a response without a ``#### N`` line
            scores 0 (grading kind "gsm8k_strict"); True: also read "the answer is N", a box or
            the last number (kind "gsm8k", see `langenv.grading`).
    """

    name = "gsm8k"
    grading_kind = "gsm8k_strict"
    stop_strings = VINEPPO_STOP

    def __init__(self, source: str | None = None, lenient_grading: bool = False) -> None:
        self.source = source
        self.grading_kind = "gsm8k" if lenient_grading else "gsm8k_strict"

    def load(self, split: str) -> list[Problem]:
        return _load(split, self.source)

    def prompt(self, problem: Problem) -> str:
        return VINEPPO_PROMPT.format(problem=problem.question)

    def target(self, problem: Problem) -> str:
        return "\n" + problem.solution

    def split_steps(self, response: str) -> list[str]:
        return steps.split_gsm8k(response)


@lru_cache(maxsize=16)
def _load(split: str, source: str | None) -> list[Problem]:
    """Problems of a split.

    Raises:
        ValueError: the errors of `load_split`; a row whose ``answer`` has no ``####`` line, from
            which the final answer is read (naming the source, the row and the value).
    """
    rows = load_split("gsm8k", split, source=source)
    problems = []
    for i, row in enumerate(rows):
        if "####" not in row["answer"]:
            where = f"gsm8k source {source!r}" if source is not None else "packaged gsm8k data"
            raise ValueError(
                f"{where}, split {split!r}, row {i} (0-based): field 'answer': expected a GSM8K solution ending in "
                f"'#### <final answer>', got {row['answer']!r:.80}"
            )
        rationale = strip_calculator(row["answer"])
        answer = rationale.rsplit("####", 1)[-1].strip()
        problems.append(Problem(id=f"gsm8k/{split}/{i}", question=row["question"], solution=rationale, answer=answer))
    return problems
