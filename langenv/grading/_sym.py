"""Symbolic half of the answer checker: math-verify (pinned 0.9.0) behind our own parsing rules.

Only `langenv.grading` calls this, and only for answers that passed `langenv.grading._text.check_safe`.
Importing it runs a ~0.5 s warm-up (each grading worker does this once, right after it starts).
It should run inside a `GradingPool` worker: math-verify's SIGALRM timeouts (1 s here) work only
in a process's main thread, and only the pool's hard kill bounds a C-level blow-up.

Two things differ from calling math-verify bare:

* Every answer is parsed on its own, wrapped in ``$...$`` and with the LaTeX extractor only, so
  the last-number "Expr" extractor never turns ``5x-7y+11z+4=0`` into ``0`` (math-verify #60).
* Numeric comparison of two exact expressions does not use ``evalf(chop=True)``; a difference is
  zero only if it is exactly zero or evaluates to a zero with no significant digits at 40 digits.
  math-verify's chop accepts ``1/2^{99}`` for ``1/2^{98}`` and ``1/2006!`` for ``1/2004!`` (#14).
  This is done by wrapping `math_verify.grader.sympy_numeric_eq`, which its other comparison
  functions look up at call time.
"""

from __future__ import annotations

import functools
import threading
from fractions import Fraction

import sympy
from math_verify import LatexExtractionConfig, parse, verify
from math_verify import grader as _mv_grader
from math_verify.errors import TimeoutException

from langenv.grading._text import Num, decimal_agrees

MV_TIMEOUT_S = 1  # math-verify parsing_timeout / timeout_seconds (signal based, main thread only)
_LATEX_ONLY = [LatexExtractionConfig()]
_orig_numeric_eq = _mv_grader.sympy_numeric_eq


def _has_float(expr) -> bool:
    try:
        return bool(expr.atoms(sympy.Float))
    except Exception:
        return True


def exact_zero(diff) -> bool:
    """True if the constant sympy expression ``diff`` is zero (exactly, or at 40 digits with no
    significant digit left, which is how sympy reports a complete cancellation)."""
    if diff == 0:
        return True
    value = diff.evalf(40)
    if value == 0:
        return True
    return isinstance(value, sympy.Float) and getattr(value, "_prec", 100) <= 1


def _numeric_eq(a, b, float_rounding: int, numeric_precision: int) -> bool:
    """math-verify's numeric comparison, with a True for two exact constant scalars re-checked
    by `exact_zero` (matrices recurse into this function element by element)."""
    result = _orig_numeric_eq(a, b, float_rounding, numeric_precision)
    if not result or not isinstance(a, sympy.Expr) or not isinstance(b, sympy.Expr):
        return result
    if _has_float(a) or _has_float(b):
        return result
    try:
        diff = a - b
        if getattr(diff, "free_symbols", True):
            return result
        return exact_zero(diff)
    except Exception:
        return False


_mv_grader.sympy_numeric_eq = _numeric_eq


def _timeouts() -> int | None:
    # math-verify's timeouts raise ValueError off the main thread; there we run without them.
    return MV_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=256)
def to_sympy(latex: str):
    """Parse one cleaned answer with math-verify's LaTeX extractor, or None if it does not parse."""
    try:
        res = parse(
            f"${latex}$",
            extraction_config=_LATEX_ONLY,
            fallback_mode="no_fallback",
            parsing_timeout=_timeouts(),
            raise_on_error=True,  # so that a TimeoutException reaches us (status "timeout")
        )
    except Exception:
        return None
    return res[0] if res else None


def decimal_matches(dec: Num, expr) -> bool:
    """A decimal literal stated to >= 6 places matches a constant expression it rounds or
    truncates: ``4.123105625617661`` = ``\\sqrt{17}``; ``0.33`` != ``1/3``."""
    if dec.places < 6 or dec.value is None:
        return False
    if getattr(expr, "free_symbols", True) or not getattr(expr, "is_number", False):
        return False
    value = sympy.N(expr, dec.places + 15)
    if not value.is_real or not value.is_finite:
        return False
    return decimal_agrees(dec.value, dec.places, Fraction(str(value)))


def equal(gold: str, pred: str, gold_num: Num | None, pred_num: Num | None) -> bool:
    """Symbolic equivalence of two single (cleaned, guarded) answers.

    Raises math_verify's TimeoutException (a BaseException) when one of its 1 s alarms fires."""
    g = to_sympy(gold)
    p = to_sympy(pred)
    if g is None or p is None:
        return False
    if gold_num is not None and pred_num is None and decimal_matches(gold_num, p):
        return True
    if pred_num is not None and gold_num is None and decimal_matches(pred_num, g):
        return True
    try:
        return verify(
            g,
            p,
            float_rounding=6,
            numeric_precision=15,
            strict=True,
            allow_set_relation_comp=True,
            timeout_seconds=_timeouts(),
            raise_on_error=True,  # TimeoutException propagates; other errors mean "not equal"
        )
    except Exception:
        return False


def _warm_up() -> None:
    """Run a few comparisons once: sympy imports submodules and fills caches on first use, which
    otherwise makes the first symbolic check of a fresh worker take ~1 s."""
    pairs = (
        ("x^2+2x+1", "(x+1)^2"), ("[0,1)", "[0,9)"), ("x<3", "(-\\infty,3)"),
        ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"), ("y=2x+1", "2x+1"),
        ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\3\\end{pmatrix}"),
        ("\\sin^2 x+\\cos^2 x", "1"),
    )
    for gold, pred in pairs:
        try:
            equal(gold, pred, None, None)
        except BaseException:  # noqa: BLE001 - a warm-up failure is harmless
            pass
    to_sympy.cache_clear()


_warm_up()

__all__ = ["TimeoutException", "decimal_matches", "equal", "exact_zero", "to_sympy"]
