"""reasoning-gym datasets as tasks (``rg:<dataset>``) and their grading kinds, through the real worker pool."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import reasoning_gym
from gymnasium.utils.env_checker import check_env

from langenv import LanguageEnv, grading
from langenv.canary import RG_WRONG_ANSWER, check_canary
from langenv.grading import _rg
from langenv.tasks import make_task
from langenv.tasks.base import Problem
from langenv.tasks.reasoning_gym import ReasoningGymTask, split_seeds

DATASETS = ("basic_arithmetic", "chain_sum", "countdown")
SIZES = {"train_size": 30, "validation_size": 8, "test_size": 12}


def small(dataset: str, **kwargs) -> ReasoningGymTask:
    return make_task(f"rg:{dataset}", **{**SIZES, **kwargs})


def splits(task) -> dict[str, list[Problem]]:
    return {s: task.load(s) for s in ("train", "validation", "test")}


def entry(problem: Problem) -> dict:
    return json.loads(problem.answer)["entry"]


# ---------------------------------------------------------------------------------------------- task
@pytest.mark.parametrize("dataset", DATASETS)
def test_splits_are_seeded_sized_and_disjoint(dataset):
    task = small(dataset)
    assert isinstance(task, ReasoningGymTask) and task.name == task.grading_kind == f"rg:{dataset}"
    a = splits(task)
    assert {s: len(p) for s, p in a.items()} == {"train": 30, "validation": 8, "test": 12}
    from langenv.tasks import reasoning_gym as module

    module._splits.cache_clear()  # regenerated from the same knobs
    assert splits(small(dataset)) == a  # deterministic, not just cached
    test_q = [p.question for p in a["test"]]
    val_q = [p.question for p in a["validation"]]
    assert len(set(test_q)) == len(test_q) and len(set(val_q)) == len(val_q)
    assert not set(test_q) & set(val_q)
    assert not {p.question for p in a["train"]} & (set(test_q) | set(val_q))
    ids = [p.id for ps in a.values() for p in ps]
    assert len(set(ids)) == len(ids) and a["test"][3].id == f"rg:{dataset}/test/3"
    # the generator ranges of the splits never overlap, and the train size does not move the test set
    assert splits(small(dataset, train_size=5))["test"] == a["test"]
    assert splits(small(dataset, seed=1))["test"] != a["test"]
    for p in a["test"][:3]:  # the reference is the reasoning-gym entry itself
        e = entry(p)
        assert p.question == e["question"] and p.solution == "#### " + e["answer"]
        assert json.loads(p.answer)["dataset"] == dataset and ("dataset", dataset) in p.meta


def test_split_seeds_never_share_a_generator_seed():
    for seed in range(50):
        budgets = {"train": 10_000, "validation": 500, "test": 2_000}
        seeds = split_seeds(seed, budgets)
        ranges = sorted((seeds[s], seeds[s] + budgets[s]) for s in budgets)
        assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(ranges)), (seed, seeds)
    # forced collisions (budgets covering most of the seed space) are moved apart
    seeds = split_seeds(0, {"train": 2**29, "validation": 2**29, "test": 2**29})
    ranges = sorted((v, v + 2**29) for v in seeds.values())
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(ranges))


def test_prompt_target_steps_and_config():
    task = small("chain_sum", min_terms=2, max_terms=2)
    p = task.load("test")[0]
    prompt = task.prompt(p)
    assert prompt.startswith("[MATH_TASK] Problem:\n" + p.question.rstrip()) and prompt.endswith("\n\nSolution:")
    assert '"#### <answer>"' in prompt
    assert task.target(p) == "\n#### " + entry(p)["answer"]
    assert all(e.count("+") + e.count("-") == 1 for e in (dict(q.meta)["expression"] for q in task.load("test")))
    response = "\n7 + 5 = 12\n\n12 - 3 = 9\n#### 9"
    assert "".join(task.split_steps(response)) == response and len(task.split_steps(response)) == 2
    custom = make_task("rg:chain_sum", step_splitter=lambda r: [r], **SIZES)
    assert custom.split_steps(response) == [response]
    assert json.loads(p.answer)["config"] == {"max_terms": 2, "min_terms": 2}
    assert make_task("rg:chain_sum", size=7).train_size == 7  # reasoning-gym's name for the size


def test_make_task_errors():
    with pytest.raises(ValueError, match=r"no dataset 'countdwn'.*did you mean countdown.*chain_sum"):
        make_task("rg:countdwn")
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*rg:<name>"):
        make_task("nope")
    with pytest.raises(ValueError, match=r"^min_trms: not a config field .*min_terms"):
        make_task("rg:chain_sum", min_trms=2)
    with pytest.raises(ValueError, match=r"rejects the config"):
        make_task("rg:chain_sum", min_terms=0)
    with pytest.raises(ValueError, match=r"^size: an alias of train_size"):
        make_task("rg:chain_sum", size=3, train_size=4)
    with pytest.raises(ValueError, match=r"^test_size: expected an int >= 1"):
        make_task("rg:chain_sum", test_size=0)
    with pytest.raises(ValueError, match=r"^split: expected one of"):
        small("chain_sum").load("dev")


def test_missing_reasoning_gym_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # `import reasoning_gym` raises ImportError
    with pytest.raises(ImportError, match=r"pip install reasoning-gym"):
        make_task("rg:countdown")


# ------------------------------------------------------------------------------------------- grading
@pytest.mark.parametrize("dataset", DATASETS)
def test_reference_targets_are_correct_and_wrong_answers_not_through_the_pool(dataset):
    task = small(dataset)
    problems = task.load("test")[:6]
    refs = [p.answer for p in problems]
    fast_before = grading.default_pool().stats["fast"]
    good = grading.grade_batch([task.target(p) for p in problems], refs, kind=task.grading_kind)
    assert [g.status for g in good] == ["correct"] * 6 and all(g.reward == 1.0 for g in good)
    wrong = grading.grade_batch(["\n#### 123456789", RG_WRONG_ANSWER, "the answer is " + entry(problems[2])["answer"]],
                                refs[:3], kind=task.grading_kind)
    assert [(g.reward, g.status) for g in wrong] == [(0.0, "incorrect"), (0.0, "incorrect"), (0.0, "no_answer")]
    assert grading.default_pool().stats["fast"] == fast_before  # never decided in process
    assert grading._fast(task.target(problems[0]), refs[0], task.grading_kind) is None


def test_extraction_is_the_last_hashes_line():
    p = small("chain_sum").load("test")[0]
    answer = entry(p)["answer"]
    text = f"\nfirst try\n#### 0\nno wait\n####   {answer}  \n"
    assert grading.extract_answer(text, "rg:chain_sum") == answer
    assert grading.extract_answer("no marker", "rg:chain_sum") is None
    assert grading.extract_answer("#### \n", "rg:chain_sum") is None
    g = grading.grade_batch([text, f"#### {answer}\nand some more text", "####"], [p.answer] * 3, kind="rg:chain_sum")
    assert [x.status for x in g] == ["correct", "correct", "no_answer"]
    assert _rg.extract("#### a b\nc d\n", multiline=True) == "a b\nc d"


def test_multiline_reference_answers_are_read_to_the_end():
    ref = _rg.make_reference("basic_arithmetic", {}, {"question": "q", "answer": "1 2\n3 4", "metadata": {}})
    g = grading.grade_batch(["\n#### 1 2\n3 4", "\n#### 1 2"], [ref, ref], kind="rg:basic_arithmetic")
    assert [x.status for x in g] == ["correct", "incorrect"]


def test_partial_credit_is_incorrect():
    task = small("countdown")
    p = task.load("test")[0]
    numbers = entry(p)["metadata"]["numbers"]
    formatted_wrong = "\n#### " + " + ".join(map(str, numbers))  # all numbers, wrong value: countdown gives 0.05
    ds = reasoning_gym.create_dataset("countdown", size=1, seed=0)
    assert 0.0 < ds.score_answer(formatted_wrong.split("#### ")[1], entry(p)) < 1.0
    g = grading.grade_batch([formatted_wrong], [p.answer], kind=task.grading_kind)[0]
    assert (g.reward, g.status) == (0.0, "incorrect")


def test_a_scorer_that_raises_is_invalid_with_its_cause_not_an_error():
    # reasoning-gym's default score_answer reads entry["answer"]: an entry without one makes it raise KeyError
    broken = _rg.make_reference("basic_arithmetic", {}, {"question": "q", "metadata": {}})
    other = small("chain_sum").load("test")[0]
    g = grading.grade_batch(["\n#### 5", "\n#### 5", "\n#### 5"],
                            [broken, "not json", other.answer], kind=["rg:basic_arithmetic", "rg:chain_sum", "rg:countdown"])
    assert [x.status for x in g] == ["invalid"] * 3 and all(x.reward == 0.0 for x in g)
    assert "score_answer raised KeyError" in g[0].cause
    assert "not the JSON of a reasoning-gym entry" in g[1].cause
    assert "'chain_sum'" in g[2].cause and "rg:countdown" in g[2].cause
    # the pool still works afterwards
    assert grading.grade_batch(["\n#### " + entry(other)["answer"]], [other.answer], kind="rg:chain_sum")[0].status == "correct"


def test_an_unknown_dataset_is_a_grading_error_never_a_zero():
    ref = _rg.make_reference("no_such_dataset", {}, {"question": "q", "answer": "1", "metadata": {}})
    g = grading.grade_batch(["\n#### 1"], [ref], kind="rg:no_such_dataset")[0]
    assert g.status == "error" and "no_such_dataset" in g.cause
    with pytest.raises(grading.GradingError, match="no_such_dataset"):
        grading.is_correct("\n#### 1", ref, "rg:no_such_dataset")


def test_grade_in_process_matches_the_pool():
    p = small("countdown").load("test")[1]
    assert grading.grade("\n#### " + entry(p)["answer"], p.answer, "rg:countdown").status == "correct"
    assert grading.grade("\n#### 1+1", p.answer, "rg:countdown").status == "incorrect"


# ----------------------------------------------------------------------------------------------- env
@pytest.fixture
def rg_env(tokenizer):
    return LanguageEnv(small("countdown"), tokenizer, split="test", max_new_tokens=64)


def test_env_step_states_grades_through_the_pool(rg_env):
    env, tok = rg_env, rg_env.tokenizer
    problems = env.problems[:3]
    states = [env.initial_state(p) for p in problems]

    def ids(text):
        return list(tok(text, add_special_tokens=False).input_ids) + [tok.eos_token_id]

    chunks = [ids(env.task.target(problems[0])), ids("\n#### 1 + 2"), ids("\nI do not know.")]
    results = env.step_states(states, chunks)
    assert [(r.reward, r.status) for r in results] == [(1.0, "correct"), (0.0, "incorrect"), (0.0, "no_answer")]
    # a stop string cuts the text before it; the answer before is graded
    stop = ids(env.task.target(problems[1]) + env.task.stop_strings[0] + " more")
    assert env.step_states([states[1]], [stop])[0].status == "correct"


def test_check_env_and_canary(rg_env):
    check_env(rg_env, skip_render_check=True)
    result = check_canary(rg_env, count=3)
    assert result.passed and len(result.items) == 4
    assert result.items[-1].problem_id.startswith("canary/rg:countdown/") and result.items[-1].status == "incorrect"


def test_tiny_setup_is_character_level():
    from algos.models.warm_start import tiny_setup

    assert tiny_setup("rg:countdown").tokenizer == "char" == tiny_setup("arithmetic").tokenizer
    assert tiny_setup("rg:countdown") == tiny_setup("arithmetic")


# ----------------------------------------------------------------------------------------------- run
@pytest.mark.parametrize("dataset", DATASETS)
def test_one_grpo_iteration_per_dataset(dataset, tmp_path, tokenizer, small_model):
    """`--task rg:<dataset>` end to end with a tiny model: canary, sampling, grading, one update, evaluation."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from experiments.run import main

    model_dir = tmp_path / "model"
    small_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    summary = main([
        "algo:grpo", "--task", f"rg:{dataset}", "--model", str(model_dir), "--iterations", "1", "--out", str(out),
        "--wandb", "disabled", "--prompts-per-iteration", "2", "--max-new-tokens", "12", "--eval-problems", "4",
        "--canary-problems", "2", "--cache-dir", str(tmp_path / "cache"), "--samples-per-prompt", "2",
        "--minibatch-size", "4", "--micro-batch-size", "2",
    ])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert json.loads((out / "config.json").read_text())["run"]["task"] == f"rg:{dataset}"
    assert 0.0 <= summary["accuracy_after"] <= 1.0
