"""Grading canary: known-correct answers pushed through the real training grading path.

Why: a grader that silently scores everything 0 trains on zeros without any error. verl PR #5635
is the example: in Ray workers math-verify's timeout error was swallowed by ``except Exception:
pass`` and every MATH score came back 0 (shared/reference/style_reliability.md, B6). The canary
catches that class of failure at the start of a run, in seconds.

What it does: it takes ``count`` problems of the environment's own split (evenly spaced over the
split, so the same ones every time), tokenises each reference solution exactly as a model response
would arrive (``env.tokenizer(env.task.target(problem), add_special_tokens=False)`` plus EOS),
and steps all of them from their initial states with ``env.step_states`` (one batched call: the
same decode, stop-string cut and `langenv.grading.grade_batch` pool call that training uses).
Every one must score 1.0.

Failures are attributed, so that the message says what is broken:

* ``tokenizer``: ``decode(encode(solution)) != solution`` (e.g. characters the tokenizer cannot
  represent, which a character-level tokenizer maps to ``<unk>``): the tokenizer, not the grader;
* ``timeout``: the grading check ran past its limit; not a wrong answer (a timed-out check is
  retried once, since a loaded machine can delay one check);
* ``grading``: the grader returned anything else for a correct, round-tripped solution
  ("incorrect", "no_answer", "invalid", or the grading path raised).

A reference solution longer than the env's response budget is stepped with the budget raised to
its length (the canary tests grading, not the budget); this is reported in ``CanaryItem.note``.

Control probes (``probes=True``, the default) are stepped in the same call, on synthetic problems
(ids ``canary/...``) with the prompt of the first chosen problem:

* a known-WRONG answer must score 0.0 with status "incorrect" (a grader that says 1.0 to everything
  is as useless as one that says 0.0);
* for a reasoning-gym kind ``"rg:<dataset>"``, a known-WRONG answer (`RG_WRONG_ANSWER`) to the first
  chosen problem (its reference is that problem's entry); the reference solutions already reach the
  workers (an ``rg:`` kind is never decided in process);
* for "math" grading only, known-correct answers that the in-process fast path cannot decide, so
  that they reach the `GradingPool`'s sympy/math-verify workers: the reference solutions of real
  problems are almost all decided without sympy (all 500 of MATH-500), so without these probes a
  broken worker pool, the place where verl #5635 lost every MATH score, would go unnoticed. Each
  probe is checked to need a worker (``grading._fast`` returns None for it).

Use::

    from langenv.canary import check_canary
    check_canary(env)            # raises RuntimeError naming the failing problems; returns the result
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from langenv import grading
from langenv.state import EnvState
from langenv.tasks.base import Problem

_log = logging.getLogger(__name__)

#: Default number of problems checked.
DEFAULT_COUNT = 20


@dataclass(frozen=True)
class CanaryItem:
    """One problem's canary outcome.

    Attributes:
        problem_id: the problem's id.
        reward: the reward the env gave the reference solution (1.0 expected).
        status: the env's status ("correct" expected; "timeout", "incorrect", ..., "truncated",
            "running" if the solution did not end the episode, or "error" if the grading path raised).
        extracted: the final answer `langenv.grading.extract_answer` finds in the graded text
            (None when there is none).
        reference: the problem's reference answer given to the grader.
        round_trip: True when the tokenizer decodes the encoded solution back to the same text.
        unrepresentable: characters of the solution missing from the decoded text (sorted).
        note: extra detail (budget raised, first differing character, exception text).
        expected: the reward a correct grader gives (1.0; 0.0 for a known-wrong control probe, which
            must also have status "incorrect").
    """

    problem_id: str
    reward: float
    status: str
    extracted: str | None
    reference: str
    round_trip: bool = True
    unrepresentable: tuple[str, ...] = ()
    note: str = ""
    expected: float = 1.0

    @property
    def ok(self) -> bool:
        if self.expected == 1.0:
            return self.reward == 1.0
        return self.reward == self.expected and self.status == "incorrect"

    @property
    def cause(self) -> str:
        """"ok", "tokenizer", "timeout" or "grading" (see the module docstring)."""
        if self.ok:
            return "ok"
        if not self.round_trip:
            return "tokenizer"
        if self.status == "timeout":
            return "timeout"
        return "grading"


@dataclass(frozen=True)
class CanaryResult:
    """All items of one canary run, plus its cost.

    Attributes:
        task: the task name.
        split: the env's split the problems came from.
        items: one `CanaryItem` per problem, in split order.
        seconds: wall-clock time of the whole run (tokenising, stepping and grading).
        retried: ids of problems whose first check timed out and were graded again.
    """

    task: str
    split: str
    items: tuple[CanaryItem, ...]
    seconds: float
    retried: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return all(item.ok for item in self.items)

    @property
    def failures(self) -> tuple[CanaryItem, ...]:
        return tuple(item for item in self.items if not item.ok)

    @property
    def not_round_tripped(self) -> tuple[CanaryItem, ...]:
        """Items whose solution the tokenizer does not decode back exactly (whatever their score)."""
        return tuple(item for item in self.items if not item.round_trip)

    def summary(self) -> str:
        """One line, then one line per failure, naming its cause, status and extracted answer."""
        head = (f"grading canary {self.task}/{self.split}: {len(self.items) - len(self.failures)}/"
                f"{len(self.items)} checks as expected (reference solutions and control probes score 1.0, "
                f"known-wrong probes 0.0) in {self.seconds:.2f} s")
        if self.not_round_tripped:
            lost = sorted({c for it in self.not_round_tripped for c in it.unrepresentable})
            head += (f"; {len(self.not_round_tripped)} did not round-trip through the tokenizer "
                     f"(characters lost: {lost[:20]}{' ...' if len(lost) > 20 else ''})")
        if self.retried:
            head += f"; {len(self.retried)} timed out once and were graded again"
        lines = [head]
        for it in self.failures:
            if it.cause == "tokenizer":
                why = (f"TOKENIZER cannot round-trip the solution (characters lost: "
                       f"{list(it.unrepresentable) or 'none; text differs'}); not a grading failure")
            elif it.cause == "timeout":
                why = "grading TIMED OUT (twice); not a wrong answer: the check ran past the pool's limit"
            elif it.expected != 1.0:
                why = f"GRADER gave a known-WRONG answer reward {it.reward} / status {it.status!r} (expected 0.0, 'incorrect')"
            else:
                why = "GRADER scored a known-correct answer below 1.0"
            lines.append(f"  {it.problem_id}: status={it.status!r} reward={it.reward} extracted={it.extracted!r} "
                         f"reference={it.reference!r}: {why}" + (f" [{it.note}]" if it.note else ""))
        return "\n".join(lines)


#: Control probes: (problem answer, response text, expected reward), per grading kind. The
#: "math" positives are equivalent forms that need sympy (checked at run time with `grading._fast`).
PROBES: dict[str, tuple[tuple[str, str, float], ...]] = {
    "gsm8k": (("7", "\n#### 8", 0.0),),
    "gsm8k_strict": (("7", "\n#### 8", 0.0),),
    "math": (
        ("x^2+2x+1", "\nSo the answer is $\\boxed{(x+1)^2}$.", 1.0),
        ("\\frac{\\sqrt{3}}{3}", "\nSo the answer is $\\boxed{\\frac{1}{\\sqrt{3}}}$.", 1.0),
        ("x^2+2x+2", "\nSo the answer is $\\boxed{(x+1)^2}$.", 0.0),
    ),
}


#: The known-wrong control probe of the ``rg:`` kinds: no reasoning-gym answer is this string.
RG_WRONG_ANSWER = "\n#### langenv canary: a wrong answer"


def _pick(n: int, count: int) -> list[int]:
    """``count`` indices evenly spaced over ``range(n)`` (all of them when count >= n)."""
    if count >= n:
        return list(range(n))
    return [i * n // count for i in range(count)]


def _first_difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at character {i}: {a[i:i + 12]!r} vs {b[i:i + 12]!r}"


def _step(env: Any, states: list[EnvState], chunks: list[list[int]]) -> tuple[list[float], list[str], list[str], list[str], str]:
    """env.step_states as (rewards, statuses, texts, per-item grading-error causes, call error),
    with an exception turned into status "error" for every item."""
    try:
        results = env.step_states(states, chunks)
    except Exception as exc:  # the grading path itself is broken: report, do not hide
        msg = f"env.step_states raised {type(exc).__name__}: {exc}"
        return [0.0] * len(states), ["error"] * len(states), [""] * len(states), [""] * len(states), msg
    return ([r.reward for r in results], [r.status for r in results], [r.text for r in results],
            [r.info.get("grading_error", "") for r in results], "")


def _probe_problems(env: Any, first: Problem) -> list[tuple[Problem, str, float, str]]:
    """The control probes for the env's grading kind: (problem, response text, expected, note)."""
    kind = env.task.grading_kind
    out = []
    probes = PROBES.get(kind, ())
    if grading.is_rg_kind(kind):
        probes = ((first.answer, RG_WRONG_ANSWER, 0.0),)
    for j, (answer, text, expected) in enumerate(probes):
        problem = Problem(id=f"canary/{kind}/{j}", question=first.question, solution=text.lstrip("\n"),
                          answer=answer)
        note = "control probe"
        if expected == 1.0:
            decided = grading._fast(text, answer, kind)
            note += ", needs a grading worker" if decided is None else f", decided in process ({decided.status})"
        out.append((problem, text, expected, note))
    return out


def run_canary(env: Any, count: int = DEFAULT_COUNT, probes: bool = True) -> CanaryResult:
    """Grade ``count`` reference solutions of ``env``'s split (and the control probes) through
    ``env.step_states``.

    Args:
        env: a `langenv.LanguageEnv` (its task, tokenizer, split, budget and grading timeout are used
            as they are; a Gymnasium wrapper is unwrapped).
        count: problems to check (>= 1), evenly spaced over the split.
        probes: also step the control probes of `PROBES` for the task's grading kind.

    Returns:
        A `CanaryResult` (reference solutions first, then probes); it never raises for a grading
        failure (see `check_canary`).

    Raises:
        ValueError: if ``count`` < 1.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count: expected an int >= 1, got {count!r}")
    env = getattr(env, "unwrapped", env)
    start = time.perf_counter()
    tok, task = env.tokenizer, env.task
    eos = int(tok.eos_token_id)
    problems = [env.problems[i] for i in _pick(len(env.problems), count)]
    cases = [(p, task.target(p), 1.0, "") for p in problems]
    if probes:
        cases += _probe_problems(env, problems[0])
    states, chunks, meta = [], [], []
    for problem, text, expected, note in cases:
        ids = list(tok(text, add_special_tokens=False).input_ids)
        decoded = tok.decode(ids, skip_special_tokens=True)
        notes = [note] if note else []
        round_trip = decoded == text
        lost: tuple[str, ...] = ()
        if not round_trip:
            lost = tuple(sorted(set(text) - set(decoded)))
            notes.append(_first_difference(text, decoded))
        chunk = ids + [eos]
        try:
            state = env.initial_state(problem)
        except ValueError as exc:  # the prompt does not fit max_context: grading is still testable
            notes.append(f"prompt does not fit the context ({exc}); stepped without the context cap")
            state = EnvState(problem=problem, prompt_ids=env.prompt_ids(problem), max_new_tokens=len(chunk),
                             eos_token_id=eos)
        if len(chunk) > state.max_new_tokens:
            notes.append(f"response is {len(chunk)} tokens with EOS > budget {state.max_new_tokens}; budget raised")
            state = replace(state, max_new_tokens=len(chunk))
        states.append(state)
        chunks.append(chunk)
        meta.append((round_trip, lost, notes))

    rewards, statuses, texts, causes, error = _step(env, states, chunks)
    retry = [i for i, s in enumerate(statuses) if s == "timeout"]
    if retry:  # a loaded machine can delay one check; a systematic timeout times out again
        r2, s2, t2, c2, err2 = _step(env, [states[i] for i in retry], [chunks[i] for i in retry])
        for j, i in enumerate(retry):
            rewards[i], statuses[i], texts[i], causes[i] = r2[j], s2[j], t2[j], c2[j]
        error = error or err2

    kind = task.grading_kind
    items = []
    for (problem, _, expected, _), reward, status, text, cause, (round_trip, lost, notes) in zip(
        cases, rewards, statuses, texts, causes, meta
    ):
        if status == "error" and (error or cause):
            notes = notes + [error or f"grading error: {cause}"]
        items.append(CanaryItem(
            problem_id=problem.id, reward=float(reward), status=status,
            extracted=grading.extract_answer(text, kind) if text else None, reference=problem.answer,
            round_trip=round_trip, unrepresentable=lost, note="; ".join(notes), expected=expected,
        ))
    return CanaryResult(task=task.name, split=env.split, items=tuple(items), seconds=time.perf_counter() - start,
                        retried=tuple(cases[i][0].id for i in retry))


def check_canary(env: Any, count: int = DEFAULT_COUNT, probes: bool = True) -> CanaryResult:
    """`run_canary`, raising when any reference solution or positive probe scores below 1.0, or a
    known-wrong probe is not graded 0.0 "incorrect".

    Returns:
        The passing `CanaryResult` (its ``seconds`` is the cost).

    Raises:
        RuntimeError: naming every failing problem id with its status, extracted answer and cause
            (tokenizer, timeout or grading); see `CanaryResult.summary`.
    """
    result = run_canary(env, count, probes)
    if result.passed and (result.not_round_tripped or result.retried):
        _log.warning("%s", result.summary())
    if not result.passed:
        causes = sorted({it.cause for it in result.failures})
        raise RuntimeError(
            f"grading canary FAILED ({', '.join(causes)}): answers whose grade is known (reference solutions: "
            f"1.0) were graded otherwise through env.step_states; training on these rewards would be training "
            f"on noise.\n{result.summary()}"
        )
    return result


__all__ = ["DEFAULT_COUNT", "PROBES", "RG_WRONG_ANSWER", "CanaryItem", "CanaryResult", "check_canary", "run_canary"]
