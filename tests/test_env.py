"""The environment contract: Gymnasium conformance, determinism, snapshot/restore, the EOS trick."""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import langenv
from langenv import EnvState, LanguageEnv


@pytest.fixture
def env(tokenizer):
    return LanguageEnv("gsm8k", tokenizer, split="test", max_new_tokens=256)


def gold_tokens(env, problem):
    return list(env.tokenizer(env.task.target(problem), add_special_tokens=False).input_ids) + [env.tokenizer.eos_token_id]


def test_registered_ids_and_check_env(tokenizer):
    for env_id in ("langenv/GSM8K-v1", "langenv/MATH-v1"):
        env = gym.make(env_id, tokenizer=tokenizer, max_new_tokens=16)
        check_env(env.unwrapped, skip_render_check=True)
        env.close()


def test_reset_is_seeded(env):
    obs_a, info_a = env.reset(seed=7)
    obs_b, info_b = env.reset(seed=7)
    assert info_a == info_b and np.array_equal(obs_a, obs_b)
    ids = {env.reset(seed=s)[1]["problem_id"] for s in range(10)}
    assert len(ids) > 1


def test_gold_solution_is_rewarded_and_wrong_answer_is_not(env):
    problem = env.problems[0]
    env.reset(options={"problem": problem})
    obs, reward, terminated, truncated, info = env.step(gold_tokens(env, problem))
    assert (reward, terminated, truncated, info["status"]) == (1.0, True, False, "correct")
    assert obs[-1] == env.tokenizer.eos_token_id
    env.reset(options={"problem": problem})
    wrong = env.tokenizer("\nSo it is 3.\n#### 123456", add_special_tokens=False).input_ids + [env.tokenizer.eos_token_id]
    _, reward, terminated, _, info = env.step(wrong)
    assert (reward, terminated, info["status"]) == (0.0, True, "incorrect")


def test_truncation_gives_zero_and_no_eos(tokenizer):
    env = LanguageEnv("gsm8k", tokenizer, split="test", max_new_tokens=5)
    problem = env.problems[0]
    env.reset(options={"problem": problem})
    obs, reward, terminated, truncated, info = env.step(gold_tokens(env, problem))
    assert (reward, terminated, truncated, info["status"]) == (0.0, False, True, "truncated")
    assert len(env.snapshot().response_ids) == 5
    assert tokenizer.eos_token_id not in env.snapshot().response_ids
    with pytest.raises(ValueError, match="finished episode"):
        env.step([1])


def test_eos_on_the_last_allowed_token_terminates(tokenizer):
    env = LanguageEnv("gsm8k", tokenizer, split="test", max_new_tokens=3)
    env.reset(options={"problem_index": 0})
    _, _, terminated, truncated, _ = env.step([10, 11, tokenizer.eos_token_id])
    assert terminated and not truncated


def test_stop_string_terminates_and_is_cut_before_grading(env):
    problem = env.problems[0]
    env.reset(options={"problem": problem})
    text = env.task.target(problem) + "\n\n\nProblem: next one"
    _, reward, terminated, _, info = env.step(env.tokenizer(text, add_special_tokens=False).input_ids)
    assert terminated and reward == 1.0 and "Problem:" not in info["text"]


def test_snapshot_restore_at_every_prefix_gives_identical_next_step(env):
    problem = env.problems[3]
    tokens = gold_tokens(env, problem)
    env.reset(options={"problem": problem})
    snapshots, outcomes = [], []
    for t in tokens:
        snapshots.append(env.snapshot())
        outcomes.append(env.step([t]))
    final = env.snapshot()
    assert outcomes[-1][1] == 1.0
    for n, (snap, t, out) in enumerate(zip(snapshots, tokens, outcomes)):
        assert final.prefix(n) == snap
        env.restore(snap)
        again = env.step([t])
        assert np.array_equal(again[0], out[0]) and again[1:4] == out[1:4]


def test_state_pickle_round_trip_and_prefix_bounds(env):
    problem = env.problems[1]
    env.reset(options={"problem": problem})
    env.step(gold_tokens(env, problem)[:10])
    state = env.snapshot()
    clone = pickle.loads(pickle.dumps(state))
    assert clone == state and isinstance(clone, EnvState)
    assert state.prefix(len(state.response_ids)) is state
    with pytest.raises(ValueError):
        state.prefix(len(state.response_ids) + 1)


def test_step_states_is_pure_and_batched(env):
    problem = env.problems[0]
    start = env.initial_state(problem)
    gold = gold_tokens(env, problem)
    results = env.step_states([start, start, start], [gold, gold[:4], [env.tokenizer.eos_token_id]])
    assert [r.reward for r in results] == [1.0, 0.0, 0.0]
    assert [r.status for r in results] == ["correct", "running", "no_answer"]
    assert start.response_ids == ()


def test_prompt_longer_than_context_is_a_clear_error(tokenizer):
    env = LanguageEnv("gsm8k", tokenizer, split="test", max_new_tokens=8, max_context=16)
    with pytest.raises(ValueError, match="leaves no room"):
        env.reset(options={"problem_index": 0})


def test_unknown_task_lists_valid_names(tokenizer):
    with pytest.raises(ValueError, match="gsm8k"):
        LanguageEnv("nope", tokenizer)


def test_package_exports():
    assert "gsm8k" in langenv.task_names() and "math" in langenv.task_names()


@pytest.mark.parametrize("action, fragment", [
    ([10**9], "token id 1000000000 is outside the vocabulary [0, {V})"),
    ([-1], "token id -1 is outside the vocabulary [0, {V})"),
    ([5, "VOCAB"], "token id {V} is outside the vocabulary [0, {V})"),
    (np.array([[1, 2], [3, 4]]), "got a 2-D value of shape (2, 2)"),
    ([[1], [2]], "got a 2-D value"),
    ("hello", "got a str 'hello'; encode text with the tokenizer first"),
    (b"hi", "got a bytes"),
    ([1.0, 2.0], "got 1.0 (float)"),
    (np.array([1.5]), "got 1.5 (float)"),
    ([1, 2.5], "got 1.0 (float)"),  # numpy upcasts the list: still refused, naming the float
    ([True], "got True (bool)"),
    (7, "got a 0-D value"),
    ([[1, 2], [3]], "expected a 1-D sequence"),  # ragged
    (["a"], "got 'a' (str)"),
])
def test_bad_actions_are_refused_and_leave_the_state_unchanged(env, action, fragment):
    env.reset(seed=0)
    env.step([10, 11])
    before = env.snapshot()
    vocab = len(env.tokenizer)
    if isinstance(action, list) and "VOCAB" in action:
        action = [vocab if t == "VOCAB" else t for t in action]
    with pytest.raises(ValueError) as err:
        env.step(action)
    msg = str(err.value)
    assert fragment.replace("{V}", str(vocab)) in msg, msg
    assert f"[0, {vocab})" in msg  # the valid range is always named
    assert env.snapshot() == before


def test_good_actions_of_every_integer_form_are_accepted(env):
    env.reset(seed=0)
    eos, top = env.tokenizer.eos_token_id, len(env.tokenizer) - 1
    ids = [t for t in range(10, 20) if t != eos]
    for action in ([ids[0], ids[1]], (ids[2],), np.array(ids[3:5], dtype=np.int32), np.array([ids[5]], dtype=np.uint8), [],
                   np.array([], dtype=np.int64), [np.int64(ids[6])], [top if top != eos else top - 1]):
        n = len(env.snapshot().response_ids)
        env.step(action)
        assert len(env.snapshot().response_ids) == n + len(action)
