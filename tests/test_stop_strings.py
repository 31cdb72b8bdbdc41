"""A response stopped by a stop string ends *before* the stop string, then EOS, in the episode the
update sees (issue 11 §4; McGill-NLP/VinePPO cuts responses before "\\n\\n\\nProblem:"): through
the env directly, token by token, and through the real samplers."""

from __future__ import annotations

import pytest
from conftest import ToyTask

from algos.rollout import collect_episodes
from algos.samplers.base import SamplingParams
from algos.samplers.hf import HFSampler
from algos.samplers.prefix_sharing import PrefixSharingSampler
from langenv import LanguageEnv

STOP = "\n\n\nProblem:"


def encode(tok, text):
    return list(tok(text, add_special_tokens=False).input_ids)


@pytest.fixture
def env(tokenizer):
    return LanguageEnv("gsm8k", tokenizer, split="test", max_new_tokens=256)


def test_stop_string_is_cut_from_the_episode_and_eos_appended(env):
    tok = env.tokenizer
    problem = env.problems[0]
    env.reset(options={"problem": problem})
    target = env.task.target(problem)
    _, reward, terminated, truncated, info = env.step(encode(tok, target + STOP + " Next one"))
    assert (reward, terminated, truncated) == (1.0, True, False)
    response = env.snapshot().response_ids
    assert list(response) == encode(tok, target) + [tok.eos_token_id]  # no "\n\n\nProblem:" tokens
    assert "Problem:" not in tok.decode(list(response)) and info["text"] == target


def test_stop_string_arriving_token_by_token_cuts_back_to_before_it(env):
    tok = env.tokenizer
    problem = env.problems[1]
    env.reset(options={"problem": problem})
    target = env.task.target(problem)
    ids = encode(tok, target + STOP)
    for t in ids:
        _, reward, terminated, _, info = env.step([t])
        if terminated:
            break
    assert terminated and reward == 1.0 and info["text"] == target
    assert list(env.snapshot().response_ids) == encode(tok, target) + [tok.eos_token_id]


def test_stop_string_hit_exactly_at_the_budget_still_terminates_before_it(tokenizer):
    target_ids = encode(tokenizer, "\n#### 5")
    env = LanguageEnv("gsm8k", tokenizer, split="test", max_new_tokens=len(target_ids) + len(encode(tokenizer, STOP)))
    env.reset(options={"problem_index": 0})
    _, _, terminated, truncated, info = env.step(encode(tokenizer, "\n#### 5" + STOP))
    assert terminated and not truncated and info["status"] in ("correct", "incorrect")
    assert list(env.snapshot().response_ids) == target_ids + [tokenizer.eos_token_id]


class StopTask(ToyTask):
    def __init__(self, stop_strings, n=2):
        super().__init__(n)
        self.stop_strings = stop_strings


def test_a_token_straddling_the_stop_string_is_dropped_and_the_grader_text_is_unchanged(tokenizer):
    # " an" straddles the stop string "nswer" (which starts at its "n"): the episode keeps the tokens
    # before " an"; the grader still sees the text up to the stop string, "So the a"
    assert [tokenizer.decode([t]) for t in encode(tokenizer, "So the answer")][:3] == ["So", " the", " an"]
    env = LanguageEnv(StopTask(("nswer",)), tokenizer, max_new_tokens=64)
    env.reset(options={"problem_index": 0})
    _, _, terminated, _, info = env.step(encode(tokenizer, "So the answer is 1."))
    assert terminated and info["text"] == "So the a"
    assert list(env.snapshot().response_ids) == encode(tokenizer, "So the") + [tokenizer.eos_token_id]
    assert env.stop_cut(encode(tokenizer, "So the answer")) == ("So the a", 2)
    assert env.stop_cut(encode(tokenizer, "So the")) == ("So the", None)


@pytest.mark.parametrize("make_sampler", [
    lambda model, tok: HFSampler(model, tok, max_batch_size=16),
    lambda model, tok: PrefixSharingSampler(model, tok, max_batch_size=16),
], ids=["hf", "prefix_sharing"])
def test_sampled_episodes_never_hold_the_stop_string(tokenizer, small_model, make_sampler):
    # a random model writes "e" often: most completions stop on it
    task = StopTask(("e",), n=4)
    env = LanguageEnv(task, tokenizer, max_new_tokens=24)
    sampler = make_sampler(small_model, tokenizer)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=24, stop_strings=task.stop_strings, n=4)
    episodes = collect_episodes(env, sampler, task.problems, params, seed=0)
    stopped = 0
    for e in episodes:
        ids = list(e.response_ids)
        kept = tokenizer.decode(ids, skip_special_tokens=True)
        assert "e" not in kept  # never a stop string's token in what is trained on
        assert e.text.startswith(kept) and "e" not in e.text
        if e.state.terminated:
            assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[:-1]
            stopped += 1
    assert stopped >= len(episodes) // 2  # (a random model rarely emits EOS: these are stop-string stops)
