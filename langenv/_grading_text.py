"""String-level half of the answer checker: extraction, normalisation, numbers, guards.

Nothing in this module imports sympy or math-verify, evaluates text, or runs a regex that can
backtrack badly: every input is first capped to its last `MAX_CHARS` characters. It is therefore
safe to run in the trainer process; `langenv.grading` uses it for the in-process fast path and
sends only the undecided (symbolic) comparisons to the worker pool. See `langenv.grading` for the
policy behind each rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

MAX_CHARS = 4000  # inputs are cut to their last MAX_CHARS characters before any regex
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
# extraction
# --------------------------------------------------------------------------------------------
_CHAT_END = re.compile(r"<\|(?:im_start|im_end|endoftext|eot_id|end_of_text)\|>|</s>")
_BOX = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER = re.compile(
    r"(?i)\b(final\s+)?answer\b(?:\s*\*\*)?(?:\s*(?:is\b|:|=)\s*(?:\*\*)?|\s*(?=\$|\\[(\[]|-?\d))"
)
_HASHES = re.compile(r"####")
_BOLD = re.compile(r"\*\*([^*\n]{1,60})\*\*")
_MATH_ENV = re.compile(
    r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)|(?<![\\$])\$([^$]+?)(?<!\\)\$", re.DOTALL
)
_NUMBER = re.compile(
    r"(?<![A-Za-z_\\\d.])(?:-\s?)?(?:[1-9]\d{0,2}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?"
    r"(?:\s*(?:\\?%|percent\b))?|(?<![\w.\\])\.\d+"
)
_WORD = re.compile(r"[A-Za-z]{2,}")
# two-letter tokens that are English words; other two-letter tokens (ab, xy, AB) are math
_SHORT_WORDS = {"is", "of", "to", "in", "it", "at", "on", "an", "be", "by", "we", "so", "if",
                "as", "no", "do", "my", "up", "he", "us", "am", "me", "or"}
_COMMAND = re.compile(r"\\[A-Za-z]+")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm|mathbf|mathit|mathcal|"
                       r"mathsf|mathbb|operatorname|emph)\s*\{([^{}]*)\}")
_CONNECTORS = {"and", "or"}


def cap(text: str) -> str:
    """The part of ``text`` that extraction looks at: before any end-of-turn token, last MAX_CHARS."""
    m = _CHAT_END.search(text)
    if m:
        text = text[: m.start()]
    return text[-MAX_CHARS:]


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


def _boxes(text: str) -> tuple[int, str] | None:
    """The last ``\\boxed{..}``/``\\fbox{..}``/``\\boxed N`` group: (start, contents joined by ', ').

    Boxes immediately before the last one are joined to it when the gap between them is short
    (< 10 chars) or is a short connective phrase (one and/or/,/; plus at most three other words).
    An unclosed box is skipped.
    """
    found: list[tuple[int, int, str]] = []  # (start, end, content), right to left
    limit = len(text)
    for m in reversed(list(_BOX.finditer(text))):
        if m.end() > limit:
            continue
        j = m.end()
        while j < limit and text[j] == " ":
            j += 1
        if j < limit and text[j] == "{":
            k = _match_brace(text[:limit], j)
            if k < 0:
                continue  # unclosed box (truncated output): not an answer
            content, end = text[j + 1 : k], k + 1
        else:
            tok = re.match(r"[^\s$]+", text[j:limit])
            if not tok or text[m.end()] != " ":
                continue
            content, end = tok.group(0).rstrip(".,"), j + tok.end()
        if found and not _joinable(text[end : found[-1][0]]):
            break
        if not found or content.strip() != found[-1][2].strip():
            found.append((m.start(), end, content))
        else:
            found[-1] = (m.start(), found[-1][1], found[-1][2])
        limit = m.start()
    if not found:
        return None
    return found[-1][0], ", ".join(c for _, _, c in reversed(found))


def _joinable(gap: str) -> bool:
    if len(gap.strip()) < 10:
        return True
    if len(gap) >= 70:
        return False
    plain = _TEXT_CMD.sub(r" \1 ", gap)
    plain = _COMMAND.sub(" ", plain)
    words = [w.lower() for w in _WORD.findall(plain)]
    seps = sum(w in _CONNECTORS for w in words) + plain.count(",") + plain.count(";")
    rest = re.sub(r"[A-Za-z]{2,}|[\s$,;.:]", "", plain)  # what is left besides words: e.g. "y_2="
    return seps == 1 and len(words) - sum(w in _CONNECTORS for w in words) <= 3 and len(rest) <= 8


def _segment(text: str, start: int) -> str:
    """The sentence that starts at ``start``: up to '. ', a blank line or 'I hope' (outside $..$)."""
    seg = text[start : start + 400]
    cut = re.search(r"\n\s*\n|I hope", seg)
    if cut:
        seg = seg[: cut.start()]
    in_math = False
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "\\" and i + 1 < len(seg):
            if seg[i + 1] in "([":
                in_math = True
            elif seg[i + 1] in ")]":
                in_math = False
            i += 2
            continue
        if c == "$":
            in_math = not in_math
        elif c == "." and not in_math and (i + 1 == len(seg) or seg[i + 1].isspace()):
            return seg[:i]
        i += 1
    return seg


_ENV_NAME = re.compile(r"\\(?:begin|end)\s*\{[^{}]*\}(?:\{[lcr| ]*\})?")


def word_count(text: str) -> int:
    """Prose words (2+ letters) outside LaTeX commands and \\text{} arguments, and/or excluded."""
    plain = _TEXT_CMD.sub(" ", _ENV_NAME.sub(" ", text))
    plain = _COMMAND.sub(" ", plain)
    return sum(w.lower() not in _CONNECTORS and (len(w) > 2 or w.lower() in _SHORT_WORDS)
               for w in _WORD.findall(plain))


def _last_number(text: str) -> tuple[int, str] | None:
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return (last.end(), last.group(0)) if last else None


def _pick(seg: str, bare_words: int = 2) -> str | None:
    """The answer inside a segment: the segment itself if it is bare (at most ``bare_words``
    words of prose), else the last math environment if it is bare and no number follows it, else
    the last number."""
    seg = seg.strip()
    if not seg:
        return None
    env = None
    for env in _MATH_ENV.finditer(seg):
        pass
    if word_count(seg) <= bare_words and (env is None or word_count(_MATH_ENV.sub(" ", seg)) == 0):
        return seg
    num = _last_number(seg)
    if env is not None:
        content = next(g for g in env.groups() if g is not None)
        if (num is None or num[0] <= env.end()) and word_count(content) <= 1:
            return content
        if num is not None and num[0] <= env.end():
            inner = _last_number(content)
            return inner[1] if inner else None
    return num[1] if num else None


def extract(text: str, kind: str) -> str | None:
    """Final answer string of a completion or reference (see `langenv.grading.extract_answer`)."""
    text = cap(text)
    if not text.strip():
        return None
    cands: list[tuple[int, str]] = []
    box = _boxes(text)
    if box:
        cands.append(box)
    hashes = list(_HASHES.finditer(text))
    if hashes:
        line = text[hashes[-1].end() :].split("\n", 1)[0]
        ans = _pick(line, bare_words=3)
        if ans:
            cands.append((hashes[-1].start(), ans))
    # "final answer" sentences compete with boxes and #### by position; a plain "answer is/:"
    # sentence counts only without them; one with plain words only ("our answer is correct")
    # counts only without any other marker.
    plain = weak = None
    plain_at = -1
    for m in reversed(list(_ANSWER.finditer(text))):
        if cands and m.start() < max(c[0] for c in cands):
            break
        seg = _segment(text, m.end())
        ans = _pick(seg)
        if not ans:
            continue
        if not re.search(r"[\d\\$=<>()\[\]{}^]", ans):
            weak = weak or ans
        elif m.group(1):  # a plain "Answer: x" inside this sentence is the more specific one
            cands.append((m.start(), plain if 0 <= plain_at < m.end() + len(seg) else ans))
            break
        elif plain is None:
            plain, plain_at = ans, m.start()
    if cands:
        return max(cands, key=lambda c: c[0])[1].strip()
    if plain or weak:
        return (plain or weak).strip()
    bold = None
    for bold in _BOLD.finditer(text):
        pass
    if bold is not None and re.search(r"\d", bold.group(1)):
        return bold.group(1).strip()
    ans = _pick(text)
    return ans.strip() if ans else None


def detect_kind(reference: str) -> str:
    """"gsm8k" when the reference holds a GSM8K '#### N' line, else "math"."""
    return "gsm8k" if re.search(r"(?m)^\s*####", cap(reference)) else "math"


# --------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------
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
    """Exact equality; a percent sign on one side may also mean /100 (10% = 10 = 0.1). A decimal
    stated to >= 6 places also matches an exact fraction it agrees with on every stated place."""
    if gold.value is None or pred.value is None:
        return gold.value is None and pred.value is None and gold.digits == pred.digits
    g, p = gold.value, pred.value
    options = [(g, p)]
    if pred.percent and not gold.percent:
        options.append((g, p / 100))
    if gold.percent and not pred.percent:
        options.append((g / 100, p))
    for a, b in options:
        if a == b:
            return True
        for dec, exact in ((pred, a), (gold, b)):
            d = b if dec is pred else a
            if dec.places >= 6 and abs(d - exact) < Fraction(1, 10**dec.places):
                return True
    return False


# --------------------------------------------------------------------------------------------
# answer lists
# --------------------------------------------------------------------------------------------
_OPEN, _CLOSE = "([{", ")]}"


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
    """Raise `Refused` if ``s`` must not reach sympy: too long, nested deeper than MAX_DEPTH,
    a digit run longer than MAX_DIGITS, an exponent tower or an exponent/factorial argument
    above MAX_EXPONENT / 999."""
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
        if "^" in exp or "**" in exp or "!" in exp or "\\uparrow" in exp:
            raise Refused("exponent tower")
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
