r"""Answer checking for GSM8K and MATH: extraction, equivalence, and a killable worker pool.

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
               more than 600 characters), the reference has no extractable answer, an input was
               not a str, or a worker crashed. Identical answers are "correct" before any guard;
               integers longer than 4,000 digits are only ever compared as strings.

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
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import os
import re
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import ClassVar, Sequence

from langenv import _grading_extract as X
from langenv import _grading_text as T

_log = logging.getLogger(__name__)
STATUSES: tuple[str, ...] = ("correct", "incorrect", "no_answer", "timeout", "invalid")
KINDS: tuple[str, ...] = ("gsm8k", "math")


@dataclass(frozen=True)
class Grade:
    """Result of one check: ``reward`` is 1.0 for "correct", else 0.0; ``status`` is in STATUSES."""

    reward: float
    status: str


_CORRECT = Grade(1.0, "correct")


def _g(status: str) -> Grade:
    return _CORRECT if status == "correct" else Grade(0.0, status)


def detect_kind(reference: str) -> str:
    """"gsm8k" if the reference contains a GSM8K ``#### N`` line, else "math". Never raises for a
    str; a bare number reference is "math" (the math rules include exact numeric comparison)."""
    return X.detect_kind(reference)


def extract_answer(text: str, kind: str) -> str | None:
    """The final answer of a completion or of a reference (solution, rationale or bare answer),
    as a raw string, or None when there is none. ``kind`` is "gsm8k" or "math" (the rules are the
    same today; the argument keeps the door open for per-task rules). Never raises for a str."""
    return X.extract(text, kind)


# --------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------
def _gsm8k_number(ans: str) -> T.Num | None:
    num = T.parse_number(ans)
    if num is not None:
        return num
    s = T.clean(ans)
    if "=" in s:
        num = T.parse_number(s.rsplit("=", 1)[1])
        if num is not None:
            return num
    last = X.last_number(s)
    return T.parse_number(last[1]) if last else None


def _texty(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z][A-Za-z' ]*", s))


_ASSIGNMENT = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=[^=]*$")  # "k = 1" (one '=')
_STRING_ONLY = re.compile(r"\\[lc]?dots|\.\.\.|(?<![A-Za-z_\d])\d+_\{?\d+\}?")


def _elem_equal(gold: str, pred: str, symbolic: bool) -> bool:
    """One element against one element. Raises T.NeedSympy (fast mode) or T.Refused."""
    cg, cp = T.canon(gold), T.canon(pred)
    if cg == cp:
        return bool(cg)
    if not cg or not cp:
        return False
    lg, lp = T.clean(gold), T.clean(pred)
    if _texty(lg) and _texty(lp):
        if max(len(lg), len(lp)) > 1 and "'" not in lg + lp:
            return " ".join(lg.lower().split()) == " ".join(lp.lower().split())
        return False
    if (_texty(lg) and len(lg) > 2) or (_texty(lp) and len(lp) > 2):
        return False  # a word against math
    if _STRING_ONLY.search(lg) or _STRING_ONLY.search(lp):
        return False
    ng, np_ = T.parse_number(gold), T.parse_number(pred)
    if ng is not None and np_ is not None:
        return T.numbers_equal(ng, np_)
    # a number against "x = <number>": math-verify compares the right-hand sides; so do we
    if ng is not None and "=" in lp:
        rhs = T.parse_number(lp.rsplit("=", 1)[1])
        if rhs is not None:
            return T.numbers_equal(ng, rhs)
    if np_ is not None and _ASSIGNMENT.match(lg):
        rhs = T.parse_number(lg.split("=", 1)[1])
        if rhs is not None:
            return T.numbers_equal(rhs, np_)
    T.check_safe(lg)
    T.check_safe(lp)
    if not symbolic:
        raise T.NeedSympy
    from langenv import _grading_sym

    return _grading_sym.equal(lg, lp, ng, np_)


def _same_set(golds: list[str], preds: list[str], symbolic: bool) -> bool:
    """Set equality under _elem_equal: every reference element equals some predicted element and
    every predicted element equals some reference element (so an extra or hedged element fails,
    and ``\\boxed{x+11}`` or ``\\boxed{11+x}`` counts once). Identical pairs are paired first."""
    cache: dict[tuple[int, int], bool] = {}

    def eq(i: int, j: int) -> bool:
        if (i, j) not in cache:
            cache[(i, j)] = _elem_equal(golds[i], preds[j], symbolic)
        return cache[(i, j)]

    cg, cp = [T.canon(g) for g in golds], [T.canon(p) for p in preds]
    gold_ok = [c in cp for c in cg]
    pred_ok = [c in cg for c in cp]
    for i in (i for i, ok in enumerate(gold_ok) if not ok):
        order = sorted(range(len(preds)), key=lambda j: pred_ok[j])  # unmatched preds first
        j = next((j for j in order if eq(i, j)), None)
        if j is None:
            return False
        pred_ok[j] = True
    return all(ok or any(eq(i, j) for i in range(len(golds))) for j, ok in enumerate(pred_ok))


def _compare(gold: str, pred: str, kind: str, symbolic: bool) -> str:
    if kind == "gsm8k":
        gnum = _gsm8k_number(gold)
        if gnum is not None:
            pnum = _gsm8k_number(pred)
            return "correct" if pnum is not None and T.numbers_equal(gnum, pnum) else "incorrect"
    if T.canon(gold) == T.canon(pred):
        return "correct"
    golds, preds = T.elements(gold), T.elements(pred)
    if not golds:
        return "invalid"
    if not preds:
        return "incorrect"
    if len(golds) > T.MAX_ELEMENTS or len(preds) > T.MAX_ELEMENTS:
        return "incorrect"
    if len(golds) != len(preds) and (
        (len(golds) == 1 and T.is_container(golds[0])) or (len(preds) == 1 and T.is_container(preds[0]))
    ):  # a tuple/interval/set against a bare list: compare the whole answers (ordered for tuples)
        return "correct" if _elem_equal(gold, pred, symbolic) else "incorrect"
    return "correct" if _same_set(golds, preds, symbolic) else "incorrect"


def _grade(completion: str, reference: str, kind: str | None, symbolic: bool) -> Grade:
    if not isinstance(completion, str) or not isinstance(reference, str):
        return _g("invalid")
    if kind not in KINDS:
        kind = detect_kind(reference)
    gold = X.extract(reference, kind)
    if not gold or not T.canon(gold):
        return _g("invalid")
    pred = X.extract(completion, kind)
    if not pred or not T.canon(pred):
        return _g("no_answer")
    try:
        return _g(_compare(gold, pred, kind, symbolic))
    except T.Refused:
        return _g("invalid")


def grade(completion: str, reference: str, kind: str | None = None) -> Grade:
    """Grade one completion in this process (see the module docstring for the rules/statuses).

    ``kind`` is "gsm8k" or "math"; None (or anything else) means `detect_kind(reference)`.
    Never raises for str inputs (a non-str input is "invalid"). math-verify's 1 s alarms run only
    in the main thread; in another thread a symbolic check can hang, and in any thread a C-level
    blow-up is not interruptible, so use it inside a worker or where hangs are acceptable."""
    try:
        return _grade(completion, reference, kind, symbolic=True)
    except Exception:  # includes RecursionError and MemoryError (RLIMIT_AS in a worker)
        return _g("invalid")
    except BaseException as exc:  # math-verify's TimeoutException subclasses BaseException
        if type(exc).__name__ == "TimeoutException":
            return _g("timeout")
        raise


def _fast(completion: str, reference: str, kind: str | None) -> Grade | None:
    """The grade if it needs no sympy (strings, exact numbers, guards), else None. Never raises."""
    try:
        return _grade(completion, reference, kind, symbolic=False)
    except T.NeedSympy:
        return None
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# worker pool
# --------------------------------------------------------------------------------------------
def _mp_context():
    """forkserver (workers fork from a server that has math-verify imported, so a replacement
    after a kill starts in milliseconds) where available, else spawn; never fork."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["langenv._grading_sym"])
        return ctx
    return multiprocessing.get_context("spawn")


#: TEST HOOK (see `langenv._grading_worker.inject_fault`): set this environment variable to "1"
#: before a `GradingPool` is constructed to let that pool's workers act on references that start
#: with `FAULT_PREFIX` (hang, crash, exhaust memory, ...). Off by default; never set it in training.
FAULT_INJECTION_ENV = "LANGENV_GRADING_FAULT_INJECTION"
#: TEST HOOK: first line of a fault-injecting reference, ``__langenv_fault__:<fault>[:<pid file>]``,
#: followed by a newline and the real reference (see `langenv._grading_worker.FAULTS`).
FAULT_PREFIX = "__langenv_fault__:"


class GradingPool:
    """Persistent pool of killable grading workers (pebble, forkserver/spawn context).

    Args:
        workers: worker processes (started lazily, on the first check that needs sympy).
        timeout_s: wall-clock limit per check (seconds); an overrunning worker is killed (pebble
            stops the process) and replaced, and the check is Grade(0, "timeout").
        memory_mb: RLIMIT_AS of each worker (MiB of address space). A check that hits it gets a
            MemoryError, caught in the worker, and is Grade(0, "invalid"); a worker killed by it
            (an allocation failing in C) is replaced and its check is "invalid" too.

    `grade_many` decides string/numeric checks in process (no IPC) and sends the rest to the
    workers. It never raises for model text: an overrun is Grade(0, "timeout"), a crashed or lost
    worker Grade(0, "invalid"). As a last line of defence against a wedged pool (which pebble's
    per-check timeout should never allow), a call waits at most ``stall_deadline_s(n)`` seconds in
    all; past that the remaining checks are "timeout" and the pool is restarted.
    Use as a context manager or call `close`. ``stats`` counts checks decided in process ("fast"),
    sent to workers ("pool"), timeouts, crashes (worker died), errors (exception in the worker or
    in scheduling) and stalls (checks abandoned at the call deadline).

    Workers start with forkserver (spawn where unavailable), never fork, so the pool is safe in a
    process holding CUDA or threads; like any spawn/forkserver pool, a script that uses it must
    guard its entry point with ``if __name__ == "__main__":``.

    Test hook: when the environment variable `FAULT_INJECTION_ENV` is "1" at construction, the
    pool's workers honour fault-injecting references (`FAULT_PREFIX`); otherwise such a reference is
    just text (it has no extractable answer, so it grades "invalid").
    """

    #: seconds allowed per round of checks on top of ``timeout_s`` for killing and replacing a
    #: worker (forkserver forks a warm worker in ~50 ms; spawn re-imports sympy, ~2-5 s on 2 cores).
    RESTART_ALLOWANCE_S: ClassVar[dict[str, float]] = {"forkserver": 1.0, "spawn": 6.0}

    def __init__(self, workers: int = 2, timeout_s: float = 2.0, memory_mb: int = 2048):
        if workers < 1 or timeout_s <= 0 or memory_mb < 256:
            raise ValueError("GradingPool: need workers >= 1, timeout_s > 0, memory_mb >= 256")
        self.workers, self.timeout_s, self.memory_mb = workers, float(timeout_s), memory_mb
        #: fixed slack (seconds) of the whole-call deadline: pool start-up (forkserver start and the
        #: sympy/math-verify import, ~1-3 s) with room for a loaded machine.
        self.stall_slack_s = 60.0
        self.fault_injection = os.environ.get(FAULT_INJECTION_ENV) == "1"
        if self.fault_injection:
            _log.warning("GradingPool: %s=1, fault injection (a test hook) is ON", FAULT_INJECTION_ENV)
        self._pool = None
        self._method = _mp_context().get_start_method()
        self._lock = threading.Lock()
        self.stats = {"fast": 0, "pool": 0, "timeout": 0, "crash": 0, "error": 0, "stalled": 0}

    def _ensure(self, restart: bool = False):
        with self._lock:
            if restart and self._pool is not None:
                self._pool.stop()
                self._pool = None
            if self._pool is None:
                from pebble import ProcessPool

                from langenv import _grading_worker as W

                self._pool = ProcessPool(
                    max_workers=self.workers,
                    initializer=W.init,
                    initargs=(self.memory_mb, self.fault_injection),
                    context=_mp_context(),
                )
            return self._pool

    def _schedule(self, item: tuple[str, str, str | None], timeout: float):
        from langenv import _grading_worker as W

        for restart in (False, True):
            try:
                return self._ensure(restart).schedule(W.run, args=item, timeout=timeout)
            except Exception as exc:  # a broken/stopped pool: restart it once
                _log.warning("GradingPool: scheduling failed (%r)%s", exc, "" if restart else "; restarting")
        return None

    def stall_deadline_s(self, n_checks: int, timeout_s: float | None = None) -> float:
        """Upper bound (seconds) on one `grade_many` call that sends ``n_checks`` to the workers:
        rounds x (per-check timeout + restart allowance) + `stall_slack_s`, with
        rounds = ceil(n_checks / workers) + 1."""
        timeout = float(timeout_s) if timeout_s else self.timeout_s
        rounds = math.ceil(n_checks / self.workers) + 1
        return rounds * (timeout + self.RESTART_ALLOWANCE_S.get(self._method, 6.0)) + self.stall_slack_s

    def _takes_pool_path(self, reference) -> bool:
        return self.fault_injection and isinstance(reference, str) and reference.startswith(FAULT_PREFIX)

    def grade_many(
        self, items: Sequence[tuple[str, str, str | None]], timeout_s: float | None = None
    ) -> list[Grade]:
        """Grade (completion, reference, kind) triples; one Grade per item, in order.

        ``timeout_s`` overrides the pool's per-check limit (seconds) for this call."""
        timeout = float(timeout_s) if timeout_s else self.timeout_s
        results: list[Grade | None] = []
        pending: list[tuple[int, tuple]] = []
        for i, item in enumerate(items):
            c, r, k = (tuple(item) + (None,))[:3]
            g = None if self._takes_pool_path(r) else _fast(c, r, k)
            results.append(g)
            if g is None:  # only the capped text travels (extraction never looks further)
                r_sent = r if self._takes_pool_path(r) else X.cap(r)
                pending.append((i, (X.cap(c), r_sent, k)))
        self.stats["fast"] += len(results) - len(pending)
        self.stats["pool"] += len(pending)
        if not pending:
            return results  # type: ignore[return-value]
        deadline = time.monotonic() + self.stall_deadline_s(len(pending), timeout)
        futures = [(i, self._schedule(item, timeout)) for i, item in pending]
        from pebble import ProcessExpired

        stalled = False
        for i, fut in futures:
            if fut is None:
                self.stats["error"] += 1
                results[i] = _g("invalid")
                continue
            if stalled:
                fut.cancel()
                self.stats["stalled"] += 1
                results[i] = _g("timeout")
                continue
            try:
                reward, status = fut.result(timeout=max(deadline - time.monotonic(), 0.0))
                results[i] = Grade(float(reward), status)
            except (FutureTimeout, TimeoutError):
                if fut.done():  # pebble's per-check timeout: the worker was killed and replaced
                    self.stats["timeout"] += 1
                else:  # the whole call ran past its deadline: the pool is wedged
                    stalled = True
                    fut.cancel()
                    self.stats["stalled"] += 1
                    _log.error("GradingPool: no result within the call deadline; abandoning the "
                               "remaining checks as 'timeout' and restarting the pool")
                results[i] = _g("timeout")
            except ProcessExpired as exc:
                self.stats["crash"] += 1
                _log.warning("GradingPool: worker died (%s); graded invalid", exc)
                results[i] = _g("invalid")
            except Exception as exc:
                self.stats["error"] += 1
                _log.warning("GradingPool: check failed (%r); graded invalid", exc)
                results[i] = _g("invalid")
        if stalled:
            try:
                self._ensure(restart=True)
            except Exception as exc:  # the next call retries through _schedule
                _log.warning("GradingPool: restart after a stall failed (%r)", exc)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the workers (idempotent). The pool restarts if used again."""
        with self._lock:
            if self._pool is not None:
                self._pool.stop()
                try:
                    self._pool.join(timeout=5)
                except Exception:
                    pass
                self._pool = None

    def __enter__(self) -> "GradingPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def grade_batch(
    completions: Sequence[str],
    references: Sequence[str],
    kind: str | Sequence[str | None] | None = None,
    timeout_s: float | None = None,
) -> list[Grade]:
    """Grade completions[i] against references[i] with `default_pool`.

    ``kind`` is one kind for all, a per-item sequence, or None (detected per reference).
    Raises ValueError if the lengths differ; never raises for model text."""
    if len(completions) != len(references):
        raise ValueError(f"grade_batch: {len(completions)} completions, {len(references)} references")
    kinds = [kind] * len(completions) if kind is None or isinstance(kind, str) else list(kind)
    if len(kinds) != len(completions):
        raise ValueError("grade_batch: kind sequence has the wrong length")
    items = list(zip(completions, references, kinds))
    return default_pool().grade_many(items, timeout_s=timeout_s) if items else []


def is_correct(completion: str, reference: str, kind: str | None = None) -> bool:
    """True iff the completion's final answer is equivalent to the reference, checked through
    `default_pool` with its hard timeout. Never raises for str inputs."""
    return grade_batch([completion], [reference], kind)[0].reward == 1.0


__all__ = [
    "FAULT_INJECTION_ENV", "FAULT_PREFIX", "Grade", "GradingPool", "KINDS", "STATUSES", "default_pool", "detect_kind", "extract_answer",
    "grade", "grade_batch", "is_correct",
]
