"""Prompt samplers (algos/training/prompts.py): the uniform reshuffle and sampling for learnability
on a synthetic task whose per-problem success rates are known."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ToyTask

from algos.config import SamplingConfig
from algos.models.policy import clone_reference
from algos.samplers.base import Completion
from algos.training.context import TrainContext
from algos.training.prompts import LearnabilityPrompts, learnability, make_prompt_sampler, select_prompts
from langenv import LanguageEnv
from langenv.tasks.base import Problem


class KnownRateTask(ToyTask):
    """Problems whose answer is 1; problem ``i`` is answered correctly with rate RATES[i % 3]."""

    RATES = (0.0, 0.5, 1.0)

    def __init__(self, n=30):
        self.problems = [Problem(id=f"rate{self.RATES[i % 3]}/{i}", question=f"pick {i}", solution="#### 1", answer="1")
                         for i in range(n)]


class KnownRateSampler:
    """Answers a prompt of problem i correctly ("#### 1") with probability RATES[i % 3], else "#### 2"."""

    def __init__(self, tokenizer, task):
        self.tok, self.rate = tokenizer, {}
        for p in task.problems:
            ids = tuple(LanguageEnv(task, tokenizer).initial_state(p).token_ids)
            self.rate[ids] = float(p.id.split("/")[0].removeprefix("rate"))

    def generate(self, prompts, params, seed=None):
        rng = np.random.default_rng(seed)
        out = []
        for prompt in prompts:
            group = []
            for _ in range(params.n):
                text = " #### 1" if rng.random() < self.rate[tuple(prompt)] else " #### 2"
                ids = self.tok(text, add_special_tokens=False).input_ids
                group.append(Completion(ids, [0.0] * len(ids), "stop", text))
            out.append(group)
        return out

    def update_weights(self, model):
        pass


@pytest.fixture
def ctx(tokenizer, small_model):
    task = KnownRateTask()
    env = LanguageEnv(task, tokenizer, split="train", max_new_tokens=16)
    return TrainContext(task, env, KnownRateSampler(tokenizer, task), small_model, clone_reference(small_model),
                        tokenizer, seed=0)


def test_learnability_is_the_reward_variance():
    assert learnability(0.0) == learnability(1.0) == 0.0 and learnability(0.5) == 0.25
    assert learnability(0.2) == pytest.approx(learnability(0.8))
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    assert learnability(rewards.mean()) == pytest.approx(rewards.var())  # p̂(1 − p̂) = population variance


def test_choices_concentrate_on_mixed_problems_never_solved_or_hopeless(ctx):
    # 30 problems, a third each at p = 0, 0.5, 1; the pool is all of them (3 x 8 chosen, capped at 30);
    # 16 attempts make a p = 0.5 problem look solved or hopeless with chance 2 / 2^16
    sampler = LearnabilityPrompts(ctx, SamplingConfig(max_new_tokens=16), pool_factor=4, attempts=16)
    for iteration in range(3):
        chosen, metrics = sampler.select(ctx.task.problems, 8, iteration)
        assert len({p.id for p in chosen}) == 8
        assert all(p.id.startswith("rate0.5/") for p in chosen)  # p = 0 and p = 1 score 0 once estimated
        assert metrics["prompts/learnability_chosen"] > metrics["prompts/learnability_pool"]
        assert metrics["prompts/pool_mixed"] == pytest.approx(1 / 3)
        assert metrics["tokens/prompt_selection"] > 0
    again, _ = LearnabilityPrompts(ctx, SamplingConfig(max_new_tokens=16), 4, 16).select(ctx.task.problems, 8, 2)
    assert [p.id for p in again] == [p.id for p in chosen]  # seeded by (seed, iteration): deterministic


def test_chosen_problems_each_score_at_least_every_rejected_one(ctx, monkeypatch):
    sampler = LearnabilityPrompts(ctx, SamplingConfig(max_new_tokens=16), pool_factor=2, attempts=4)
    seen = {}
    original = sampler.scores

    def record(pool, iteration):
        p_hat, tokens = original(pool, iteration)
        seen.update({p.id: learnability(x) for p, x in zip(pool, p_hat)})
        return p_hat, tokens

    monkeypatch.setattr(sampler, "scores", record)
    chosen, _ = sampler.select(ctx.task.problems, 6, 0)
    rejected = set(seen) - {p.id for p in chosen}
    assert len(seen) == 12 and min(seen[p.id] for p in chosen) >= max(seen[r] for r in rejected)


def test_uniform_is_the_seeded_reshuffle_and_bad_settings_are_refused(ctx):
    uniform = make_prompt_sampler("uniform", ctx, SamplingConfig())
    chosen, metrics = uniform.select(ctx.task.problems, 5, 3)
    assert chosen == select_prompts(ctx.task.problems, 5, 0, 3) and metrics == {}
    with pytest.raises(ValueError, match="prompt_sampler: expected one of"):
        make_prompt_sampler("hardest", ctx, SamplingConfig())
    with pytest.raises(ValueError, match="attempts >= 2"):
        LearnabilityPrompts(ctx, SamplingConfig(), attempts=1)


def test_dynamic_sampling_fills_the_batch_with_mixed_groups(ctx):
    params = SamplingConfig(max_new_tokens=16).params(8, ())
    problems = ctx.task.problems[:6]  # rates 0, 0.5, 1, 0, 0.5, 1: two mixed groups to start with
    ctx.dynamic_sampling_rounds = 5
    episodes, m = ctx.collect_groups(problems, params, iteration=0)
    groups = [episodes[i:i + 8] for i in range(0, len(episodes), 8)]
    assert len(groups) == 6 and m["dynamic/fill"] == 1.0 and m["dynamic/rounds"] >= 2
    assert all(g[0].state.problem.id.startswith("rate0.5/") for g in groups)
    assert all(max(e.reward for e in g) > min(e.reward for e in g) for g in groups)
    assert len({g[0].state.problem.id for g in groups}) == 6  # no problem drawn twice in an iteration
    assert m["tokens/dynamic_discarded"] > 0 and m["dynamic/groups_sampled"] > 6
    ctx.dynamic_sampling_rounds = 0
    plain, none = ctx.collect_groups(problems, params, iteration=0)
    assert none == {} and len(plain) == 48  # off: every group, and the same first round
    assert [e.text for e in plain[8:16]] == [e.text for e in episodes[:8]]


def test_dynamic_sampling_with_no_extra_rounds_keeps_what_it_has(ctx):
    from algos.rollout import collect_mixed_groups

    params = SamplingConfig(max_new_tokens=16).params(8, ())
    episodes, m = collect_mixed_groups(ctx.env, ctx.sampler, ctx.task.problems[:6], params,
                                       draw=lambda r, n: ctx.task.problems[6:6 + n], seed_for=lambda r: r, max_rounds=0)
    assert len(episodes) == 16 and m["dynamic/fill"] == pytest.approx(2 / 6) and m["dynamic/rounds"] == 1
