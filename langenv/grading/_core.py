"""Rules of `langenv.grading` that run in any process: `Grade`, the statuses, extraction, and the
comparison (`grade`, `_fast`). See the package docstring of `langenv.grading` for the policies.

Kept free of the worker machinery so that the grading worker (`langenv.grading._worker`) imports
only this, the string rules and the symbolic checker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from langenv.grading import _extract as X
from langenv.grading import _text as T
from langenv.grading._rg import RG_PREFIX, is_rg_kind

STATUSES: tuple[str, ...] = ("correct", "incorrect", "no_answer", "timeout", "invalid", "error")
KINDS: tuple[str, ...] = ("gsm8k", "math", "gsm8k_strict")
#: The reasoning-gym kind family ``"rg:<dataset>"`` (not in KINDS: one kind per dataset; see
#: `langenv.grading._rg`): graded by the dataset's own ``score_answer``, only in a worker.
KIND_PREFIXES: tuple[str, ...] = (RG_PREFIX,)


class GradingError(RuntimeError):
    """The grader could not check an answer at all (an infrastructure failure, never a verdict on
    the answer): a grading worker could not start, died twice on the same check, or the symbolic
    checker (sympy / math-verify) cannot be imported. The message names the cause."""


@dataclass(frozen=True)
class Grade:
    """Result of one check: ``reward`` is 1.0 for "correct", else 0.0; ``status`` is in STATUSES.

    ``cause`` says why for status "error" (e.g. "grading worker could not start: ..."), and for an
    "invalid" of an ``rg:`` kind (e.g. "reasoning-gym's countdown score_answer raised KeyError: ...");
    it is "" otherwise and is not part of equality (``Grade(0.0, "error", "x") == Grade(0.0, "error")``)."""

    reward: float
    status: str
    cause: str = field(default="", compare=False)


_CORRECT = Grade(1.0, "correct")


def _g(status: str) -> Grade:
    return _CORRECT if status == "correct" else Grade(0.0, status)


def detect_kind(reference: str) -> str:
    """"gsm8k" if the reference contains a GSM8K ``#### N`` line, else "math". Never raises for a
    str; a bare number reference is "math" (the math rules include exact numeric comparison)."""
    return X.detect_kind(reference)


def extract_answer(text: str, kind: str) -> str | None:
    """The final answer of a completion or of a reference (solution, rationale or bare answer),
    as a raw string, or None when there is none. ``kind`` "gsm8k" and "math" share the lenient
    rules; "gsm8k_strict" reads only the last ``#### ..`` line (None without one: the VinePPO
    paper's GSM8K rule); an ``"rg:<dataset>"`` kind reads the rest of the last ``####`` line as is
    (`langenv.grading._rg.extract`; a multi-line reference answer is read to the end of the text
    when grading). Never raises for a str."""
    if is_rg_kind(kind):
        from langenv.grading import _rg

        return _rg.extract(text)
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
    from langenv.grading import _sym

    return _sym.equal(lg, lp, ng, np_)


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
    # gsm8k_strict: only the completion's extraction is strict; references (often a bare answer)
    # and the comparison follow "gsm8k"
    base = "gsm8k" if kind == "gsm8k_strict" else kind
    gold = X.extract(reference, base)
    if not gold or not T.canon(gold):
        return _g("invalid")
    pred = X.extract(completion, kind)
    if not pred or not T.canon(pred):
        return _g("no_answer")
    try:
        return _g(_compare(gold, pred, base, symbolic))
    except T.Refused:
        return _g("invalid")


def grade(completion: str, reference: str, kind: str | None = None) -> Grade:
    """Grade one completion in this process (see the module docstring for the rules/statuses).

    ``kind`` is "gsm8k", "gsm8k_strict" (a completion without a ``#### ..`` line is "no_answer"),
    "math", or ``"rg:<dataset>"`` (reasoning-gym's own scorer, `langenv.grading._rg.grade_rg`);
    None (or anything else) means `detect_kind(reference)`.
    Never returns "error". Raises `GradingError` only when sympy / math-verify cannot be imported,
    or, for an ``rg:`` kind, when reasoning-gym cannot be imported or does not know the dataset;
    otherwise never raises for str inputs (a non-str input is "invalid"). math-verify's 1 s alarms run only
    in the main thread; in another thread a symbolic check can hang, and in any thread a C-level
    blow-up is not interruptible, so use it inside a worker or where hangs are acceptable."""
    if is_rg_kind(kind):
        from langenv.grading import _rg

        return _rg.grade_rg(completion, reference, kind)
    try:
        return _grade(completion, reference, kind, symbolic=True)
    except ImportError as exc:  # never the answer's fault: sympy / math-verify is missing or broken
        raise GradingError(f"the symbolic checker cannot be imported: {type(exc).__name__}: {exc}") from exc
    except Exception:  # includes RecursionError and MemoryError (RLIMIT_AS in a worker)
        return _g("invalid")
    except BaseException as exc:  # math-verify's TimeoutException subclasses BaseException
        if type(exc).__name__ == "TimeoutException":
            return _g("timeout")
        raise


def _fast(completion: str, reference: str, kind: str | None) -> Grade | None:
    """The grade if it needs no sympy (strings, exact numbers, guards), else None. Never raises.
    An ``rg:`` kind is always None: reasoning-gym's scorers run only in a worker."""
    if is_rg_kind(kind):
        return None
    try:
        return _grade(completion, reference, kind, symbolic=False)
    except T.NeedSympy:
        return None
    except Exception:
        return None


