"""Reasoning-step segmentation of responses, and the mapping of steps to tokens.

VinePPO (Kazemnejad et al. 2024) estimates a Monte-Carlo value at the start of every reasoning
step of a response. The steps are a character-level, in-place split of the response text, so
``"".join(steps) == response``. This module re-implements the behaviour of McGill-NLP/VinePPO's
splitters (our own code; the rule sources are cited in each docstring):

- `split_gsm8k`: one step per line (``src/treetune/tasks/gsm8k.py``,
  ``GSM8K.split_solution_into_intermediate_steps``).
- `split_math`: LaTeX-aware sentences and lines of at most about 100 characters
  (``src/treetune/tasks/math_extract_steps_inplace.py``, ``split_solution_inplace``).

The token helpers turn character steps into token positions. `token_step_ids` gives each token
the step that holds its first character, as VinePPO's ``_compute_token_advantages`` does
(``src/treetune/episode_generators/math_episode_generator_with_mc_advantages.py``).
`step_token_boundaries` gives the token prefixes that are the intermediate states.

Conventions, for both splitters and any input string:

- ``"".join(steps) == text`` and every step is non-empty. The empty text gives ``[]``, no steps.
- A newline ends the step it closes: a step carries its trailing ``"\\n"``, and blank lines stay
  with the step before them. VinePPO instead puts each ``"\\n"`` at the start of the next step.
  For the ``"\\n"`` token of common tokenizers this changes nothing, and it keeps every
  intermediate state at the start of a fresh line.
- A split inside a line (after a sentence's ``"."``, a ``","``, an ``"="``) leaves the following
  space at the start of the next step, as VinePPO does. This matches tokenizers that attach the
  space to the next word (``" The"``).
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from typing import Callable, Sequence

__all__ = [
    "MAX_STEP_CHARS",
    "MIN_FRAGMENT_CHARS",
    "STEP_KINDS",
    "split_gsm8k",
    "split_math",
    "split_steps",
    "step_char_offsets",
    "step_token_boundaries",
    "token_step_ids",
]

#: Kinds accepted by `split_steps`.
STEP_KINDS = ("gsm8k", "math")

#: MATH parts longer than this (characters) are broken near the middle
#: (``MAX_PART_LENGTH = 100`` in math_extract_steps_inplace.py).
MAX_STEP_CHARS = 100
#: MATH fragments shorter than this that do not end a sentence are merged into a neighbour.
MIN_FRAGMENT_CHARS = 20
# Least characters on each side when breaking a long part at prose punctuation / inside maths.
_MIN_HALF_PROSE = 40
_MIN_HALF_MATH = 20


# ============================================================================================
# GSM8K


def split_gsm8k(text: str) -> list[str]:
    """Split a GSM8K-style response into lines, one step per line.

    Rules (McGill-NLP/VinePPO ``src/treetune/tasks/gsm8k.py``,
    ``split_solution_into_intermediate_steps``, delimiter ``"\\n"``):

    - Split on ``"\\n"``; each step keeps the newline that ends it.
    - Blank (whitespace-only) lines at the start merge into the first non-blank line (VinePPO:
      "merge first empty steps to the first non-empty step").
    - The final-answer line, the first line starting with ``"####"``, merges into the step before
      it, together with everything after it (VinePPO splits off ``"\\n#### "`` and appends it to the
      last non-empty step).
    - Blank lines elsewhere merge into the step before them (our choice; VinePPO keeps them as
      steps of their own, ``"\\n"``).

    Example: ``"\\nA.\\n\\nB.\\n#### 5"`` -> ``["\\nA.\\n\\n", "B.\\n#### 5"]``.

    Args:
        text: the response (or gold solution) text.

    Returns:
        Non-empty steps with ``"".join(steps) == text``; ``[]`` for ``""``.
    """
    if not text:
        return []
    pieces = text.split("\n")
    lines = [p + "\n" for p in pieces[:-1]]
    if pieces[-1]:
        lines.append(pieces[-1])

    answer_at = next((i for i, line in enumerate(lines) if line.lstrip(" \t").startswith("####")), None)
    body = lines if answer_at is None else lines[:answer_at]
    tail = "" if answer_at is None else "".join(lines[answer_at:])

    steps: list[str] = []
    pending = ""  # leading blank lines, waiting for the first non-blank line
    for line in body:
        if line.strip():
            steps.append(pending + line)
            pending = ""
        elif steps:
            steps[-1] += line
        else:
            pending += line
    if steps:
        steps[-1] += pending + tail
    elif pending or tail:
        steps.append(pending + tail)
    return steps


# ============================================================================================
# MATH

# LaTeX / Asymptote spans, found left to right; at one position the first alternative wins, so
# "$$" is tried before "$". Patterns follow replace_math_with_placeholders_corrected in
# math_extract_steps_inplace.py: [asy], tabular (also wrapped in $), \(..\), \[..\], $$..$$, $..$
# (non-empty, unescaped delimiters), \begin{X}..\end{X}.
_SPAN_RE = re.compile(
    r"""
      (?P<asy>\[asy\].*?\[/asy\])
    | (?P<tabular>\$\\begin\{tabular\}.*?\\end\{tabular\}\$|\\begin\{tabular\}.*?\\end\{tabular\})
    | (?P<paren>\\\(.*?\\\))
    | (?P<bracket>\\\[.*?\\\])
    | (?P<dollars>\$\$.*?\$\$)
    | (?P<dollar>(?<!\\)\$(?:\\.|[^\\$])+\$)
    | (?P<env>\\begin\{(?P<envname>[^{}]*)\}.*?\\end\{(?P=envname)\})
    """,
    re.DOTALL | re.VERBOSE,
)
_INNER_DOLLAR_RE = re.compile(r"(?<!\\)\$(?:\\.|[^\\$])+\$", re.DOTALL)
_NEWLINE_RUN_RE = re.compile(r"\n(?:[^\S\n]*\n)*")  # a newline and the blank lines after it
# "." + spaces (no newline) + a capital letter (VinePPO's period_pattern); `_is_abbreviation`
# filters the matches.
_SENTENCE_END_RE = re.compile(r"\.(?=[^\S\n]+[A-Z])")
_ABBREVIATIONS = frozenset({"mr", "ms", "dr", "st", "vs", "no", "jr", "sr", "cf", "ca", "al", "eg", "ie", "pp"})
_OPENING_RE = re.compile(r"\$\$|\\\[|\\begin\{[^{}]*\}(?:\{[^{}]*\})?|\[asy\]|\$?\\begin\{tabular\}\{[^{}]*\}")
# What may follow maths that ends a sentence for a cut there: spaces, then a capital, "$" or "\".
_AFTER_MATH_SENTENCE_RE = re.compile(r"[^\S\n]*[A-Z$\\]")
_CLOSING_RE = re.compile(r"(?:\$\$|\$|\\\)|\\\]|\\end\{[^{}]*\})\s*$")
# Break points of long parts: (pattern, cut offset from the match start), tried in this order
# (best_effort_break_long_part_in_language / _in_math in math_extract_steps_inplace.py).
_PROSE_BREAKS = ((re.compile(r","), 1), (re.compile(r"\sand\s"), 4), (re.compile(r":"), 1), (re.compile(r"\sto\s"), 3))
_MATH_BREAKS = (
    (re.compile(r",(?:\$\$|\$|\\\)|\\\])"), None),  # after the closing delimiter
    (re.compile(r"="), 1),
    (re.compile(r"\\equiv"), 6),
    (re.compile(r"\+"), 1),
    (re.compile(r"\\cancelto"), 9),
)


class _Spans:
    """Sorted, disjoint ``(start, end)`` spans with an "is this cut strictly inside one" query."""

    def __init__(self, spans: list[tuple[int, int]]):
        spans.sort()
        self.starts = [s for s, _ in spans]
        self.ends = [e for _, e in spans]

    def inside(self, pos: int) -> bool:
        k = bisect_left(self.starts, pos) - 1  # last span starting strictly before pos
        return k >= 0 and pos < self.ends[k]

    def start_of(self, pos: int) -> int | None:
        """Start of the span that ``pos`` is strictly inside, or None."""
        k = bisect_left(self.starts, pos) - 1
        return self.starts[k] if k >= 0 and pos < self.ends[k] else None

    def __iter__(self):
        return zip(self.starts, self.ends)


def _find_math(text: str) -> tuple[_Spans, _Spans, _Spans]:
    """Mask the maths: the ``(inline, display, block)`` spans of ``text``.

    - ``inline`` spans are never cut: ``$..$`` and ``\\(..\\)``, also the ``$..$`` nested in the
      other two kinds.
    - ``display`` spans (``\\[..\\]``, ``$$..$$``, ``\\begin{X}..\\end{X}``) are cut at their
      internal newlines, and, in parts over `MAX_STEP_CHARS`, at ``=``, ``+``, ``\\equiv``.
    - ``block`` spans (``[asy]..[/asy]`` code and tabulars) are cut only at their internal
      newlines.
    """
    inline: list[tuple[int, int]] = []
    display: list[tuple[int, int]] = []
    block: list[tuple[int, int]] = []
    for m in _SPAN_RE.finditer(text):
        kind = m.lastgroup if m.lastgroup != "envname" else "env"
        span = m.span()
        if kind in ("paren", "dollar"):
            inline.append(span)
            continue
        (block if kind in ("asy", "tabular") else display).append(span)
        for d in _INNER_DOLLAR_RE.finditer(m.group(0)):
            inline.append((span[0] + d.start(), span[0] + d.end()))
    return _Spans(inline), _Spans(display), _Spans(block)


def _is_abbreviation(text: str, period: int) -> bool:
    """Whether the ``"."`` at ``text[period]`` ends a one-letter word ("e.g.", "A.") or a common
    two-letter abbreviation ("Mr.", "vs.").

    VinePPO's period_pattern skips periods after any word of one or two letters. We skip only
    one-letter words and the listed abbreviations, so "... is it. Then" is still split.
    """
    start = period
    while start > 0 and ("a" <= text[start - 1].lower() <= "z"):
        start -= 1
    if start == period or (start > 0 and text[start - 1].isalnum()):
        return False
    word = text[start:period]
    return len(word) == 1 or word.lower() in _ABBREVIATIONS


def _ends_sentence(part: str) -> bool:
    """Whether ``part`` ends in ``"."``, also just inside closing maths (``".$"``, ``".\\]"``...).

    The "has period" test of split_tailing_periods_in_placeholders (math_extract_steps_inplace.py).
    """
    s = part.rstrip()
    while (m := _CLOSING_RE.search(s)) is not None:
        s = s[: m.start()].rstrip()
    return s.endswith(".")


def split_math(text: str) -> list[str]:
    """Split a MATH-style response (prose with LaTeX) into reasoning steps.

    Re-implements the behaviour of ``split_solution_inplace`` in McGill-NLP/VinePPO
    ``src/treetune/tasks/math_extract_steps_inplace.py``:

    1. Mask the maths (``replace_math_with_placeholders_corrected``): ``$..$``, ``$$..$$``,
       ``\\(..\\)``, ``\\[..\\]``, ``\\begin{X}..\\end{X}``, tabulars and ``[asy]..[/asy]``
       blocks. No prose rule cuts inside them. Display maths, tabulars and ``[asy]`` code are
       cut only at their internal newlines (step 2) and, display maths only, by step 4. Inline
       maths (``$..$``, ``\\(..\\)``) is never cut.
    2. Cut (``naive_split_by_newline_and_period``, ``split_tailing_periods_in_placeholders``,
       ``split_newline_in_placeholders``):
       - after a ``"."`` followed by spaces and a capital letter, unless the ``"."`` ends a
         one-letter word or a common abbreviation ("e.g.", "Mr.", see `_is_abbreviation`);
       - after every newline outside the maths, keeping blank lines with the step before;
       - after maths whose content ends in ``"."`` (``"$x=1.$ Then"``, ``"\\[x=1.\\]Then"``), when a
         capital letter, ``$`` or ``\\`` follows;
       - after each newline inside display maths (``\\[..\\]``, ``$$..$$``, ``\\begin..\\end``),
         tabulars and ``[asy]`` code, except right after a lone opening delimiter (``"\\[\\n"``,
         ``"\\begin{align*}\\n"``), which stays with the line it opens.
    3. Merge every fragment shorter than `MIN_FRAGMENT_CHARS` (20) characters that does not end a
       sentence into the next one. The last fragment, and the tail of a display cut at its newlines
       (e.g. a lone ``"\\end{align*}"``), merge into the previous one.
    4. Break a part longer than `MAX_STEP_CHARS` (100) characters near its middle
       (``try_to_break_very_long_parts``, ``best_effort_break_long_part_in_language`` /
       ``_in_math``). First try prose punctuation outside the maths, in this order: after ``","``,
       ``" and"``, ``":"``, ``" to"``, if both halves have at least 40 characters. Otherwise try a
       maths break: after ``",$"`` / ``",$$"`` / ``",\\)"`` / ``",\\]"``, then ``"="``, ``"\\equiv"``, ``"+"``,
       ``"\\cancelto"``, if both halves have at least 20 characters. The cut is the candidate of
       the first usable pattern closest to the middle. It never falls inside inline maths,
       ``[asy]`` or a tabular. VinePPO may cut inside inline maths (``"$(k-1)+k+(k+1)=|3k$"``);
       we leave such a part longer than 100 characters instead. The halves are broken again until
       they are short enough or have no usable cut, as ``break_part_as_much_as_possible`` does.

    Args:
        text: the response (or gold solution) text.

    Returns:
        Non-empty steps with ``"".join(steps) == text``; ``[]`` for ``""``. On the MATH-500 gold
        solutions: mean 8.5 steps, median 6, max 50 (VinePPO's splitter: 9.6 / 7 / 67; the
        difference is mostly [asy] code, whose short lines we merge, and uncut inline maths).
    """
    if not text:
        return []
    inline, display, block = _find_math(text)

    def in_maths(pos: int) -> bool:
        return inline.inside(pos) or display.inside(pos) or block.inside(pos)

    cuts: set[int] = set()
    for m in _NEWLINE_RUN_RE.finditer(text):
        # outside all maths, or inside display maths / [asy] / tabulars (their internal newlines),
        # but not right after a lone opening delimiter ("\\[\n", "\\begin{align*}\n", "[asy]\n")
        pos = m.end()
        if inline.inside(pos):
            continue
        span_start = display.start_of(pos)
        if span_start is None:
            span_start = block.start_of(pos)
        if span_start is not None and _OPENING_RE.fullmatch(text[span_start : m.start()].strip()):
            continue
        cuts.add(pos)
    for m in _SENTENCE_END_RE.finditer(text):
        if not in_maths(m.end()) and not _is_abbreviation(text, m.start()):
            cuts.add(m.end())
    for spans in (inline, display):
        for start, end in spans:
            if (
                not in_maths(end)
                and _ends_sentence(text[start:end])
                and _AFTER_MATH_SENTENCE_RE.match(text, end)
            ):
                cuts.add(end)
    cuts.discard(0)
    cuts.discard(len(text))
    bounds = [0, *sorted(cuts), len(text)]
    parts = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]

    parts = _merge_fragments(text, parts, lambda pos: display.inside(pos) or block.inside(pos))

    out: list[str] = []
    for start, end in parts:
        for a, b in _break_long(text, start, end, in_maths, lambda pos: inline.inside(pos) or block.inside(pos)):
            out.append(text[a:b])
    return out


def _merge_fragments(
    text: str, parts: list[tuple[int, int]], in_cut_block: Callable[[int], bool]
) -> list[tuple[int, int]]:
    """Step 3 of `split_math`: merge short fragments that do not end a sentence into a neighbour.

    ``in_cut_block(pos)`` tells whether ``pos`` is strictly inside a display / block span (one that
    step 2 may have cut at its newlines): a short fragment starting there is the rest of that span
    and joins the previous fragment.
    """

    def weak(p: tuple[int, int]) -> bool:
        return p[1] - p[0] < MIN_FRAGMENT_CHARS and not _ends_sentence(text[p[0] : p[1]])

    parts = list(parts)
    i = 0
    while len(parts) > 1 and i < len(parts):
        if not weak(parts[i]):
            i += 1
            continue
        into_previous = i > 0 and (i == len(parts) - 1 or in_cut_block(parts[i][0]))
        if into_previous:
            parts[i - 1] = (parts[i - 1][0], parts[i][1])
            del parts[i]
            i -= 1  # re-check the grown previous part (it may itself have been short)
        else:
            parts[i] = (parts[i][0], parts[i + 1][1])
            del parts[i + 1]
    return parts


def _best_cut(start: int, end: int, candidates: list[int], min_half: int) -> int | None:
    """The candidate closest to the middle of ``text[start:end]``, if both halves are >= min_half."""
    if not candidates:
        return None
    mid2 = start + end  # compare 2*pos with start+end to stay in integers
    pos = min(candidates, key=lambda c: (abs(2 * c - mid2), c))
    if pos - start >= min_half and end - pos >= min_half:
        return pos
    return None


def _break_long(
    text: str,
    start: int,
    end: int,
    in_maths: Callable[[int], bool],
    in_unbreakable: Callable[[int], bool],
) -> list[tuple[int, int]]:
    """Step 4 of `split_math`: break ``text[start:end]`` at near-middle cuts until parts are short.

    ``in_maths(pos)``: ``pos`` is inside any maths (no prose break there); ``in_unbreakable(pos)``:
    ``pos`` is inside inline maths, ``[asy]`` or a tabular (no maths break there either).
    """
    out: list[tuple[int, int]] = []
    todo = [(start, end)]  # a stack, last = leftmost pending part
    while todo:
        a, b = todo.pop()
        cut = _find_break(text, a, b, in_maths, in_unbreakable) if b - a > MAX_STEP_CHARS else None
        if cut is None:
            out.append((a, b))
        else:
            todo.append((cut, b))
            todo.append((a, cut))
    return out


def _find_break(
    text: str, start: int, end: int, in_maths: Callable[[int], bool], in_unbreakable: Callable[[int], bool]
) -> int | None:
    """The cut for one long part (see `_break_long`), or None when there is no usable one."""
    piece = text[start:end]
    for pattern, offset in _PROSE_BREAKS:
        cands = [start + m.start() + offset for m in pattern.finditer(piece)]
        cut = _best_cut(start, end, [c for c in cands if not in_maths(c)], _MIN_HALF_PROSE)
        if cut is not None:
            return cut
    for pattern, offset in _MATH_BREAKS:
        cands = [start + (m.end() if offset is None else m.start() + offset) for m in pattern.finditer(piece)]
        cut = _best_cut(start, end, [c for c in cands if not in_unbreakable(c)], _MIN_HALF_MATH)
        if cut is not None:
            return cut
    return None


# ============================================================================================
# dispatch and token mapping


def split_steps(text: str, kind: str) -> list[str]:
    """Split ``text`` with the splitter for ``kind``: "gsm8k" (`split_gsm8k`) or "math" (`split_math`).

    Raises:
        ValueError: for an unknown kind; the message lists the valid kinds.
    """
    if kind == "gsm8k":
        return split_gsm8k(text)
    if kind == "math":
        return split_math(text)
    raise ValueError(f"unknown step kind {kind!r}; valid kinds: {', '.join(STEP_KINDS)}")


def step_char_offsets(steps: Sequence[str]) -> list[int]:
    """Start offset (characters) of each step in ``"".join(steps)``.

    Example: ``["ab\\n", "cd\\n", "ef"]`` -> ``[0, 3, 6]``. ``[]`` -> ``[]``.
    """
    offsets = []
    pos = 0
    for step in steps:
        offsets.append(pos)
        pos += len(step)
    return offsets


def _check_step_starts(step_starts: Sequence[int]) -> None:
    if not step_starts:
        raise ValueError("step_starts is empty: there are no steps to map tokens to")
    if step_starts[0] != 0:
        raise ValueError(f"step_starts must begin at 0, got {step_starts[0]}")
    for a, b in zip(step_starts, step_starts[1:]):
        if b <= a:
            raise ValueError(f"step_starts must be strictly increasing, got {a} then {b}")


def token_step_ids(token_char_starts: Sequence[int], step_starts: Sequence[int]) -> list[int]:
    """Step index of each token: the step that contains the token's first character.

    This is how VinePPO spreads step advantages over tokens (``_compute_token_advantages``: each
    token takes the value at its first ``offset_mapping`` character; McGill-NLP/VinePPO
    ``math_episode_generator_with_mc_advantages.py``). A token that starts in step ``i`` and
    ends in a later step belongs to step ``i``. A token starting at or after the end of the text
    (e.g. an appended EOS whose offset is ``len(text)``) belongs to the last step.

    Args:
        token_char_starts: ``(num_tokens,)`` character offset in the response text where each
            response token starts (``offset_mapping[t][0]`` of a fast tokenizer).
        step_starts: ``(num_steps,)`` start offset of each step, from `step_char_offsets`.

    Returns:
        ``(num_tokens,)`` step indices in ``[0, num_steps)``; ``[]`` when there are no tokens.

    Raises:
        ValueError: if there are tokens but ``step_starts`` is empty, does not start at 0 or is not
            strictly increasing, or a token offset is negative.
    """
    if len(token_char_starts) == 0:
        return []
    _check_step_starts(step_starts)
    ids = []
    for t, c in enumerate(token_char_starts):
        if c < 0:
            raise ValueError(f"token {t} has a negative character offset {c}")
        ids.append(bisect_right(step_starts, c) - 1)
    return ids


def step_token_boundaries(token_char_starts: Sequence[int], step_starts: Sequence[int]) -> list[int]:
    """Token prefix lengths of the intermediate states: where each step after the first begins.

    For each step ``i >= 1``, the index of the first token whose step id (`token_step_ids`) is
    ``>= i``. The state ``s_i`` of VinePPO (prompt + the first ``i`` steps) is then the prompt
    followed by ``response_tokens[:b]``. Equal values are dropped, so when one token covers a
    whole step there is a single boundary. Values of 0 (the prompt state ``s_0``) and
    ``num_tokens`` (the terminal state) are dropped too. Those happen when a step has no token of
    its own: all its characters sit inside a token that starts in an earlier step.

    Example: text ``"ab\\ncd\\nef"``, steps ``["ab\\n", "cd\\n", "ef"]`` (starts ``[0, 3, 6]``) and
    tokens ``"ab"``, ``"\\ncd"``, ``"\\n"``, ``"ef"`` (starts ``[0, 2, 5, 6]``). The token
    ``"\\ncd"`` crosses the first boundary and goes to step 0, so the ids are ``[0, 0, 1, 2]`` and
    the boundaries ``[2, 3]``.

    Args:
        token_char_starts: ``(num_tokens,)`` non-decreasing character start of each response
            token.
        step_starts: ``(num_steps,)`` from `step_char_offsets`.

    Returns:
        Strictly increasing token indices in ``(0, num_tokens)``, at most ``num_steps - 1`` of them.

    Raises:
        ValueError: as `token_step_ids`, or if ``token_char_starts`` decreases.
    """
    ids = token_step_ids(token_char_starts, step_starts)
    for t in range(1, len(token_char_starts)):
        if token_char_starts[t] < token_char_starts[t - 1]:
            raise ValueError(
                f"token_char_starts must be non-decreasing: token {t} starts at "
                f"{token_char_starts[t]} < {token_char_starts[t - 1]}"
            )
    n = len(ids)
    bounds: list[int] = []
    for i in range(1, len(step_starts)):
        b = bisect_left(ids, i)  # ids are non-decreasing
        if 0 < b < n and (not bounds or b > bounds[-1]):
            bounds.append(b)
    return bounds
