"""Multi-step integer arithmetic: a procedurally generated task where learning shows on a CPU.

A problem starts from a number and applies a chain of operations, one at a time, to the running
result; the solution spells out one operation per line, in GSM8K's answer format::

    question: Start with 7. Add 5, multiply by 3, then subtract 4. What is the result?
    solution: 7 + 5 = 12
              12 * 3 = 36
              36 - 4 = 32
              #### 32

There is no operator precedence to get wrong: each line applies exactly one operation to the
result of the line before. Prompt, SFT target (``"\\n"`` + solution), stop strings, grading
("gsm8k_strict": exact comparison of the ``#### N`` number, 0 without one) and steps (one per line, the ``####`` line
merged into the last) are GSM8K's, so every algorithm runs on it unchanged; a response of a
problem with ``k`` operations has ``k`` steps.

Generation rules (the difficulty knobs are `ArithmeticTask`'s arguments):

- the number of operations is uniform in ``[min_ops, max_ops]`` (a draw rejected as a duplicate or
  a held-out question is redrawn with the same number of operations, so the mix stays uniform);
  the start value and every operand are integers in ``[min_operand, max_operand]``;
- at each step the operator is uniform among those of ``operators`` that are valid on the running
  result, then the operand is uniform among the valid operands of that operator;
- intermediate results are never negative: ``-`` only subtracts operands ``<=`` the running result
  (a non-negative chain is friendlier to a tiny model: no minus signs to track). A result of 0 is
  allowed;
- ``/`` (off by default) only divides exactly, by a non-zero operand that divides the running
  result, so every result is an integer;
- a chain that reaches a point where no operator is valid (possible only when ``operators`` has
  neither ``+`` nor ``*``) is drawn again.

Splits are generated deterministically from ``seed`` and the split name: split ``i`` (train 0,
validation 1, test 2) draws from ``random.Random`` seeded with
``numpy.random.SeedSequence([seed, i])``. Test is drawn first, with distinct questions; validation
has distinct questions none of which is in test; train holds no test or validation question but
may repeat a question (the space of short chains is small: about 5,000 two-operation questions with
the defaults, so distinct train questions would skew the mix of lengths). Changing ``train_size``
therefore never changes the test set. Splits are cached per set of knobs.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import numpy as np

from langenv import steps
from langenv.tasks.base import VINEPPO_PROMPT, VINEPPO_STOP, Problem

#: Splits, in the order of their seed index.
SPLITS = ("train", "validation", "test")
#: Operators the task knows, in canonical order.
ALL_OPERATORS = "+-*/"

_WORDS = {"+": "add {b}", "-": "subtract {b}", "*": "multiply by {b}", "/": "divide by {b}"}
# A chain is redrawn when it gets stuck; this many consecutive failures means no chain exists.
_MAX_STUCK = 1000


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _canonical_operators(operators: Any) -> str:
    if isinstance(operators, (str, Iterable)):
        chars = list(operators)
    else:
        raise ValueError(f"operators: expected a string of operators from {ALL_OPERATORS!r}, got {operators!r}")
    bad = [c for c in chars if not (isinstance(c, str) and c in ALL_OPERATORS)]
    if bad or not chars or len(set(chars)) != len(chars):
        raise ValueError(
            f"operators: expected a non-empty string of distinct operators from {ALL_OPERATORS!r}, "
            f"got {operators!r}"
        )
    return "".join(c for c in ALL_OPERATORS if c in chars)


class ArithmeticTask:
    """Multi-step integer arithmetic with one operation per solution line; graded like GSM8K.

    Args (keyword-only):
        min_ops, max_ops: number of operations per problem, uniform in ``[min_ops, max_ops]``
            (``1 <= min_ops <= max_ops``). Default 2 and 4.
        min_operand, max_operand: range of the start value and of every operand
            (``0 <= min_operand <= max_operand``). Default 1 and 9.
        operators: the allowed operators, a non-empty string of distinct characters from
            ``"+-*/"`` (order does not matter). Default ``"+-*"``. ``/`` divides exactly only;
            ``-`` never makes a result negative (see the module docstring).
        seed: seeds the generation of every split (int >= 0). Default 0.
        train_size, validation_size, test_size: problems per split (ints >= 1). Default 20,000,
            500 and 2,000.
        lenient_grading: False (default): as GSM8K in the VinePPO paper, a response without a
            ``#### N`` line scores 0 (grading kind "gsm8k_strict"); True: the lenient "gsm8k" kind
            (also "the answer is N", a box or the last number; see `langenv.grading`). Not a
            generation knob: the problems do not depend on it.

    Problems have ids ``"arithmetic/<split>/<i>"`` and ``meta == (("num_ops", "<k>"),)``.

    Raises:
        ValueError: on a bad knob, naming the argument, the expected and the actual value. `load`
            raises ValueError on an unknown split, and when the knobs admit too few distinct
            questions to fill a split (e.g. ``min_ops=max_ops=1`` with ``test_size=2000``).
    """

    name = "arithmetic"
    grading_kind = "gsm8k_strict"
    stop_strings = VINEPPO_STOP

    def __init__(
        self,
        *,
        min_ops: int = 2,
        max_ops: int = 4,
        min_operand: int = 1,
        max_operand: int = 9,
        operators: str = "+-*",
        seed: int = 0,
        train_size: int = 20000,
        validation_size: int = 500,
        test_size: int = 2000,
        lenient_grading: bool = False,
    ) -> None:
        self.grading_kind = "gsm8k" if lenient_grading else "gsm8k_strict"
        self.min_ops = _check_int("min_ops", min_ops, 1)
        self.max_ops = _check_int("max_ops", max_ops, self.min_ops)
        self.min_operand = _check_int("min_operand", min_operand, 0)
        self.max_operand = _check_int("max_operand", max_operand, self.min_operand)
        self.operators = _canonical_operators(operators)
        self.seed = _check_int("seed", seed, 0)
        self.train_size = _check_int("train_size", train_size, 1)
        self.validation_size = _check_int("validation_size", validation_size, 1)
        self.test_size = _check_int("test_size", test_size, 1)

    @property
    def knobs(self) -> tuple:
        """All generation knobs, in constructor order (the cache key of the splits)."""
        return (self.min_ops, self.max_ops, self.min_operand, self.max_operand, self.operators,
                self.seed, self.train_size, self.validation_size, self.test_size)

    def __repr__(self) -> str:
        names = ("min_ops", "max_ops", "min_operand", "max_operand", "operators", "seed",
                 "train_size", "validation_size", "test_size")
        lenient = ", lenient_grading=True" if self.grading_kind == "gsm8k" else ""
        return "ArithmeticTask(" + ", ".join(f"{n}={v!r}" for n, v in zip(names, self.knobs)) + lenient + ")"

    def load(self, split: str) -> list[Problem]:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {', '.join(map(repr, SPLITS))}, got {split!r}")
        return _splits(self.knobs)[split]

    def prompt(self, problem: Problem) -> str:
        return VINEPPO_PROMPT.format(problem=problem.question)

    def target(self, problem: Problem) -> str:
        return "\n" + problem.solution

    def split_steps(self, response: str) -> list[str]:
        return steps.split_gsm8k(response)


def apply_op(a: int, op: str, b: int) -> int:
    """``a op b`` for one of ``"+-*/"`` (``/`` must divide exactly). Raises ValueError otherwise."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0 or a % b:
            raise ValueError(f"{a} / {b} is not an exact division")
        return a // b
    raise ValueError(f"op: expected one of {ALL_OPERATORS!r}, got {op!r}")


def format_problem(start: int, chain: list[tuple[str, int]]) -> tuple[str, str, int]:
    """Question, solution and answer of a chain ``[(op, operand), ...]`` applied to ``start``."""
    phrases = [_WORDS[op].format(b=b) for op, b in chain]
    phrases[0] = phrases[0][0].upper() + phrases[0][1:]
    if len(phrases) == 1:
        body = phrases[0]
    else:
        body = ", ".join(phrases[:-1]) + ", then " + phrases[-1]
    question = f"Start with {start}. {body}. What is the result?"
    lines, value = [], start
    for op, b in chain:
        new = apply_op(value, op, b)
        lines.append(f"{value} {op} {b} = {new}")
        value = new
    lines.append(f"#### {value}")
    return question, "\n".join(lines), value


def _draw_chain(rng: random.Random, knobs: tuple, n_ops: int) -> tuple[int, list[tuple[str, int]]]:
    lo, hi, operators = knobs[2:5]
    operands = range(lo, hi + 1)
    for _ in range(_MAX_STUCK):
        value = rng.randint(lo, hi)
        start, chain = value, []
        while len(chain) < n_ops:
            valid = {}
            for op in operators:
                if op == "+" or op == "*":
                    valid[op] = operands
                elif op == "-":
                    if value >= lo:
                        valid[op] = range(lo, min(hi, value) + 1)
                elif op == "/":
                    divisors = [b for b in operands if b and value % b == 0]
                    if divisors:
                        valid[op] = divisors
            if not valid:
                break
            op = rng.choice(list(valid))
            b = rng.choice(valid[op])
            chain.append((op, b))
            value = apply_op(value, op, b)
        if len(chain) == n_ops:
            return start, chain
    raise ValueError(
        f"operators: no chain of {n_ops} operations with operands in [{lo}, {hi}] could be built "
        f"from {operators!r} without negative or fractional results"
    )


def _generate(knobs: tuple, split: str, size: int, exclude: set[str], distinct: bool) -> list[Problem]:
    seed = knobs[5]
    state = np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(2, np.uint64)
    rng = random.Random(int(state[0]) << 64 | int(state[1]))
    seen: set[str] = set()
    problems: list[Problem] = []
    attempts, budget = 0, 20 * size + 1000
    n_ops = None
    while len(problems) < size:
        if n_ops is None:  # a rejected draw is redrawn with the same length: the mix stays uniform
            n_ops = rng.randint(knobs[0], knobs[1])
        attempts += 1
        if attempts > budget:
            raise ValueError(
                f"{split}_size: the knobs admit too few distinct questions to fill split {split!r}: "
                f"got {len(problems)} of {size} after {budget} draws (test and validation questions "
                f"are distinct and disjoint from train); lower test_size/validation_size or widen "
                f"min_ops/max_ops, min_operand/max_operand or operators"
            )
        start, chain = _draw_chain(rng, knobs, n_ops)
        question, solution, answer = format_problem(start, chain)
        if question in exclude or (distinct and question in seen):
            continue
        n_ops = None
        seen.add(question)
        problems.append(Problem(
            id=f"arithmetic/{split}/{len(problems)}",
            question=question,
            solution=solution,
            answer=str(answer),
            meta=(("num_ops", str(len(chain))),),
        ))
    return problems


@lru_cache(maxsize=8)
def _splits(knobs: tuple) -> dict[str, list[Problem]]:
    train_size, validation_size, test_size = knobs[6:9]
    test = _generate(knobs, "test", test_size, set(), distinct=True)
    held_out = {p.question for p in test}
    validation = _generate(knobs, "validation", validation_size, held_out, distinct=True)
    held_out |= {p.question for p in validation}
    train = _generate(knobs, "train", train_size, held_out, distinct=False)
    return {"train": train, "validation": validation, "test": test}
