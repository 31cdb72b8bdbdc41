"""String-level comparison for `langenv.grading`: normalisation, exact numbers, answer lists,
and the guards that decide what may reach sympy.

Nothing here imports sympy or math-verify or evaluates text, and no regex can backtrack badly, so
it runs in the trainer process: `langenv.grading` decides string/number comparisons with it and
sends only the symbolic ones to the worker pool. See `langenv.grading` for the policies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

MAX_DIGITS = 4000  # longer digit runs are compared as strings only (no int conversion, no sympy)
MAX_DEPTH = 50  # deeper bracket nesting is refused before sympy
MAX_SYMPY_LEN = 600  # longer answers are compared as strings only
MAX_ELEMENTS = 24  # longer answer lists are compared as strings only
MAX_EXPONENT = 9999  # a numeric exponent above this is refused before sympy


class NeedSympy(Exception):
    """Raised by the string-level comparison when only a symbolic check can decide."""


class Refused(Exception):
    """Raised when an answer is too dangerous or too large to hand to sympy."""


# --------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm|mathbf|mathit|mathcal|"
                       r"mathsf|mathbb|operatorname|emph)\s*\{([^{}]*)\}")


def _drop_commas(m: re.Match[str]) -> str:
    return m.group(1) + m.group(2).replace(",", "")


_SUBS: list[tuple[re.Pattern[str], object]] = [
    (re.compile(r"(?<=\d),\\!\s*(?=\d)"), ""),  # 56,\!017 -> 56017
    (re.compile(r"(?<=\d)\s*\{\s*,\s*\}\s*(?=\d)"), ""),  # 14{,}916 -> 14916
    (re.compile(r"\\\$|\$"), " "),
    (re.compile(r"\\[()\[\]]"), " "),
    (re.compile(r"\\(?:displaystyle|textstyle|left|right|big|Big|bigg|Bigg)(?![A-Za-z])"), ""),
    (re.compile(r"(?<!\\)\\[!,;:> ]|~|\\?\"|[“”]"), " "),
    (re.compile(r"(?<![\d.,(\[{])([1-9]\d{0,2})((?:,\d{3})+)(?![\d,)\]}])"), _drop_commas),
    (re.compile(r"\\q?quad(?=[A-Za-z])"), r"\\quad "),
    (re.compile(r"\\(?:d|t|c)frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(r"\\(?:bmatrix|vmatrix|Bmatrix)\b"), "pmatrix"),
    (re.compile(r"\{(?:b|B)matrix\}"), "{pmatrix}"),
    (re.compile(r"\\(?:le|leqslant)(?![A-Za-z])|<="), r"\\leq "),
    (re.compile(r"\\(?:ge|geqslant)(?![A-Za-z])|>="), r"\\geq "),
    (re.compile(r"\\(?:ne)(?![A-Za-z])|!="), r"\\neq "),
    (re.compile(r"\\lt(?![A-Za-z])"), "<"),
    (re.compile(r"\\gt(?![A-Za-z])"), ">"),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°"), ""),
    (re.compile(r"\\degree(?![A-Za-z])"), ""),
    (re.compile(r"−"), "-"),
    (re.compile(r"\\frac\s*(\d)\s*(\d)"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\frac\s*(\d)\s*\{"), r"\\frac{\1}{"),
    (re.compile(r"\\frac\s*\{([^{}]*)\}\s*(\d)"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\sqrt\s*(\d)"), r"\\sqrt{\1}"),
    (re.compile(r"\s*(?:percentage|percent|pct)\b|(?<!\\)%"), r"\\%"),
]
_DOUBLE_SLASH = re.compile(r"\\\\(?=[A-Za-z])")


def clean(ans: str) -> str:
    """Light LaTeX normalisation that keeps the meaning (and spaces) for the sympy parser."""
    s = ans.strip()
    if "\\begin" not in s:
        s = _DOUBLE_SLASH.sub(r"\\", s)
    for _ in range(2):
        s = _TEXT_CMD.sub(r" \1 ", s)
    for pat, rep in _SUBS:
        s = pat.sub(rep, s)
    s = re.sub(r"\s+", " ", s).strip()
    s = s.rstrip("\\").rstrip(" .")
    s = re.sub(r"^\*\*|\*\*$", "", s).strip()
    # drop unbalanced closing braces at the end (e.g. "\frac{1}{2}}")
    while s.endswith("}") and s.count("}") > s.count("{"):
        s = s[:-1].rstrip()
    return s


def canon(ans: str) -> str:
    """Canonical string for the exact-match fast path (clean + no spaces, no trailing '.0')."""
    s = clean(ans).replace(" ", "")
    s = re.sub(r"(?<![\d.])(\d+)\.0+(?![\d])", r"\1", s)
    s = re.sub(r"^\((\w)\)$", r"\1", s)  # (C) -> C
    s = re.sub(r"([_^])\{(\w)\}", r"\1\2", s)  # x^{2} -> x^2
    if ";" in s and re.fullmatch(r"\([^()]*\)(?:,\([^()]*\))*", s):
        s = s.replace(";", ",")  # (0;-2;6) -> (0,-2,6)
    return s


# --------------------------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Num:
    """A plain number: exact value (or canonical digit string when too long), percent flag and,
    for a decimal literal, how many decimal places it states."""

    value: Fraction | None
    digits: str  # canonical string, used when value is None (huge)
    percent: bool = False
    places: int = 0


_INT = r"(?:[1-9]\d{0,2}(?:,\d{3})+(?!\d)|[1-9]\d{0,2}(?: \d{3})+(?!\d)|\d+)"
_NUM_FULL = re.compile(
    r"^(?P<sign>[-+]?)\s*(?:"
    r"(?P<mi>\d+)\s*\\frac\{\s*(?P<mfn>\d+)\s*\}\{\s*(?P<mfd>\d+)\s*\}"
    r"|(?P<mj>\d+)\s(?P<mn>\d+)/(?P<md>\d+)"
    r"|\\frac\{\s*(?P<fn>-?\d+)\s*\}\{\s*(?P<fd>-?\d+)\s*\}"
    r"|(?P<n>\d+)\s*/\s*(?P<d>\d+)"
    rf"|(?P<int>{_INT})?(?P<dec>\.\d+)?)"
    r"\s*(?P<pct>\\%)?(?P<unit>(?:\s+[A-Za-z]{2,}\.?(?:\^\{?\d\}?)?){0,3})\s*$"
)


def _digits_only(s: str) -> str:
    return s.replace(",", "").replace(" ", "")


def parse_number(ans: str) -> Num | None:
    """``ans`` as a plain number, or None. Accepts signs, thousands separators (',' in groups of
    three, '{,}', ',\\!', a space in groups of three), decimals ('.5'), fractions ('a/b',
    '\\frac{a}{b}'), mixed numbers ('3128 1/2', '918\\frac{1}{2}'), a percent sign and up to
    three trailing unit words ('64 square feet'). No exponents, no decimal commas."""
    s = clean(ans)
    if not s or len(s) > MAX_DIGITS + 50:
        return None
    m = _NUM_FULL.match(s)
    if not m:
        return None
    g = m.groupdict()
    neg = g["sign"] == "-"
    pct = bool(g["pct"])
    if g["mi"] or g["mj"] or g["fn"] or g["n"]:
        if g["mi"]:
            whole, num, den = g["mi"], g["mfn"], g["mfd"]
        elif g["mj"]:
            whole, num, den = g["mj"], g["mn"], g["md"]
        else:
            whole, num, den = "0", g["fn"] or g["n"], g["fd"] or g["d"]
        if max(len(whole), len(num), len(den)) > MAX_DIGITS or int(den) == 0:
            return None
        val = int(whole) + Fraction(int(num), int(den))
        return Num(-val if neg else val, "", pct)
    if not (g["int"] or g["dec"]):
        return None
    ip = _digits_only(g["int"] or "0").lstrip("0") or "0"
    dec = (g["dec"] or "")[1:]
    places = len(dec)
    dec = dec.rstrip("0")
    if len(ip) + len(dec) > MAX_DIGITS:
        sign = "-" if neg and (ip != "0" or dec) else ""
        return Num(None, f"{sign}{ip}.{dec}", pct, places)
    val = Fraction(int(ip)) + (Fraction(int(dec), 10 ** len(dec)) if dec else 0)
    return Num(-val if neg else val, "", pct, places)


def numbers_equal(gold: Num, pred: Num) -> bool:
    """Exact equality; a percent sign on one side may also mean /100 (10% = 10 = 0.1), and a
    decimal stated to >= 6 places matches the exact value it rounds or truncates (see
    `decimal_agrees`)."""
    if gold.value is None or pred.value is None:
        return gold.value is None and pred.value is None and gold.digits == pred.digits
    g, p = gold.value, pred.value
    options = [(g, p)]
    if pred.percent and not gold.percent:
        options.append((g, p / 100))
    if gold.percent and not pred.percent:
        options.append((g / 100, p))
    for a, b in options:
        if a == b or decimal_agrees(b, pred.places, a) or decimal_agrees(a, gold.places, b):
            return True
    return False


def decimal_agrees(dec: Fraction, places: int, exact: Fraction) -> bool:
    """True if ``dec``, a decimal stated to ``places`` >= 6 places, is ``exact`` rounded or
    truncated to that many places (0.333333 and 0.3333333 for 1/3; not 0.333334, not 0.33)."""
    if places < 6:
        return False
    ulp = Fraction(1, 10**places)
    if abs(dec - exact) * 2 <= ulp:
        return True
    return (dec >= 0) == (exact >= 0) and abs(dec) <= abs(exact) and abs(exact) - abs(dec) < ulp


# --------------------------------------------------------------------------------------------
# answer lists
# --------------------------------------------------------------------------------------------
_OPEN, _CLOSE = "([{", ")]}"


def _match_brace(text: str, i: int) -> int:
    """Index of the brace closing the one at ``text[i]``, or -1."""
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j
    return -1


def _split_top(s: str, seps: re.Pattern[str]) -> list[str]:
    """Split at matches of ``seps`` that lie outside (), [], {} and \\{ \\}."""
    parts, depth, last, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth = max(0, depth - 1)
        elif depth == 0:
            m = seps.match(s, i)
            if m and m.end() > i:
                parts.append(s[last:i])
                last = i = m.end()
                continue
        i += 1
    parts.append(s[last:])
    return [p.strip() for p in parts]


_SEP1 = re.compile(r";|\\q?quad\b|\s*\b(?:and|or)\b\s*")
_SEP2 = re.compile(r",")


def _unwrap(s: str) -> str:
    """Remove one pair of set/group braces around the whole string ('{1,2}', '\\{1,2\\}')."""
    for op, cl in (("\\{", "\\}"), ("{", "}")):
        if s.startswith(op) and s.endswith(cl) and _match_brace(s, len(op) - 1) in (len(s) - 1,
                                                                                   len(s) - 2):
            inner = s[len(op) : len(s) - len(cl)]
            if inner.count("{") == inner.count("}"):
                return inner.strip()
    return s


def _expand_pm(s: str) -> list[str]:
    n = len(re.findall(r"\\(?:pm|mp)(?![A-Za-z])", s))
    if n != 1:
        return [s]
    return [re.sub(r"\\(?:pm|mp)(?![A-Za-z])", "+", s), re.sub(r"\\(?:pm|mp)(?![A-Za-z])", "-", s)]


def _lhs(s: str) -> str | None:
    m = re.match(r"^([A-Za-z](?:_\{?\w+\}?)?)\s*=", s)
    return m.group(1) if m else None


def elements(ans: str) -> list[str]:
    """The elements of a (possibly multi-part) answer, de-duplicated by canonical form.

    Level-1 separators (';', 'and', 'or', \\quad) split first. A part that still holds top-level
    commas is split further unless the flat list would assign the same variable twice
    ('p=5,q=2 and p=7,q=2' stays two groups). A lone '\\pm' expands to two elements."""
    s = clean(ans)
    s = re.sub(r",\s*\b(?:and|or)\b", ",", s)
    s = _unwrap(s)
    parts = [p for p in _split_top(s, _SEP1) if p.strip(" ,")]
    if len(parts) > 1:
        flat = [q for p in parts for q in _split_top(p.strip(" ,"), _SEP2) if q]
        lhs = [_lhs(q) for q in flat]
        named = [x for x in lhs if x]
        if len(named) == len(set(named)):
            parts = flat
        else:
            parts = [p.strip(" ,") for p in parts]
    else:
        parts = [q for q in _split_top(s, _SEP2) if q]
    if len(parts) > 2 * MAX_ELEMENTS:  # far too many: no de-duplication, the caller refuses it
        return parts[: MAX_ELEMENTS + 1]
    out: list[str] = []
    seen: set[str] = set()  # duplicates (same canonical string or same number) count once
    for p in parts:
        for q in _expand_pm(_unwrap(p.strip())):
            num = parse_number(q)
            key = canon(q) if num is None else f"#{num.value}{num.digits}{'%' * num.percent}"
            if canon(q) and key not in seen:
                seen.add(key)
                out.append(q.strip())
    return out


def is_container(s: str) -> bool:
    s = clean(s)
    return bool(re.match(r"^(?:\(|\[|\\\{|\\begin\{)", s)) and bool(re.search(r"(?:\)|\]|\\\}|\})$", s))


# --------------------------------------------------------------------------------------------
# guards
# --------------------------------------------------------------------------------------------
def _exponents(s: str) -> list[str]:
    out = []
    for m in re.finditer(r"\^|\*\*", s):
        j = m.end()
        while j < len(s) and s[j] == " ":
            j += 1
        if j < len(s) and s[j] in "{(":
            k = _match_brace(s, j) if s[j] == "{" else _match_paren(s, j)
            out.append(s[j + 1 : k] if k > 0 else s[j + 1 :])
        else:
            tok = re.match(r"-?\d+|\\?[A-Za-z]+", s[j:])
            out.append(tok.group(0) if tok else "")
    return out


def _match_paren(s: str, i: int) -> int:
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "(":
            depth += 1
        elif s[j] == ")":
            depth -= 1
            if depth == 0:
                return j
    return -1


def check_safe(s: str) -> None:
    """Raise `Refused` if ``s`` must not reach sympy: longer than MAX_SYMPY_LEN, nested deeper
    than MAX_DEPTH, a digit run longer than MAX_DIGITS, a numeric exponent tower (an exponent
    that is itself a power of constants), a factorial in an exponent, an exponent literal above
    MAX_EXPONENT, or a factorial of a 4+ digit number."""
    if len(s) > MAX_SYMPY_LEN:
        raise Refused("answer too long for a symbolic check")
    depth = peak = 0
    for c in s:
        if c in _OPEN:
            depth += 1
            peak = max(peak, depth)
        elif c in _CLOSE:
            depth -= 1
    if peak > MAX_DEPTH:
        raise Refused("nesting too deep")
    if re.search(rf"\d{{{MAX_DIGITS + 1}}}", s):
        raise Refused("integer too long")
    for exp in _exponents(s):
        numeric = not re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+|\be\b", "", exp))
        if numeric and ("^" in exp or "**" in exp) or "!" in exp or "\\uparrow" in exp:
            raise Refused("exponent tower")  # 9^{9^9}, 2^{2^{64}}; e^{-x^2} is fine
        for d in re.findall(r"\d+", exp):
            if len(d) > 5 or int(d) > MAX_EXPONENT:
                raise Refused("exponent too large")
    for m in re.finditer(r"!", s):
        before = s[: m.start()].rstrip()
        arg = re.search(r"(\d+)$", before)
        if arg and len(arg.group(1)) > 3:
            raise Refused("factorial too large")
        if before.endswith((")", "}")):
            inner = before[max(0, before.rfind("(") if before.endswith(")") else before.rfind("{")):]
            if "^" in inner or any(len(d) > 3 for d in re.findall(r"\d+", inner)):
                raise Refused("factorial too large")
