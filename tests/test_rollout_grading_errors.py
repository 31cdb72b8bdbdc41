"""Collection stops, before any update, when the grader cannot check more than a small share of the
responses (`algos.rollout.check_grading_errors`): an infrastructure failure is never trained on as
reward 0. The first test uses a real grading pool whose workers cannot start (the documented
``LANGENV_GRADING_PYTHON`` hook), a real tokenizer and a real `LanguageEnv`."""

from __future__ import annotations

import pytest

from algos.rollout import GRADING_STATUSES, check_grading_errors, collect_episodes, episode_metrics
from algos.samplers.base import Completion, SamplingParams
from langenv import LanguageEnv, grading
from langenv.env import StepResult
from langenv.grading import GradingError, GradingPool
from langenv.tasks.base import Problem


class SquareTask:
    """MATH-format problems whose answer x^2+2x+1 needs a symbolic check (always a worker)."""

    name, grading_kind, stop_strings = "square", "math", ()

    def load(self, split):
        return [Problem(id=f"sq/{i}", question=f"Expand (x+1)^2 ({i})", solution="\\boxed{x^2+2x+1}",
                        answer="x^2+2x+1") for i in range(2)]

    def prompt(self, problem):
        return f"Q: {problem.question}\nA:"

    def target(self, problem):
        return problem.solution

    def split_steps(self, response):
        return [response]


class FixedSampler:
    """Answers every prompt with ``text`` (then EOS)."""

    def __init__(self, tokenizer, text):
        self.tok, self.text = tokenizer, text

    def generate(self, prompts, params, seed=None):
        ids = self.tok(self.text, add_special_tokens=False).input_ids
        return [[Completion(ids, [0.0] * len(ids), "stop", self.text)] * params.n for _ in prompts]

    def update_weights(self, model):
        pass


def test_collection_stops_when_no_grading_worker_can_start(tokenizer, monkeypatch):
    monkeypatch.setenv(grading.PYTHON_ENV, "/nonexistent/bin/python3")
    monkeypatch.setattr(grading, "_DEFAULT", GradingPool(workers=1, timeout_s=2.0, start_timeout_s=2.0))
    task = SquareTask()
    env = LanguageEnv(task, tokenizer, split="train", max_new_tokens=32)
    params = SamplingParams(1.0, 1.0, 32, (), 2)
    with pytest.raises(GradingError, match=r"4 of 4 graded responses \(100%, more than 5%\).*could not start"):
        collect_episodes(env, FixedSampler(tokenizer, " \\boxed{(x+1)^2}"), task.load("train"), params, seed=0)
    # answers decided in process need no worker: nothing to stop
    episodes = collect_episodes(env, FixedSampler(tokenizer, " no answer here"), task.load("train"), params, seed=0)
    assert [e.status for e in episodes] == ["no_answer"] * 4


def _results(statuses):
    p = Problem(id="p", question="q", solution="s", answer="1")
    from langenv.state import EnvState

    state = EnvState(p, (1,), (5, 2), max_new_tokens=8, eos_token_id=2, terminated=True)
    return [StepResult(state, 0.0, s, "", {"grading_error": "worker died"} if s == "error" else {}) for s in statuses]


def test_a_small_share_of_errors_is_counted_not_fatal():
    # 2 of 40 graded (5%) is at the limit: counted; truncated and running results are not graded
    results = _results(["error"] * 2 + ["correct"] * 38 + ["truncated"] * 5 + ["running"])
    assert check_grading_errors(results) == 2
    with pytest.raises(GradingError, match=r"3 of 40 graded responses \(8%, more than 5%\).*First cause: worker died"):
        check_grading_errors(_results(["error"] * 3 + ["incorrect"] * 37))
    assert check_grading_errors(_results(["error"] * 3 + ["incorrect"] * 37), max_share=0.1) == 3


def test_episode_metrics_count_the_error_status():
    from algos.rollout import Episode

    episodes = [Episode(r.state, r.reward, r.status, r.text) for r in _results(["error", "correct", "correct"])]
    metrics = episode_metrics(episodes)
    assert "error" in GRADING_STATUSES and metrics["grading/error"] == 1.0 and metrics["grading/correct"] == 2.0


def test_group_metrics_by_hand():
    from conftest import fake_episodes

    from algos.rollout import group_metrics

    episodes = fake_episodes({"a": [1.0, 0.0, 0.0, 1.0], "b": [0.0, 0.0, 0.0, 0.0], "c": [1.0, 1.0, 1.0, 1.0]})
    m = group_metrics(episodes)
    assert m["train/groups_mixed"] == pytest.approx(1 / 3)
    assert m["train/groups_all_correct"] == pytest.approx(1 / 3) and m["train/groups_all_wrong"] == pytest.approx(1 / 3)
    # pass rates 0.5, 0, 1: population std sqrt(((0)^2 + 0.5^2 + 0.5^2) / 3)
    assert m["train/pass_rate_std"] == pytest.approx((0.5 / 3) ** 0.5)
    assert group_metrics([]) == {}
