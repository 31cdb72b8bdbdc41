"""Tests for `langenv.grading` (CPU only; the default run takes well under a minute on 2 cores).

The full conformance run over ``shared/testdata/grader_cases.jsonl`` is marked slow; the
GSM8K-test / MATH-500 gold-solution checks are fast (decided without sympy) and run by default.
"""

from __future__ import annotations

import json
import random
import string
import time
from pathlib import Path

import pytest

from langenv import grading
from langenv.grading import STATUSES, Grade, GradingPool, detect_kind, extract_answer, grade

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="module")
def pool():
    with GradingPool(workers=2, timeout_s=5.0) as p:
        yield p


def check(pool, completion, reference, kind=None) -> Grade:
    """Grade through the pool and, as a consistency check, in process; both must agree."""
    g = pool.grade_many([(completion, reference, kind)])[0]
    assert g == grade(completion, reference, kind)
    assert g.status in STATUSES and g.reward == (1.0 if g.status == "correct" else 0.0)
    return g


# ------------------------------------------------------------------------------ API / extraction
def test_api_shapes():
    assert STATUSES == ("correct", "incorrect", "no_answer", "timeout", "invalid", "error")
    g = grade("#### 18", "18", "gsm8k")
    assert g == Grade(1.0, "correct")
    with pytest.raises(Exception):
        g.reward = 0.0  # frozen
    assert detect_kind("She makes $18.\n#### 18") == "gsm8k"
    assert detect_kind("\\frac{1}{2}") == "math"
    assert detect_kind("18") == "math"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{\\sqrt{2}}}.", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("first \\boxed{1} then finally \\fbox{2}", "2"),
        ("the value is \\boxed 5.", "5"),
        ("$\\boxed{1}$ and $\\boxed{2}$", "1, 2"),
        ("far apart: \\boxed{7}. Long unrelated text follows here, quite a lot of it, truly. \\boxed{8}", "8"),
        ("ok \\boxed{3} but then \\boxed{4", "3"),  # unclosed (truncated) box is skipped
        ("Step.\n#### 1,234", "1,234"),
        ("Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.", "-\\frac{2}{3}"),
        ("There were 3 cars. 2 more arrive. The answer is 5.", "5"),
        ("\\boxed{255} ... Final Answer: The final answer is $10,455$. I hope it is correct.", "10,455"),
        ("\\boxed{44}. We may check our answer: $17\\cdot 44 = 748$, so our answer is correct.", "44"),
        ("Thus ... is **73**.\n\n--- \n\nFinal Answer: **73**", "73"),
        ("\\frac{1}{2}", "\\frac{1}{2}"),
        ("64 square feet", "64 square feet"),
        ("the number is not 10 which is 1,000.99", "1,000.99"),  # lenient last number
        ("Therefore $x \\geq 5$ is the solution.", "x \\geq 5"),
        ("I am afraid that I cannot solve this problem.", None),
        ("Evelyn", "Evelyn"),  # a bare text answer
        ("", None),
        ("The answer is \\boxed{4}.<|im_end|> \\boxed{5}", "4"),  # text after end-of-turn ignored
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text, "math") == expected


# ------------------------------------------------------------------------------------ GSM8K
@pytest.mark.parametrize(
    "completion, reference, status",
    [
        ("Janet sells 9 eggs.\n#### 18", "18", "correct"),
        ("#### $18.00", "18", "correct"),
        ("#### 18 dollars", "#### 18", "correct"),
        ("#### 1,234,567", "1234567", "correct"),
        ("#### 1 000", "1000", "correct"),
        ("The answer is 6.", "6", "correct"),
        ("#### 3128 1/2", "3128.5", "correct"),
        ("#### 10%", "0.1", "correct"),
        ("#### 10%", "10", "correct"),
        ("#### 500", "5", "incorrect"),
        ("#### 5.001", "5", "incorrect"),
        ("#### 123457", "123456", "incorrect"),
        ("AZYUK2A", "2", "incorrect"),  # a bare non-number answer; no digit glued to letters
        ("I am not sure how to do this one.", "42", "no_answer"),
        ("", "42", "no_answer"),
        ("#### 1e9", "1000000000", "incorrect"),  # no exponent notation (and nothing evaluated)
    ],
)
def test_gsm8k_formats(pool, completion, reference, status):
    assert check(pool, completion, reference, "gsm8k").status == status


# ------------------------------------------------------------------------------------- MATH
@pytest.mark.parametrize(
    "completion, reference, status",
    [
        # boxed nesting / formatting
        ("\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{\\sqrt{3}}{3}", "correct"),
        ("\\boxed{\\dfrac{9}{7}}", "\\frac{9}{7}", "correct"),
        ("so $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$", "(3, \\frac{\\pi}{2})", "correct"),
        ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", "correct"),
        ("\\boxed{90^\\circ}", "90", "correct"),
        ("\\boxed{\\$16,\\!386.20}", "16386.2", "correct"),
        ("\\boxed{14{,}916}", "14916", "correct"),
        ("\\boxed{\\text{(C)}}", "\\text{C}", "correct"),
        ("\\boxed{E'}", "E", "incorrect"),
        ("\\boxed{204_5}", "204", "incorrect"),  # base-n numerals compare as strings
        # fractions and numbers
        ("\\boxed{0.5}", "\\frac{1}{2}", "correct"),
        ("\\boxed{918\\frac{1}{2}}", "918.5", "correct"),
        ("\\boxed{\\frac{3}{4}}", "3/4", "correct"),
        ("\\boxed{0.0833333333333333}", "\\frac{1}{12}", "correct"),
        ("\\boxed{0.33}", "\\frac{1}{3}", "incorrect"),  # no rounding tolerance
        ("\\boxed{5}", "500", "incorrect"),
        ("\\boxed{1000}", "1,000", "correct"),
    ],
)
def test_math_fast_cases(pool, completion, reference, status):
    assert check(pool, completion, reference, "math").status == status


@pytest.mark.parametrize(
    "completion, reference, status",
    [
        ("\\boxed{(x+1)^2}", "x^2+2x+1", "correct"),
        ("\\boxed{\\frac{1}{\\sqrt{3}}}", "\\frac{\\sqrt{3}}{3}", "correct"),
        ("\\boxed{4.123105625617661}", "\\sqrt{17}", "correct"),
        ("\\boxed{\\frac{1}{2^{98}}}", "\\frac{1}{2^{99}}", "incorrect"),  # no chop (MV #14)
        ("\\boxed{(\\frac{1}{2^{98}}, 1)}", "(\\frac{1}{2^{99}}, 1)", "incorrect"),
        ("\\boxed{\\sqrt{5+2\\sqrt{6}}}", "\\sqrt{2}+\\sqrt{3}", "correct"),  # exact zero difference
        ("\\boxed{\\frac{1}{e^{x^2}}}", "e^{-x^2}", "correct"),  # a symbolic tower is allowed
        ("\\boxed{1 + \\frac{1}{e}}", "1 - \\frac{1}{e}", "incorrect"),
        ("\\boxed{3x-1y+13=0}", "3x + 4y + 14=0", "incorrect"),  # MV #60
        ("\\boxed{x < 3}", "(-\\infty, 3)", "correct"),  # set vs inequality: equivalent
        ("\\boxed{[0,1)}", "[0,9)", "incorrect"),
        ("\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", "correct"),
        ("\\boxed{x = 5}", "5", "correct"),
        ("\\boxed{y=-\\frac{1}{2}x+\\frac{3}{4}}", "2x+4y-3=0", "correct"),
    ],
)
def test_math_symbolic_cases(pool, completion, reference, status):
    assert check(pool, completion, reference, "math").status == status


@pytest.mark.parametrize(
    "completion, reference, status",
    [
        ("\\boxed{1728}", "1331 and 1728", "incorrect"),  # MV #47: every element is required
        ("\\boxed{1331, 1728}", "1728 and 1331", "correct"),  # unordered
        ("\\boxed{1331} and \\boxed{1728}", "1331, 1728", "correct"),
        ("\\boxed{2, 3}", "2", "incorrect"),  # hedging: an extra element fails
        ("\\boxed{1, 2, 3}", "1, 2", "incorrect"),
        ("\\boxed{\\{-2021, 2021\\}}", "\\pm 2021", "correct"),
        ("\\boxed{2021}", "\\pm 2021", "incorrect"),
        ("\\boxed{x+11} or \\boxed{11+x}", "11+x", "correct"),  # same value twice counts once
        ("\\boxed{(7,11), (11,7)}", "(11,7) or (7,11)", "correct"),
        ("\\boxed{(1,3)}", "(3,1)", "incorrect"),  # tuples stay ordered
        ("\\boxed{p=5,q=2;p=7,q=2}", "(5,2),(7,2)", "correct"),
        ("$1, 3, 5, \\ldots, 2n-1$", "$1, 2, \\ldots, n$", "incorrect"),
    ],
)
def test_multi_answer_all_required(pool, completion, reference, status):
    assert check(pool, completion, reference, "math").status == status


@pytest.mark.parametrize(
    "completion, reference, kind, status",
    [
        ("We add 3 + 4 = 7.\nTherefore, the final answer is $\\boxed{7}$.", "7", "math", "correct"),
        ("**Answer:** 42", "42", "gsm8k", "correct"),
        ("The answer is: $\\frac{3}{4}$", "0.75", "math", "correct"),
        ("So $x = \\frac{-1 \\pm \\sqrt{5}}{2}$.", "\\frac{-1+\\sqrt5}{2}, \\frac{-1-\\sqrt5}{2}", "math", "correct"),
        ("We get $\\boxed{\\frac{-1 + \\sqrt{5}}{2}}$.", "\\frac{-1+\\sqrt5}{2}, \\frac{-1-\\sqrt5}{2}", "math", "incorrect"),
        ("It is either 3 or 4: \\boxed{3 \\text{ or } 4}", "3", "math", "incorrect"),
        ("\\boxed{\\frac{\\cos x}{\\sin x}}", "\\cot x", "math", "correct"),
        ("\\boxed{15\\%}", "0.15", "math", "correct"),
        ("\\boxed{5 - 6i}", "6-5i", "math", "incorrect"),
        ("In total she has 5 + 13 = 18 apples", "18", "gsm8k", "correct"),  # lenient fallback
    ],
)
def test_realistic_completions(pool, completion, reference, kind, status):
    assert check(pool, completion, reference, kind).status == status


def test_no_answer_and_invalid_reference(pool):
    assert check(pool, "I am not able to solve this problem.", "\\frac{1}{2}", "math").status == "no_answer"
    assert check(pool, "I give up", "\\frac{1}{2}", "math").status == "incorrect"  # bare text is an answer
    assert check(pool, "The answer is \\boxed{}.", "7", "math").status == "no_answer"
    assert check(pool, "\\boxed{}", "\\boxed{}", "math").status == "invalid"  # empty reference
    assert grade(None, "5").status == "invalid"  # type: ignore[arg-type]
    assert grade("5", None).status == "invalid"  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- safety / guards
def test_garbage_never_raises(pool):
    rng = random.Random(0)
    alphabet = string.printable + "\\{}$^_!\u2212\u00b0\x00\u202e"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))) for _ in range(150)]
    texts += ["\\boxed{" * 500, "}" * 3000, "$" * 3000, "9" * 20000, "\\frac{" * 300, "answer is " * 300,
              "\\[" * 2000, "1," * 3000, "\\pm" * 500, "\\boxed{" + "(" * 80 + "1" + ")" * 80 + "}"]
    refs = ["5", "\\frac{1}{2}", "x^2+1", "1, 2", "#### 7", "(1,2)"]
    start = time.perf_counter()
    items = [(t, rng.choice(refs), rng.choice(["math", "gsm8k", None])) for t in texts]
    items += [(rng.choice(refs), t, "math") for t in texts[:40]]  # garbage references too
    grades = pool.grade_many(items)
    assert len(grades) == len(items)
    assert all(g.status in STATUSES for g in grades)
    for c, r, k in items[:60]:
        assert grade(c, r, k).status in STATUSES
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize(
    "completion, reference",
    [
        ("\\boxed{\\dfrac{5^{\\left(5^{\\left(5^{\\left(5^5\\right)}\\right)} - 4\\right)} - 5}{16}}", "5"),
        ("\\boxed{9^{9^{9^{9}}}}", "9"),
        ("\\boxed{(10^6)!}", "5"),
        ("\\boxed{10000!}", "5"),
        ("\\boxed{\\frac{1}{2006!}}", "\\frac{1}{2004!}"),
        ("\\boxed{10^{10^{8}}}", "10"),
        ("\\boxed{2^{2^{64}}}", "2"),
        ("\\boxed{x^{123456}}", "x"),
        ("\\boxed{" + "(" * 60 + "1" + ")" * 60 + "}", "1"),
        ("\\boxed{" + "7" * 5000 + "}", "7" * 4999 + "8"),
    ],
)
def test_dangerous_inputs_return_quickly(pool, completion, reference):
    start = time.perf_counter()
    g = pool.grade_many([(completion, reference, "math")])[0]
    assert time.perf_counter() - start < 1.0
    assert g.reward == 0.0 and g.status in ("invalid", "incorrect")
    start = time.perf_counter()
    assert grade(completion, reference, "math").reward == 0.0  # refused before sympy in process too
    assert time.perf_counter() - start < 1.0


def test_identical_huge_answers_short_circuit(pool):
    tower = "\\dfrac{5^{\\left(5^{\\left(5^{\\left(5^5\\right)}\\right)} - 4\\right)} - 5}{16}"
    assert check(pool, f"\\boxed{{{tower}}}", tower, "math").status == "correct"
    big = "7" * 5000
    assert check(pool, f"\\boxed{{{big}}}", big, "math").status == "correct"
    assert check(pool, f"#### {big}", big, "gsm8k").status == "correct"


def test_pool_kills_and_replaces_a_worker_after_a_timeout():
    slow = ("\\boxed{(x+1)^{500}}", "(x+2)^{500}", "math")  # sympy needs > 1 s for this
    ok = ("\\boxed{(x+1)^2}", "x^2+2x+1", "math")
    with GradingPool(workers=1, timeout_s=0.5) as small:
        assert small.grade_many([ok]) == [Grade(1.0, "correct")]  # starts and warms the worker
        start = time.perf_counter()
        assert small.grade_many([slow, ok, ok]) == [
            Grade(0.0, "timeout"), Grade(1.0, "correct"), Grade(1.0, "correct")
        ]
        assert time.perf_counter() - start < 10
        assert small.stats["timeout"] == 1
        assert small.grade_many([ok]) == [Grade(1.0, "correct")]


def test_grade_batch_and_is_correct():
    grades = grading.grade_batch(["#### 18", "\\boxed{(x+1)^2}", "I do not know the answer."], ["18", "x^2+2x+1", "3"],
                                 kind=["gsm8k", "math", None])
    assert [g.status for g in grades] == ["correct", "correct", "no_answer"]
    assert grading.is_correct("The answer is \\boxed{\\frac{1}{2}}", "0.5")
    assert grading.is_correct("\\boxed{x^2+2x+1}", "(x+1)^2", "math")
    assert not grading.is_correct("\\boxed{1728}", "1331 and 1728")
    assert not grading.is_correct("\\boxed{9^{9^{9^{9}}}}", "5")
    with pytest.raises(ValueError):
        grading.grade_batch(["a"], [])
    assert grading.default_pool() is grading.default_pool()


# ------------------------------------------------------------------------- data and conformance
def _load_rows(dataset: str) -> list[dict]:
    try:
        from langenv.data import load_split

        return [dict(r) for r in load_split(dataset, "test")]
    except Exception:
        path = SHARED / "data" / dataset / "test.jsonl"
        if not path.exists():
            pytest.skip(f"{dataset} test split not available (langenv.data.load_split failed and {path} is missing)")
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]


def test_gsm8k_gold_rationales_grade_correct(pool):
    rows = _load_rows("gsm8k")
    assert len(rows) == 1319
    items = [(r["answer"], r["answer"].split("####")[-1].strip(), "gsm8k") for r in rows]
    items += [(r["answer"], r["answer"], "gsm8k") for r in rows]
    bad = [(i, g) for i, g in enumerate(pool.grade_many(items)) if g.status != "correct"]
    assert not bad, bad[:5]


def test_math500_gold_solutions_grade_correct(pool):
    rows = _load_rows("math")
    assert len(rows) == 500
    grades = pool.grade_many([(r["solution"], r["answer"], "math") for r in rows])
    bad = [(i, rows[i]["answer"], g) for i, g in enumerate(grades) if g.status != "correct"]
    assert not bad, bad[:5]


@pytest.mark.slow
def test_conformance_cases():
    cases_path = SHARED / "testdata" / "grader_cases.jsonl"
    if not cases_path.exists():
        pytest.skip(f"conformance cases not found at {cases_path}")
    import importlib.util

    spec = importlib.util.spec_from_file_location("grader_conformance", REPO / "experiments" / "bench" / "grader_conformance.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    cases = conf.load_cases(cases_path)
    result = conf.run(cases, workers=2, timeout_s=2.0, detect_kind=False)
    scored = [r for r in result["records"] if not r["case"]["contested"]]
    ok = sum((r["grade"].reward == 1.0) == r["case"]["expected"] for r in scored)
    assert len(scored) == 391
    assert ok / len(scored) >= 0.97
    adversarial = [r for r in result["records"] if r["case"]["adversarial"]]
    assert adversarial and max(r["seconds"] for r in adversarial) < 2.0


# ------------------------------------------------------------------ the paper's GSM8K rule (issue 11 §4)
@pytest.mark.parametrize("completion,status", [
    ("So the answer is 18.", "no_answer"),          # lenient "gsm8k": correct through the fallback
    ("She makes 9 * 2 = 18 dollars.", "no_answer"),  # last number 18
    ("The answer is \\boxed{18}.", "no_answer"),
    ("She makes 18 dollars.\n#### 18", "correct"),
    ("#### $18.00", "correct"),                       # the numbers are compared as for "gsm8k"
    ("#### 17\nActually 18", "incorrect"),           # only the #### line counts
    ("#### 18\n\nSo the answer is 17.", "correct"),
])
def test_gsm8k_strict_needs_a_hashes_line(pool, completion, status):
    assert check(pool, completion, "18", "gsm8k_strict").status == status
    assert check(pool, completion, "She makes 9 * 2 = 18.\n#### 18", "gsm8k_strict").status == status


def test_lenient_is_correct_is_unchanged_and_strict_is_opt_in():
    assert "gsm8k_strict" in grading.KINDS
    assert grading.is_correct("So the answer is 18.", "18")  # detected kind, lenient
    assert grading.is_correct("So the answer is 18.", "18", "gsm8k")
    assert not grading.is_correct("So the answer is 18.", "18", "gsm8k_strict")
    assert extract_answer("So the answer is 18.", "gsm8k_strict") is None
    assert extract_answer("x\n#### 1,234 dollars", "gsm8k_strict") == "1,234 dollars"


@pytest.mark.parametrize("task_name", ["gsm8k", "arithmetic"])
def test_training_and_evaluation_rewards_follow_the_paper_rule(tokenizer, task_name):
    # the env every algorithm and the evaluation step through: no "####" line, reward 0
    from langenv import LanguageEnv
    from langenv.tasks import make_task

    env = LanguageEnv(task_name, tokenizer, split="test", max_new_tokens=64)
    problem = env.problems[0]
    state = env.initial_state(problem)
    eos = tokenizer.eos_token_id

    def reward(text, e=env):
        ids = list(tokenizer(text, add_special_tokens=False).input_ids) + [eos]
        return e.step_states([state], [ids])[0]

    r = reward(f"\nSo the answer is {problem.answer}.")
    assert (r.reward, r.status) == (0.0, "no_answer")
    r = reward(f"\nSo it is\n#### {problem.answer}")
    assert (r.reward, r.status) == (1.0, "correct")
    lenient = LanguageEnv(make_task(task_name, lenient_grading=True), tokenizer, split="test", max_new_tokens=64)
    assert reward(f"\nSo the answer is {problem.answer}.", lenient).reward == 1.0
