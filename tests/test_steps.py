"""Reasoning-step segmentation (`langenv.steps`) and the step -> token mapping."""

from __future__ import annotations

import re
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from langenv.data import load_split
from langenv.steps import split_gsm8k, split_math, split_steps, step_char_offsets, step_token_boundaries, token_step_ids

SPLITTERS = (split_gsm8k, split_math)


@pytest.fixture(scope="module")
def gsm8k_test():
    return load_split("gsm8k", "test")["answer"]


@pytest.fixture(scope="module")
def math500():
    return load_split("math", "test")["solution"]


def _check_partition(text, steps):
    assert "".join(steps) == text
    assert all(steps), "steps must be non-empty"
    assert (steps == []) == (text == "")


# ---------------------------------------------------------------------------- invariants


def test_round_trip_gsm8k_test(gsm8k_test):
    for text in gsm8k_test:
        for response in (text, "\n" + re.sub(r"<<[^<>]*>>", "", text)):  # gold, and as an SFT target
            _check_partition(response, split_gsm8k(response))
            _check_partition(response, split_math(response))


def test_round_trip_math500(math500):
    for text in math500:
        _check_partition(text, split_math(text))
        _check_partition("\n" + text, split_math("\n" + text))
        _check_partition(text, split_gsm8k(text))


# Strings built from the characters and tokens the splitters react to.
_PIECES = st.sampled_from(
    list("aZ .,:;=+\n\t$\\{}[]()#\r")
    + ["\\[", "\\]", "\\(", "\\)", "$$", "\\begin{align*}", "\\end{align*}", "[asy]", "[/asy]",
       " and ", " to ", "####", "#### 5", "\\equiv", ". The", "e.g. ", "\\begin{tabular}{cc}",
       "\\end{tabular}", "x = 1.", "\n\n", "The answer is $\\boxed{2}$.", "a" * 30]
)
_TEXTS = st.one_of(st.text(max_size=300), st.lists(_PIECES, max_size=60).map("".join))


@settings(max_examples=400, deadline=None)
@given(_TEXTS)
def test_round_trip_random_strings(text):
    for split in SPLITTERS:
        _check_partition(text, split(text))


@settings(max_examples=200, deadline=None)
@given(_TEXTS, st.data())
def test_token_mapping_properties(text, data):
    steps = split_math(text)
    if not steps:
        return
    starts = step_char_offsets(steps)
    # random tokenisation: sorted distinct cut points, always starting at 0
    cuts = data.draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=20)) if len(text) > 1 else []
    tok_starts = sorted({0, *cuts})
    ids = token_step_ids(tok_starts, starts)
    assert ids == sorted(ids) and all(0 <= i < len(steps) for i in ids)
    for c, i in zip(tok_starts, ids):
        assert starts[i] <= c < starts[i] + len(steps[i])
    bounds = step_token_boundaries(tok_starts, starts)
    assert bounds == sorted(set(bounds)) and all(0 < b < len(tok_starts) for b in bounds)
    assert len(bounds) <= len(steps) - 1
    for b in bounds:
        assert ids[b - 1] < ids[b]  # each boundary starts a later step


def test_empty_text():
    assert split_gsm8k("") == [] and split_math("") == [] and split_steps("", "math") == []


# ---------------------------------------------------------------------------- maths is not cut


def _display_spans(text):
    """Display maths spans found independently of langenv.steps (\\[..\\], $$..$$, \\begin..\\end)."""
    pattern = re.compile(r"\\\[.*?\\\]|\$\$.*?\$\$|\\begin\{([^{}]*)\}.*?\\end\{\1\}|\[asy\].*?\[/asy\]", re.S)
    return [m.span() for m in pattern.finditer(text)]


def _unescaped_dollars(s):
    return len(re.findall(r"(?<!\\)\$", s))


def test_inline_math_never_cut(math500):
    """Inline ``$..$`` is never cut: in every solution without ``$$``, each step has an even number
    of unescaped ``$``. Display maths and [asy] are cut only right after a newline or, for long
    display lines, after ``=``, ``+``, ``\\equiv`` or ``,``."""
    checked = 0
    for text in math500:
        steps = split_math(text)
        if "$$" not in text and _unescaped_dollars(text) % 2 == 0:
            checked += 1
            for step in steps:
                assert _unescaped_dollars(step) % 2 == 0, (text, step)
        bounds = step_char_offsets(steps)[1:]
        for start, end in _display_spans(text):
            for b in bounds:
                if start < b < end:
                    before = text[:b]
                    assert before.endswith(("\n", "=", "+", "\\equiv", ",")), (text[start:end], b - start)
        for m in re.finditer(r"\\\(.*?\\\)", text, re.S):
            assert not any(m.start() < b < m.end() for b in bounds)
    assert checked > 400


# ---------------------------------------------------------------------------- GSM8K rules


def test_gsm8k_answer_line_merged_into_last_step(gsm8k_test):
    counts = []
    for text in gsm8k_test:
        steps = split_gsm8k(text)
        lines = text.split("\n")
        assert lines[-1].startswith("#### ")
        assert steps[-1].endswith("\n" + lines[-1]) and steps[-1].count("####") == 1
        assert all("####" not in s for s in steps[:-1])
        assert len(steps) == sum(1 for line in lines[:-1] if line.strip())  # one step per non-blank line
        counts.append(len(steps))
    assert 3.0 < statistics.mean(counts) < 4.5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A is 2.\nB is 3.\n#### 5", ["A is 2.\n", "B is 3.\n#### 5"]),
        ("\nA is 2.\nB is 3.\n#### 5", ["\nA is 2.\n", "B is 3.\n#### 5"]),  # SFT target form
        ("\n\n  \nA.\nB.", ["\n\n  \nA.\n", "B."]),  # leading blank lines join the first step
        ("A.\n\nB.\n\n#### 1\n", ["A.\n\n", "B.\n\n#### 1\n"]),  # blank lines join the step before
        ("A.\nB.\n", ["A.\n", "B.\n"]),
        ("#### 7", ["#### 7"]),
        ("\n#### 7", ["\n#### 7"]),
        ("A.\n#### 7\nextra\n#### 8", ["A.\n#### 7\nextra\n#### 8"]),  # all after the answer joins
        ("A.\r\nB.\r\n#### 2", ["A.\r\n", "B.\r\n#### 2"]),
        ("one line", ["one line"]),
        ("\n", ["\n"]),
    ],
)
def test_gsm8k_examples(text, expected):
    assert split_gsm8k(text) == expected
    assert split_steps(text, "gsm8k") == expected


# ---------------------------------------------------------------------------- MATH rules


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # sentence ends: "." + space + capital; the space starts the next step
        (
            "We have that $x = 2$ here. Therefore the answer is $\\boxed{2}$.",
            ["We have that $x = 2$ here.", " Therefore the answer is $\\boxed{2}$."],
        ),
        # no cut after a one-letter word / abbreviation, nor before a lowercase word
        ("Take e.g. The first value of x. Then add 1. then stop.", ["Take e.g. The first value of x. Then add 1. then stop."]),
        # a period inside inline maths does not end a sentence by itself, "$x=1.$ Then" does
        (
            "The value is $x = 1.5 .$ Then we check it twice. So $y = 2.$ Hence we are done here.",
            ["The value is $x = 1.5 .$", " Then we check it twice.", " So $y = 2.$", " Hence we are done here."],
        ),
        # newlines end steps; short fragments without a period join the next step
        (
            "First we compute the sum.\nSo\nthe total is $3 + 4 = 7$ apples.",
            ["First we compute the sum.\n", "So\nthe total is $3 + 4 = 7$ apples."],
        ),
        # display maths: cut at its newlines, opener stays with its first line, closer joins previous
        (
            "Therefore,\n\\begin{align*}\nx &= 1 + 2 + 3 + 4 \\\\\n&= 10.\n\\end{align*}So the answer is $10$.",
            ["Therefore,\n\\begin{align*}\nx &= 1 + 2 + 3 + 4 \\\\\n", "&= 10.\n\\end{align*}", "So the answer is $10$."],
        ),
        (
            "Dividing both sides,\n\\[x = \\frac{12}{4} = 3.\\]Hence $x = 3$.",
            ["Dividing both sides,\n", "\\[x = \\frac{12}{4} = 3.\\]", "Hence $x = 3$."],
        ),
        # [asy] lines are never cut inside; short lines join the previous one
        (
            "See the figure.\n[asy]\ndraw((0,0)--(1,1));\nlabel(\"$A$\", (0,0), W);\n[/asy]\nThe answer is $4$.",
            ["See the figure.\n", "[asy]\ndraw((0,0)--(1,1));\n", "label(\"$A$\", (0,0), W);\n[/asy]\n", "The answer is $4$."],
        ),
        # a long sentence is broken once near the middle, at the comma closest to it
        (
            "If we multiply the first equation by three and add the second one, "
            "we get a new equation in $x$ alone that we can solve directly for $x$.",
            [
                "If we multiply the first equation by three and add the second one,",
                " we get a new equation in $x$ alone that we can solve directly for $x$.",
            ],
        ),
        # a long display line is broken inside the maths at "=" (not inside $..$)
        (
            "\\[(a + b)^2 (a - b)^2 (a^2 + b^2) = (a^2 - b^2)^2 (a^2 + b^2) = (a^4 - 2a^2 b^2 + b^4)(a^2 + b^2) = a^6 - a^4 b^2 - a^2 b^4 + b^6.\\]",
            [
                "\\[(a + b)^2 (a - b)^2 (a^2 + b^2) = (a^2 - b^2)^2 (a^2 + b^2) =",
                " (a^4 - 2a^2 b^2 + b^4)(a^2 + b^2) = a^6 - a^4 b^2 - a^2 b^4 + b^6.\\]",
            ],
        ),
        # long inline maths is left whole
        (
            "$f(-2)+f(-1)+f(0)=\\frac{3(-2)-2}{-2-2}+\\frac{3(-1)-2}{-1-2}+\\frac{3(0)-2}{0-2}=\\frac{-8}{-4}+\\frac{-5}{-3}=\\boxed{3}$",
            ["$f(-2)+f(-1)+f(0)=\\frac{3(-2)-2}{-2-2}+\\frac{3(-1)-2}{-1-2}+\\frac{3(0)-2}{0-2}=\\frac{-8}{-4}+\\frac{-5}{-3}=\\boxed{3}$"],
        ),
        ("\n", ["\n"]),
        ("x", ["x"]),
    ],
)
def test_math_examples(text, expected):
    assert split_math(text) == expected
    assert split_steps(text, "math") == expected


def test_math500_statistics(math500):
    """Step counts on the MATH-500 gold solutions (VinePPO's splitter: mean 9.6, median 7, max 67;
    ours: 8.5 / 6 / 50, see split_math). A loose band, to notice a splitter that changed a lot."""
    counts = [len(split_math(s)) for s in math500]
    assert 7.0 < statistics.mean(counts) < 11.0
    assert 5 <= statistics.median(counts) <= 8
    assert max(counts) <= 80
    lengths = [len(step) for s in math500 for step in split_math(s)]
    assert statistics.median(lengths) < 100


def test_split_steps_unknown_kind():
    with pytest.raises(ValueError, match=r"unknown step kind 'svamp'.*gsm8k, math"):
        split_steps("x", "svamp")


# ---------------------------------------------------------------------------- token mapping


def test_token_mapping_hand_example():
    # text "ab\ncd\nef": steps "ab\n" | "cd\n" | "ef", starts 0, 3, 6
    steps = split_gsm8k("ab\ncd\nef")
    assert steps == ["ab\n", "cd\n", "ef"]
    starts = step_char_offsets(steps)
    assert starts == [0, 3, 6]
    # tokens "ab" | "\ncd" | "\n" | "ef": "\ncd" starts in step 0 and crosses into step 1
    tok = [0, 2, 5, 6]
    assert token_step_ids(tok, starts) == [0, 0, 1, 2]
    assert step_token_boundaries(tok, starts) == [2, 3]
    # an EOS token at offset len(text) belongs to the last step
    assert token_step_ids([0, 2, 5, 6, 8], starts) == [0, 0, 1, 2, 2]


def test_token_spanning_a_whole_step_dedups_boundaries():
    # steps "a\n" | "b\n" | "c" (starts 0, 2, 4); tokens "a" | "\nb\n" | "c"
    starts = [0, 2, 4]
    tok = [0, 1, 4]
    assert token_step_ids(tok, starts) == [0, 0, 2]
    assert step_token_boundaries(tok, starts) == [2]  # step 1 has no token of its own
    # the last step hidden inside a token of the previous one: no boundary equal to num_tokens
    assert step_token_boundaries([0, 1], starts) == []


def test_token_mapping_edge_cases_and_errors():
    assert step_char_offsets([]) == []
    assert token_step_ids([], []) == [] and step_token_boundaries([], [0, 5]) == []
    assert token_step_ids([0, 3], [0]) == [0, 0] and step_token_boundaries([0, 3], [0]) == []
    with pytest.raises(ValueError, match="empty"):
        token_step_ids([0], [])
    with pytest.raises(ValueError, match="begin at 0"):
        token_step_ids([0], [1, 2])
    with pytest.raises(ValueError, match="strictly increasing"):
        token_step_ids([0], [0, 3, 3])
    with pytest.raises(ValueError, match="negative"):
        token_step_ids([-1], [0])
    with pytest.raises(ValueError, match="non-decreasing"):
        step_token_boundaries([0, 4, 2], [0, 3])
