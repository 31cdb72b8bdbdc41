"""Final-answer extraction for `langenv.grading` (pure string code: no sympy, nothing evaluated).

Every input is first cut at its first end-of-turn token and to its last `MAX_CHARS` characters,
and no regex here can backtrack badly, so extraction is safe to run in the trainer process. See
`langenv.grading` for the rules and the policy behind them.
"""

from __future__ import annotations

import re

MAX_CHARS = 6000  # inputs are cut to their last MAX_CHARS characters before any regex


_CHAT_END = re.compile(r"<\|(?:im_start|im_end|endoftext|eot_id|end_of_text)\|>|</s>")
_BOX = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER = re.compile(
    r"(?i)\b(final\s+)?answer\b(?:\s*\*\*)?(?:\s*(?:is\b\s*:?|:|=)\s*(?:\*\*)?|\s*(?=\$|\\[(\[]|-?\d))"
)
_HASHES = re.compile(r"####")
_BOLD = re.compile(r"\*\*([^*\n]{1,60})\*\*")
_MATH_ENV = re.compile(  # bounded so that unclosed openers cannot make a scan quadratic
    r"\$\$(.{1,500}?)\$\$|\\\[(.{1,500}?)\\\]|\\\((.{1,500}?)\\\)|(?<![\\$])\$([^$]{1,500}?)(?<!\\)\$",
    re.DOTALL,
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


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each '{' -> index of its closing '}' (unclosed ones are absent). One O(n) pass."""
    pairs, stack = {}, []
    for j, c in enumerate(text):
        if c == "{":
            stack.append(j)
        elif c == "}" and stack:
            pairs[stack.pop()] = j
    return pairs


def _boxes(text: str) -> tuple[int, str] | None:
    """The last ``\\boxed{..}``/``\\fbox{..}``/``\\boxed N`` group: (start, contents joined by ', ').

    Boxes immediately before the last one are joined to it when the gap between them is short
    (< 10 chars) or is a short connective phrase (one and/or/,/; plus at most three other words).
    An unclosed box is skipped.
    """
    found: list[tuple[int, int, str]] = []  # (start, end, content), right to left
    limit = len(text)
    pairs = _brace_pairs(text)
    for m in reversed(list(_BOX.finditer(text))):
        if m.end() > limit:
            continue
        j = m.end()
        while j < limit and text[j] == " ":
            j += 1
        if j < limit and text[j] == "{":
            k = pairs.get(j, -1)
            if k < 0 or k >= limit:
                continue  # unclosed box (truncated output): not an answer
            content, end = text[j + 1 : k], k + 1
        else:
            tok = re.match(r"[^\s$]+", text[j:limit])
            if not tok or j == m.end():  # "\boxed N" needs a space; "\boxedN" is not a box
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
    """Whether two boxes separated by ``gap`` form one multi-part answer: a gap under 10 chars,
    or under 70 chars holding exactly one separator (and/or/,/;), at most three other words and
    at most 8 other characters ("\\quad\\text{and}\\quad", ") and \\( y_2 =", "papers and")."""
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


def last_number(text: str) -> tuple[int, str] | None:
    """(end index, text) of the last number in ``text`` (not one glued after letters), or None."""
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
    num = last_number(seg)
    if env is not None:
        content = next(g for g in env.groups() if g is not None)
        if (num is None or num[0] <= env.end()) and word_count(content) <= 1:
            return content
        if num is not None and num[0] <= env.end():
            inner = last_number(content)
            return inner[1] if inner else None
    return num[1] if num else None


def _strip_delims(ans: str | None) -> str | None:
    """Drop math delimiters that enclose the whole answer ('$x$', '\\(x\\)', '\\[x\\]')."""
    if ans is None:
        return None
    ans = ans.strip().strip("*").strip()  # markdown bold around the answer
    m = re.fullmatch(r"\$\$?([^$]*?)\$?\$|\\\((.*?)\\\)|\\\[(.*?)\\\]", ans, re.DOTALL)
    if m:
        inner = next(g for g in m.groups() if g is not None)
        if "\\(" not in inner and "\\[" not in inner:
            ans = inner.strip()
    return ans


def extract(text: str, kind: str) -> str | None:
    """Final answer string of a completion or reference (see `langenv.grading.extract_answer`).

    GSM8K ("gsm8k") and MATH use the same lenient rules; "gsm8k_strict" only reads the last
    ``#### ..`` line (`hashes_answer`)."""
    if kind == "gsm8k_strict":
        return _strip_delims(hashes_answer(text))
    return _strip_delims(_extract(text))


def hashes_answer(text: str) -> str | None:
    """The answer on the last ``#### ..`` line, or None when there is no ``####`` (or nothing
    after it): the VinePPO paper's GSM8K extraction (McGill-NLP/VinePPO, tasks/gsm8k.py,
    ``use_original_format``: no ``####`` means no answer, reward 0), here with the rest of that
    line read as `_extract` reads a ``####`` line."""
    text = cap(text)
    hashes = list(_HASHES.finditer(text))
    if not hashes:
        return None
    ans = _pick(text[hashes[-1].end():].split("\n", 1)[0], bare_words=3)
    return ans.strip() if ans else None


def _extract(text: str) -> str | None:
    """Markers first (boxes, ####, "final answer" by position; then "answer is"; then **bold**),
    then the bare text or the lenient last math environment / number."""
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
            if not re.search(r"(?i)\banswer\b", ans):
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
