r"""Answer checking for GSM8K and MATH: extraction, equivalence, and a killable worker pool.

Public API: `is_correct` (one check; raises `GradingError` when it cannot check at all),
`grade_batch` (many checks; a `Grade` per item, status "error" when it cannot check),
`grade` (in this process, no isolation), `GradingPool`, `extract_answer`, `detect_kind`,
`Grade`, `STATUSES`, `KINDS`, `GradingError`, `default_pool`.

They work the same from any process a user calls them from: a plain script, a ``python -`` stdin
script, a script without an ``if __name__ == "__main__":`` guard, a thread, a daemonic
`multiprocessing.Pool` worker, ``datasets.map(num_proc=N)``, a DataLoader worker, a Jupyter
kernel, under the spawn, fork and forkserver start methods: the sympy workers are separate
interpreters started with `subprocess` (`langenv.grading._worker`), not `multiprocessing`
children.

Pipeline (``shared/reference/graders.md`` §5): extract the final answer of the completion and of
the reference with our own rules, normalise both, decide with strings and exact numbers where
that suffices (in process, no sympy), and only otherwise parse both with math-verify 0.9.0 and
compare them symbolically inside a `GradingPool` worker that is killed after ``timeout_s``.
Model text is never evaluated: no ``eval``/``sympify``/``parse_expr`` on it; math-verify's LaTeX
parser is the only parser, and it is reached only by answers that passed the size guards.

Statuses (`Grade.status`; reward is 1.0 only for "correct"):
    correct    the final answer is equivalent to the reference.
    incorrect  a final answer was found and it is not equivalent.
    no_answer  no final answer could be extracted from the completion.
    timeout    the check ran past its limit (the pool's hard kill, or math-verify's 1 s alarms).
    invalid    the answer was refused before sympy (a numeric exponent tower such as 9^{9^9}, an
               exponent above 9999, a factorial of a 4+ digit number, nesting deeper than 50,
               more than 600 characters), the check ran out of the worker's memory cap, the
               reference has no extractable answer, or an input was not a str. Identical answers
               are "correct" before any guard; integers longer than 4,000 digits are only ever
               compared as strings.
    error      NOT a verdict on the answer: the grader could not check it (no worker could start,
               a worker died twice on the check, the worker's own code raised). `Grade.cause`
               names the cause; `is_correct` raises `GradingError` instead. A trainer must count
               these and stop rather than train on them.

Extraction (`extract_answer`; inputs are cut at the first end-of-turn token such as
``<|im_end|>`` and to their last 6,000 characters, enough for a 4,000-digit integer):
    * The rightmost of: the last ``\boxed{..}``/``\fbox{..}``/``\boxed N`` (brace matched; an
      unclosed box is skipped; boxes just before it are joined when separated by < 10 chars or by
      a short connective phrase such as ``\quad\text{and}\quad``), the last ``#### ..`` line, and
      the last "Final Answer: ..."/"final answer is ..." sentence (cut at ". ", a blank line or
      "I hope").
    * Else the last "answer is/answer: ..." sentence (one made of plain words only, such as "our
      answer is correct", ranks last), else the last ``**..**`` holding a digit.
    * Else the whole text if it is bare (at most two prose words, e.g. ``64 square feet``,
      ``\text{Evelyn}``), else - LENIENT FALLBACK, both kinds - the last math environment
      (``$..$``, ``\(..\)``, ``\[..\]``) or the last number after it. A number glued after
      letters (``AZYUK2A``) is not a number; a completion with no number and no math is
      "no_answer". Consequence: a completion without any marker whose last number equals the
      answer is graded correct. The GSM8K/MATH SFT targets always carry a marker, and the
      environment does not grade truncated episodes.
    * STRICT GSM8K (kind "gsm8k_strict", the grading kind of the gsm8k and arithmetic tasks, hence
      of every training and evaluation reward on them): only the last ``#### ..`` line counts; a
      completion without ``####`` is "no_answer" (reward 0), as in the VinePPO paper's code
      (McGill-NLP/VinePPO, tasks/gsm8k.py). The reference is read, and the numbers compared, as
      for "gsm8k". `is_correct` / `grade_batch` with kind "gsm8k" (or None) stay lenient.

REASONING-GYM kinds ``"rg:<dataset>"`` (the grading kind of `langenv.tasks.reasoning_gym`'s
tasks; `langenv.grading._rg` has the details): the reference is the JSON of a reasoning-gym entry;
the answer is the rest of the completion's last ``####`` line (no ``####``: "no_answer"); the
dataset's own ``score_answer`` scores it, always inside a worker (never decided in process: some
scorers parse model text, e.g. countdown's sympy ``parse_expr``). Partial credit is binary: score
>= 1.0 is "correct", anything lower "incorrect" (countdown's 0.01 format credit included). A scorer
that raises or returns a non-number is "invalid" with `Grade.cause`; reasoning-gym missing in the
worker, or an unknown dataset, is "error".

Policies for the contested categories of ``shared/testdata/grader_cases.jsonl``:
    * Lists (commas, ';', "and"/"or", several joined boxes) are UNORDERED SETS: every reference
      element must equal some predicted element AND every predicted element must equal some
      reference element (this closes math-verify's any-match hole, #47, and rejects hedging such
      as ``\boxed{2, 3}`` for 2). Duplicates count once. ``\pm`` expands to two elements.
      Tuples/intervals/vectors (bracketed) stay ORDERED.
    * Decimal commas are not read: ``1,22`` is the list {1, 22}; ``1,000`` (groups of three, no
      space) is one thousand; ``32, 349`` is a list.
    * No rounding tolerance and no x100 matching: ``0.33`` != 1/3, ``5`` != ``500``. A decimal
      stated to >= 6 places matches the exact value it rounds or truncates
      (``0.0833333333333333`` = 1/12, ``4.123106`` = sqrt(17)). An explicit percent sign may mean
      the number or a hundredth of it (``10%`` = 10 = 0.1).
    * Exact constants are compared exactly (no ``evalf(chop=True)``): 1/2^99 != 1/2^98.
    * Sets and inequalities are equivalent both ways (``x<3`` = ``(-\infty,3)``), i.e.
      math-verify's ``allow_set_relation_comp=True``.
    * Equations follow math-verify: chains keep the last value (``x = 5+5+1 = 11``), ``x = 5``
      matches 5, and ``7 = 11a+c`` does not match ``11a+c``.
    * Inline ``$..$`` may span lines.
    * Distant boxes in a reference are not joined (see extraction above).
    * ``3245/5`` = ``649`` (mathematically equal).
    * Text answers (``\text{Evelyn}``, ``odd``) are compared as strings, case-insensitively when
      longer than one letter; ``E`` != ``E'``; base-n numerals (``204_5``) and answers with
      ellipses are compared as strings only.
    * GSM8K: exact rational comparison of the final number (units, ``$``, commas stripped).

Use `grade` only inside a worker process or where a hang is acceptable; everything else should go
through `GradingPool` / `grade_batch` / `is_correct`.

Environment variables: ``LANGENV_GRADING_WORKERS`` / ``LANGENV_GRADING_TIMEOUT_S`` (the default
pool's size and per-check limit), ``LANGENV_GRADING_PYTHON`` (the workers' interpreter, default
`sys.executable`), ``LANGENV_GRADING_FAULT_INJECTION`` (a test hook; never set it in training).
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Sequence

from langenv.grading._core import (
    KIND_PREFIXES,
    KINDS,
    STATUSES,
    Grade,
    GradingError,
    _fast,
    _g,
    detect_kind,
    extract_answer,
    grade,
)
from langenv.grading._pool import FAULT_INJECTION_ENV, PYTHON_ENV, GradingPool
from langenv.grading._rg import is_rg_kind
from langenv.grading._worker import FAULT_PREFIX

_DEFAULT: GradingPool | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pool() -> GradingPool:
    """The process-wide pool (created on first use; 2 workers, 2 s, 2 GiB; closed at exit).

    ``LANGENV_GRADING_WORKERS`` / ``LANGENV_GRADING_TIMEOUT_S`` override the defaults."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = GradingPool(
                workers=int(os.environ.get("LANGENV_GRADING_WORKERS", "2")),
                timeout_s=float(os.environ.get("LANGENV_GRADING_TIMEOUT_S", "2.0")),
            )
            atexit.register(_DEFAULT.close)
        return _DEFAULT


def _reset_lock_in_child() -> None:  # a fork while another thread held the lock must not deadlock
    global _DEFAULT_LOCK
    _DEFAULT_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)


def grade_batch(
    completions: Sequence[str],
    references: Sequence[str],
    kind: str | Sequence[str | None] | None = None,
    timeout_s: float | None = None,
) -> list[Grade]:
    """Grade completions[i] against references[i] with `default_pool`.

    ``kind`` is one kind for all, a per-item sequence, or None (detected per reference); an
    ``"rg:<dataset>"`` kind always goes to a worker (`langenv.grading._rg`);
    ``timeout_s`` (seconds) overrides the per-check limit. Returns one `Grade` per item, in order.
    An item the grader could not check is Grade(0.0, "error", cause): count those and do not use
    their reward as a score.

    Raises:
        ValueError: if the lengths differ. Never raises for model text."""
    if len(completions) != len(references):
        raise ValueError(f"grade_batch: {len(completions)} completions, {len(references)} references")
    kinds = [kind] * len(completions) if kind is None or isinstance(kind, str) else list(kind)
    if len(kinds) != len(completions):
        raise ValueError(f"grade_batch: kind sequence has {len(kinds)} items, expected {len(completions)}")
    items = list(zip(completions, references, kinds))
    return default_pool().grade_many(items, timeout_s=timeout_s) if items else []


def is_correct(completion: str, reference: str, kind: str | None = None) -> bool:
    """True iff the completion's final answer is equivalent to the reference, checked through
    `default_pool` with its hard timeout (a timeout is False).

    Raises:
        GradingError: the grader could not check at all (status "error"; the message names the
            cause, e.g. a worker that cannot start). Never raises for str inputs otherwise."""
    g = grade_batch([completion], [reference], kind)[0]
    if g.status == "error":
        raise GradingError(f"is_correct could not check the answer: {g.cause}")
    return g.reward == 1.0


__all__ = [
    "FAULT_INJECTION_ENV", "FAULT_PREFIX", "Grade", "GradingError", "GradingPool", "KIND_PREFIXES", "KINDS", "PYTHON_ENV",
    "STATUSES", "default_pool", "detect_kind", "extract_answer", "grade", "grade_batch", "is_correct", "is_rg_kind",
]
