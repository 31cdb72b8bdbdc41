"""Grading under fault (issue 5): timeouts, the memory cap, crashing workers, a wedged pool, the
per-iteration status counts through the env path, and the grading canary.

Faults are injected through the worker's documented test hook (`langenv.grading._worker.FAULTS`):
a pool built while ``LANGENV_GRADING_FAULT_INJECTION=1`` honours references whose first line is
``__langenv_fault__:<fault>[:<pid file>]``. Monkeypatching the worker function in this process
would not work: workers are separate interpreters that import `langenv.grading._worker` fresh.
A worker that cannot start is simulated through the other documented hook, ``LANGENV_GRADING_PYTHON``
(the workers' interpreter). CPU only; about 20 s on 2 cores.
"""

from __future__ import annotations

import time

import pytest

from langenv import LanguageEnv, grading
from langenv.canary import check_canary, run_canary
from langenv.grading import FAULT_INJECTION_ENV, FAULT_PREFIX, Grade, GradingPool
from langenv.tasks.base import VINEPPO_PROMPT, VINEPPO_STOP, Problem

OK = ("\\boxed{(x+1)^2}", "x^2+2x+1", "math")  # needs sympy: always goes to a worker
TIMEOUT_S = 0.5


def fault(name: str, pid_file=None, reference: str = "x^2+2x+1", completion: str = "\\boxed{(x+1)^2}"):
    header = FAULT_PREFIX + name + (f":{pid_file}" if pid_file else "")
    return (completion, f"{header}\n{reference}", "math")


def running(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def fault_pool():
    """A 1-worker pool with the fault-injection hook on and a 0.5 s per-check timeout."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_INJECTION_ENV, "1")
        pool = GradingPool(workers=1, timeout_s=TIMEOUT_S)
    assert pool.fault_injection
    with pool:
        assert pool.grade_many([OK]) == [Grade(1.0, "correct")]  # start and warm the worker
        yield pool


# ------------------------------------------------------------------------------------ the pool
def test_timeout_kills_and_replaces_the_worker(fault_pool, tmp_path):
    before = dict(fault_pool.stats)
    start = time.perf_counter()
    grades = fault_pool.grade_many([fault("hang", tmp_path / "hung.pid"), OK, OK])
    assert grades == [Grade(0.0, "timeout"), Grade(1.0, "correct"), Grade(1.0, "correct")]
    assert time.perf_counter() - start < 5
    hung = int((tmp_path / "hung.pid").read_text())
    assert not running(hung), "the worker that ran past the timeout must have been killed"
    assert fault_pool.grade_many([fault("pid", tmp_path / "next.pid")]) == [Grade(1.0, "correct")]
    assert int((tmp_path / "next.pid").read_text()) != hung  # served by a replacement worker
    assert fault_pool.stats["timeout"] == before["timeout"] + 1


def test_memory_cap_gives_invalid_and_the_pool_survives(fault_pool, tmp_path):
    # the "oom" fault allocates twice the RLIMIT_AS cap: without the cap it would succeed and the
    # check would grade "correct", so this also proves that the cap is in force in the worker
    assert fault_pool.grade_many([fault("oom", tmp_path / "oom.pid"), OK]) == [Grade(0.0, "invalid"), Grade(1.0, "correct")]
    assert fault_pool.grade_many([OK]) == [Grade(1.0, "correct")]


@pytest.mark.parametrize(
    "name, crashes",
    [
        ("exit", 2),  # os._exit(70): retried once on a fresh worker, dies again -> "error"
        ("segv", 2),  # SIGSEGV, like a crash in C code
        ("exit0", 2),  # os._exit(0): the pool sees the worker's output close
        ("raise", 0),  # an exception out of the worker's own code: the worker lives on
    ],
)
def test_crashing_worker_is_an_error_and_the_pool_recovers(fault_pool, tmp_path, name, crashes):
    before = dict(fault_pool.stats)
    pid_file = tmp_path / "w.pid"
    bad, ok = fault_pool.grade_many([fault(name, pid_file), OK])
    assert (bad, ok) == (Grade(0.0, "error"), Grade(1.0, "correct"))
    assert bad.cause and (name == "raise" or "died 2 times" in bad.cause)
    assert fault_pool.stats["crash"] == before["crash"] + crashes
    assert fault_pool.stats["error"] == before["error"] + 1
    if name != "raise":
        assert not running(int(pid_file.read_text()))
    assert fault_pool.grade_many([OK]) == [Grade(1.0, "correct")]


def test_mixed_faults_in_one_batch():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_INJECTION_ENV, "1")
        pool = GradingPool(workers=2, timeout_s=TIMEOUT_S)
    with pool:
        items = [OK, fault("hang"), fault("segv"), OK, fault("oom"), fault("exit"), ("#### 18", "18", "gsm8k"), OK]
        start = time.perf_counter()
        statuses = [g.status for g in pool.grade_many(items)]
        assert statuses == ["correct", "timeout", "error", "correct", "invalid", "error", "correct", "correct"]
        assert time.perf_counter() - start < 30  # includes the pool's start-up and 5 replacements
        assert pool.stats["fast"] == 1 and pool.stats["pool"] == 7


def test_fault_hook_is_off_by_default(monkeypatch):
    monkeypatch.delenv(FAULT_INJECTION_ENV, raising=False)
    with GradingPool(workers=1, timeout_s=TIMEOUT_S) as pool:
        assert not pool.fault_injection
        # the marker is just text (graded as such, never acted on): no hang, no timeout
        start = time.perf_counter()
        [g] = pool.grade_many([fault("hang", reference="5", completion="#### 5")])
        assert g.status != "timeout" and pool.stats["timeout"] == 0
        assert time.perf_counter() - start < 10 * TIMEOUT_S


def _fake_python(tmp_path, body: str) -> str:
    path = tmp_path / "fake-python"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("python, expected", [
    ("/nonexistent/bin/python3", "FileNotFoundError"),  # the interpreter is missing
    ("exits", "exit code 3"),  # it starts but dies before it is ready (e.g. sympy not importable)
    ("hangs", "not ready within start_timeout_s"),  # it never becomes ready
])
def test_a_worker_that_cannot_start_is_an_error_never_a_grade(tmp_path, monkeypatch, python, expected):
    if python == "exits":
        python = _fake_python(tmp_path, "echo 'ModuleNotFoundError: No module named sympy' >&2; exit 3")
    elif python == "hangs":
        python = _fake_python(tmp_path, "exec sleep 60")
    monkeypatch.setenv(grading.PYTHON_ENV, python)
    with GradingPool(workers=2, timeout_s=TIMEOUT_S, start_timeout_s=1.0) as pool:
        start = time.perf_counter()
        grades = pool.grade_many([OK, ("#### 18", "18", "gsm8k"), OK])
        assert [g.status for g in grades] == ["error", "correct", "error"]  # the fast path still works
        assert time.perf_counter() - start < 10
        assert expected in grades[0].cause and python in grades[0].cause and expected in pool.last_error
        assert pool.stats["start_failed"] >= 2 and pool.stats["error"] == 2
        monkeypatch.delenv(grading.PYTHON_ENV)
        # recovers once a worker can start; the 1 s start limit above only keeps the failures fast, a
        # real start on a busy 2-core machine can take longer (seen: CI with other processes running)
        pool.start_timeout_s = 60.0
        assert pool.grade_many([OK]) == [Grade(1.0, "correct")]


def test_is_correct_raises_when_it_cannot_check(monkeypatch):
    monkeypatch.setenv(grading.PYTHON_ENV, "/nonexistent/bin/python3")
    monkeypatch.setattr(grading, "_DEFAULT", GradingPool(workers=1, timeout_s=TIMEOUT_S))
    with pytest.raises(grading.GradingError, match="could not start.*FileNotFoundError.*/nonexistent/bin/python3"):
        grading.is_correct("\\boxed{(x+1)^2}", "x^2+2x+1")
    assert grading.is_correct("#### 18", "18")  # decided in process: no worker needed
    [g] = grading.grade_batch(["\\boxed{(x+1)^2}"], ["x^2+2x+1"])
    assert g.status == "error" and g.reward == 0.0 and "could not start" in g.cause


# --------------------------------------------------------------------------- through the env
class FaultTask:
    """A GSM8K-format task whose problem i has answer 5; problems listed in ``faults`` carry a
    fault-injecting reference (the worker then grades against "5")."""

    name = "faulty"
    grading_kind = "gsm8k"
    stop_strings = VINEPPO_STOP

    def __init__(self, faults: dict[int, str]):
        self.faults = faults

    def load(self, split):
        return [
            Problem(f"faulty/{split}/{i}", f"Question {i}?", "2 + 3 = 5\n#### 5",
                    f"{FAULT_PREFIX}{self.faults[i]}\n5" if i in self.faults else "5")
            for i in range(4)
        ]

    def prompt(self, problem):
        return VINEPPO_PROMPT.format(problem=problem.question)

    def target(self, problem):
        return "\n" + problem.solution

    def split_steps(self, response):
        return [response]


@pytest.fixture
def fault_default_pool(fault_pool, monkeypatch):
    """Route `grading.grade_batch` (the env's grading call) to the fault-injecting pool."""
    monkeypatch.setattr(grading, "_DEFAULT", fault_pool)
    return fault_pool


def test_env_step_states_reports_and_counts_fault_statuses(tokenizer, fault_default_pool):
    from algos.rollout import Episode, episode_metrics

    env = LanguageEnv(FaultTask({1: "hang", 2: "oom"}), tokenizer, split="train", max_new_tokens=32,
                      grading_timeout_s=TIMEOUT_S)
    eos = tokenizer.eos_token_id
    enc = lambda s: list(tokenizer(s, add_special_tokens=False).input_ids)
    p = env.problems
    states = [env.initial_state(p[i]) for i in (0, 1, 2, 3, 0)]
    chunks = [enc("\n#### 5") + [eos], enc("\n#### 5") + [eos], enc("\n#### 5") + [eos],
              enc("\nI do not know.") + [eos], enc("1 2 3 4 " * 40)]  # the last is truncated
    results = env.step_states(states, chunks)
    assert [r.status for r in results] == ["correct", "timeout", "invalid", "no_answer", "truncated"]
    assert [r.reward for r in results] == [1.0, 0.0, 0.0, 0.0, 0.0]
    metrics = episode_metrics([Episode(r.state, r.reward, r.status, r.text) for r in results])
    assert {k: metrics[f"grading/{k}"] for k in ("correct", "timeout", "invalid", "no_answer", "truncated")} == {
        "correct": 1.0, "timeout": 1.0, "invalid": 1.0, "no_answer": 1.0, "truncated": 1.0}
    assert metrics["grading/incorrect"] == 0.0


def test_env_reports_a_grading_error_and_step_raises(tokenizer, monkeypatch):
    monkeypatch.setenv(grading.PYTHON_ENV, "/nonexistent/bin/python3")
    monkeypatch.setattr(grading, "_DEFAULT", GradingPool(workers=1, timeout_s=TIMEOUT_S))
    env = LanguageEnv("math", tokenizer, split="test", max_new_tokens=64)
    eos = tokenizer.eos_token_id
    chunk = list(tokenizer("\\boxed{(x+1)^2}", add_special_tokens=False).input_ids) + [eos]
    problem = Problem("p", "Expand.", "", "x^2+2x+1")
    [r] = env.step_states([env.initial_state(problem)], [chunk])
    assert (r.status, r.reward) == ("error", 0.0) and "could not start" in r.info["grading_error"]
    env.reset(options={"problem": problem})
    before = env.snapshot()
    with pytest.raises(grading.GradingError, match="problem 'p'.*could not start"):
        env.step(chunk)
    assert env.snapshot() == before  # unchanged: the step can be retried


# ----------------------------------------------------------------------------------- canary
def _references(result):
    return [i for i in result.items if not i.problem_id.startswith("canary/")]


@pytest.mark.parametrize("task, split", [("gsm8k", "train"), ("math", "train"), ("math", "test")])
def test_canary_passes_on_real_data(tokenizer, task, split):
    env = LanguageEnv(task, tokenizer, split=split, max_new_tokens=1024)
    sent_before = grading.default_pool().stats["pool"]
    result = check_canary(env)
    refs = _references(result)
    assert result.passed and len(refs) == 20 and len({i.problem_id for i in refs}) == 20
    assert all(i.round_trip and i.status == "correct" and i.expected == 1.0 for i in refs)
    probes = result.items[len(refs):]
    assert [i.expected for i in probes] == ([1.0, 1.0, 0.0] if task == "math" else [0.0])
    assert all(i.round_trip for i in probes) and probes[-1].status == "incorrect"
    if task == "math":  # the positive probes reached the sympy workers
        assert all("needs a grading worker" in i.note for i in probes[:2])
        assert grading.default_pool().stats["pool"] >= sent_before + 2
    assert result.seconds < 15  # MATH: includes the first start of the default pool (~1.5-3 s)


def test_canary_catches_a_broken_worker_pool(tokenizer, monkeypatch):
    """Reference solutions are decided in process; only the probes notice that workers fail."""
    env = LanguageEnv("math", tokenizer, split="test", max_new_tokens=1024)
    monkeypatch.setenv(grading.PYTHON_ENV, "/nonexistent/bin/python3")  # no worker can start
    monkeypatch.setattr(grading, "_DEFAULT", GradingPool(workers=1, timeout_s=TIMEOUT_S))
    result = run_canary(env)
    # all three probes need a worker (the known-wrong one too: it must be "incorrect", not "error")
    assert [i.problem_id for i in result.failures] == ["canary/math/0", "canary/math/1", "canary/math/2"]
    assert all(i.status == "error" and i.cause == "grading" for i in result.failures)
    with pytest.raises(RuntimeError, match="canary/math/0: status='error' reward=0.0 extracted='\\(x\\+1\\)\\^2'") as err:
        check_canary(env)
    assert "could not start" in str(err.value) and "/nonexistent/bin/python3" in str(err.value)


def test_canary_catches_a_grader_that_says_yes_to_everything(tokenizer, monkeypatch):
    env = LanguageEnv("gsm8k", tokenizer, split="test", max_new_tokens=1024)
    monkeypatch.setattr(grading, "grade_batch", lambda c, r, kind=None, timeout_s=None: [Grade(1.0, "correct")] * len(c))
    with pytest.raises(RuntimeError, match="canary/gsm8k_strict/0: status='correct' reward=1.0 extracted='8'.*known-WRONG"):
        check_canary(env, count=3)


def test_canary_passes_on_arithmetic_with_a_char_tokenizer():
    from algos.models.tiny import build_char_tokenizer
    from langenv.tasks import make_task

    task = make_task("arithmetic", train_size=200, validation_size=20, test_size=50)
    problems = task.load("train")
    tok = build_char_tokenizer([task.prompt(p) + task.target(p) for p in problems])
    env = LanguageEnv(task, tok, split="train", max_new_tokens=96)
    result = check_canary(env)
    assert result.passed and len(_references(result)) == 20


def test_canary_fails_loudly_when_grading_returns_zero(tokenizer, monkeypatch):
    env = LanguageEnv("math", tokenizer, split="test", max_new_tokens=1024)
    monkeypatch.setattr(grading, "grade_batch", lambda c, r, kind=None, timeout_s=None: [Grade(0.0, "incorrect")] * len(c))
    with pytest.raises(RuntimeError) as err:
        check_canary(env, count=5)
    msg = str(err.value)
    first = run_canary(env, count=5).items[0]
    assert "grading canary FAILED (grading)" in msg and "GRADER scored a known-correct answer" in msg
    assert first.problem_id in msg and "status='incorrect'" in msg
    assert f"extracted={first.extracted!r}" in msg and first.extracted  # the answer was found


def test_canary_fails_loudly_when_the_grading_path_raises(tokenizer, monkeypatch):
    env = LanguageEnv("gsm8k", tokenizer, split="test", max_new_tokens=1024)

    def broken(self, items, timeout_s=None):
        raise ValueError("math-verify blew up")

    monkeypatch.setattr(GradingPool, "grade_many", broken)
    with pytest.raises(RuntimeError, match="status='error'") as err:
        check_canary(env, count=3)
    assert "ValueError: math-verify blew up" in str(err.value)


def test_canary_blames_the_tokenizer_not_the_grader():
    from algos.models.tiny import build_char_tokenizer

    tok = build_char_tokenizer(["0123456789 +-*=#\n"])  # cannot spell \boxed
    env = LanguageEnv("math", tok, split="test", max_new_tokens=2048)
    result = run_canary(env, count=4)
    assert all(not i.round_trip for i in result.items)  # every solution and probe loses its letters
    assert result.failures  # (some still score 1.0: "\\boxed{5}" decodes to "5")
    assert all(i.cause == "tokenizer" and not i.round_trip and "b" in i.unrepresentable for i in result.failures)
    with pytest.raises(RuntimeError, match="TOKENIZER cannot round-trip") as err:
        check_canary(env, count=4)
    assert "GRADER" not in str(err.value)


def test_canary_reports_a_timeout_as_a_timeout(tokenizer, fault_default_pool):
    env = LanguageEnv(FaultTask({2: "hang"}), tokenizer, split="train", max_new_tokens=64, grading_timeout_s=TIMEOUT_S)
    result = run_canary(env, count=4)
    bad = result.failures
    assert [i.problem_id for i in bad] == ["faulty/train/2"] and result.retried == ("faulty/train/2",)
    assert bad[0].status == "timeout" and bad[0].cause == "timeout" and bad[0].extracted == "5"
    with pytest.raises(RuntimeError, match="FAILED \\(timeout\\)") as err:
        check_canary(env, count=4)
    assert "TIMED OUT" in str(err.value) and "not a wrong answer" in str(err.value) and "GRADER" not in str(err.value)
    # and a crash in the grader is blamed on grading, with the extracted answer shown
    env = LanguageEnv(FaultTask({1: "segv"}), tokenizer, split="train", max_new_tokens=64, grading_timeout_s=TIMEOUT_S)
    with pytest.raises(RuntimeError, match="faulty/train/1: status='error' reward=0.0 extracted='5'"):
        check_canary(env, count=4)


def test_canary_rejects_a_bad_count(tokenizer):
    env = LanguageEnv("gsm8k", tokenizer, split="test", max_new_tokens=64)
    with pytest.raises(ValueError, match="count"):
        run_canary(env, count=0)
