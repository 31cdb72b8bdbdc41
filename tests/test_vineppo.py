"""VinePPO's maths on a toy task whose value at every prefix is known exactly.

The toy policy is tabular: the first line is "a" or "b" with probability 1/2 each; then "so";
then "#### 1" (correct) with probability 0.9 after "a" and 0.2 after "b". So
V(s_0) = 0.55, V(after a) = 0.9, V(after b) = 0.2. Steps are GSM8K lines (the answer line joins
the last step): ["a\\n", "so\\n#### d"].
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from algos.config import with_fields
from algos.core import step_advantages
from algos.models.policy import clone_reference
from algos.rollout import collect_episodes, step_layout
from algos.samplers.base import Completion, SamplingParams
from algos.training.context import TrainContext
from algos.vineppo import VinePPO, VinePPOConfig, token_advantages
from langenv import LanguageEnv, Problem
from langenv.steps import split_gsm8k

P_FIRST_A, P_CORRECT = 0.5, {"a": 0.9, "b": 0.2}


class ToyTask:
    name, grading_kind, stop_strings = "toy", "gsm8k", ()

    def load(self, split):
        return [Problem(id="toy/0", question="pick", solution="a\nso\n#### 1", answer="1")]

    def prompt(self, problem):
        return "Q: pick\nA:"

    def target(self, problem):
        return problem.solution

    def split_steps(self, response):
        return split_gsm8k(response)


class TabularSampler:
    """A stochastic tabular policy over whole lines (the test's model, implementing `Sampler`)."""

    def __init__(self, tokenizer, prompt_text, p_first_a=P_FIRST_A, p_correct=P_CORRECT):
        self.tok, self.prompt_text = tokenizer, prompt_text
        self.p_first_a, self.p_correct = p_first_a, p_correct
        self.calls = []

    def _continue(self, response, rng):
        text = ""
        if response == "":
            text = "a\n" if rng.random() < self.p_first_a else "b\n"
            response = text
        if response.count("\n") == 1:
            first = response[0]
            text += "so\n" + ("#### 1" if rng.random() < self.p_correct[first] else "#### 0")
        return text

    def generate(self, prompts, params, seed=None):
        rng = np.random.default_rng(seed)
        self.calls.append(len(prompts))
        out = []
        for ids in prompts:
            full = self.tok.decode(ids, skip_special_tokens=True)
            response = full[len(self.prompt_text):]
            group = []
            for _ in range(params.n):
                text = self._continue(response, rng)
                tokens = self.tok(text, add_special_tokens=False).input_ids + [self.tok.eos_token_id]
                group.append(Completion(tokens, [0.0] * len(tokens), "stop", text))
            out.append(group)
        return out

    def update_weights(self, model):
        pass


@pytest.fixture
def toy(tokenizer, small_model):
    task = ToyTask()
    env = LanguageEnv(task, tokenizer, split="train", max_new_tokens=64)
    sampler = TabularSampler(tokenizer, task.prompt(task.load("train")[0]))
    ctx = TrainContext(task, env, sampler, small_model, clone_reference(small_model), tokenizer, seed=0)
    return env, sampler, ctx


def make_algo(ctx, **overrides):
    settings = dict(prompts_per_iteration=1, samples_per_prompt=8, mc_rollouts=4, max_new_tokens=64,
                    minibatch_size=8, micro_batch_size=8)
    cfg = with_fields(VinePPOConfig(), **{**settings, **overrides})
    return VinePPO(cfg, ctx, total_iterations=1)


def test_step_advantages_hand_computed_and_telescoping():
    values, reward = [0.55, 0.9], 1.0
    assert step_advantages(values, reward) == pytest.approx([0.9 - 0.55, 1.0 - 0.9])
    adv = step_advantages([0.3, 0.5, 0.25, 0.75], 0.0)
    assert adv == pytest.approx([0.2, -0.25, 0.5, -0.75])
    assert sum(adv) == pytest.approx(0.0 - 0.3)  # Σ A_i = R − V(s_0)


def test_layout_maps_every_token_to_its_step_and_eos_to_the_last(toy):
    env, sampler, ctx = toy
    episodes = collect_episodes(env, sampler, env.problems, SamplingParams(0.6, 0.9, 64, (), 4), seed=1)
    for e in episodes:
        layout = step_layout(e, ctx.tokenizer, ctx.task.split_steps)
        assert len(layout.token_steps) == len(e.response_ids)
        assert len(layout.boundaries) == 2 and layout.boundaries[0] == 0
        first_line = ctx.tokenizer(e.text[:2], add_special_tokens=False).input_ids
        assert layout.boundaries[1] == len(first_line)
        adv = token_advantages(layout, [0.5, 0.8], e.reward)
        assert adv[: layout.boundaries[1]] == [pytest.approx(0.3)] * layout.boundaries[1]
        assert adv[-1] == pytest.approx(e.reward - 0.8) and e.response_ids[-1] == ctx.tokenizer.eos_token_id


def test_mc_values_converge_to_the_true_values(toy):
    env, sampler, ctx = toy
    algo = make_algo(ctx)
    v0, after = [], {"a": [], "b": []}
    for it in range(60):
        episodes = collect_episodes(env, sampler, env.problems, SamplingParams(0.6, 0.9, 64, (), 8), seed=1000 + it)
        layouts = [step_layout(e, ctx.tokenizer, ctx.task.split_steps) for e in episodes]
        values, stats = algo.estimate_values(episodes, layouts, it)
        # the 8 trajectories share one s_0 request; identical step-1 prefixes are estimated once
        assert stats["requests"] == 16 and stats["unique_states"] <= 3
        assert len({v[0] for v in values}) == 1
        v0.append(values[0][0])
        per_state = {e.text[0]: v[1] for e, v in zip(episodes, values)}  # one estimate per unique state
        for first, value in per_state.items():
            after[first].append(value)
    # each V̂ is a mean of K=4 Bernoulli draws: bound the error of their average by 4 standard errors
    for est, p in ((v0, 0.55), (after["a"], 0.9), (after["b"], 0.2)):
        se = math.sqrt(p * (1 - p) / 4 / len(est))
        assert abs(np.mean(est) - p) < 4 * se, (p, np.mean(est), len(est))


def test_deterministic_policy_gives_exact_values_for_any_k(tokenizer, small_model):
    task = ToyTask()
    env = LanguageEnv(task, tokenizer, split="train", max_new_tokens=64)
    sampler = TabularSampler(tokenizer, task.prompt(task.load("train")[0]), p_first_a=1.0, p_correct={"a": 1.0, "b": 0.0})
    ctx = TrainContext(task, env, sampler, small_model, clone_reference(small_model), tokenizer, seed=0)
    for k in (1, 3):
        algo = make_algo(ctx, mc_rollouts=k)
        episodes = collect_episodes(env, sampler, env.problems, SamplingParams(0.6, 0.9, 64, (), 2), seed=0)
        layouts = [step_layout(e, tokenizer, task.split_steps) for e in episodes]
        values, _ = algo.estimate_values(episodes, layouts, 0)
        assert values == [[1.0, 1.0], [1.0, 1.0]]


def test_step_cap_backfills_the_return_so_later_steps_get_zero_advantage(toy):
    env, sampler, ctx = toy
    algo = make_algo(ctx, max_step_for_value_estimation=0)
    episodes = collect_episodes(env, sampler, env.problems, SamplingParams(0.6, 0.9, 64, (), 8), seed=3)
    layouts = [step_layout(e, ctx.tokenizer, ctx.task.split_steps) for e in episodes]
    values, stats = algo.estimate_values(episodes, layouts, 0)
    assert stats["unique_states"] == 1
    for e, v in zip(episodes, values):
        assert v[1] == e.reward
        assert step_advantages(v, e.reward)[1] == 0.0


def test_one_iteration_updates_the_policy_and_reports_finite_metrics(toy):
    env, sampler, ctx = toy
    algo = make_algo(ctx, learning_rate=1e-3, warmup_ratio=0.0)
    before = [p.detach().clone() for p in ctx.policy.parameters()]
    metrics = algo.iteration(env.problems, 0)
    assert any(not torch.equal(a, b) for a, b in zip(before, ctx.policy.parameters()))
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["vineppo/value_requests"] == 16 and metrics["update/optimizer_steps"] == 2


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="mc_rollouts"):
        with_fields(VinePPOConfig(), mc_rollouts=0)
    with pytest.raises(ValueError, match="learning_rate"):
        with_fields(VinePPOConfig(), learning_rate=-1e-6)
    with pytest.raises(ValueError, match="top_p"):
        with_fields(VinePPOConfig(), top_p=1.5)


def test_layout_matches_brute_force_token_mapping_on_real_solutions(tokenizer, gsm8k_task):
    from algos.rollout import Episode
    from langenv.state import EnvState
    from langenv.steps import step_char_offsets, token_step_ids

    for problem in gsm8k_task.load("test")[:40]:
        ids = tuple(tokenizer(gsm8k_task.target(problem), add_special_tokens=False).input_ids) + (tokenizer.eos_token_id,)
        episode = Episode(EnvState(problem, (1,), ids, max_new_tokens=len(ids), terminated=True), 1.0, "correct", "")
        layout = step_layout(episode, tokenizer, gsm8k_task.split_steps)
        text = tokenizer.decode(list(ids), skip_special_tokens=True)
        starts = [len(tokenizer.decode(list(ids[:t]), skip_special_tokens=True)) for t in range(len(ids))]
        raw = token_step_ids(starts, step_char_offsets(gsm8k_task.split_steps(text)))
        runs = [0] + [t for t in range(1, len(ids)) if raw[t] != raw[t - 1]]
        assert list(layout.boundaries) == runs
        assert len(layout.boundaries) == len(gsm8k_task.split_steps(text))


@pytest.mark.parametrize("sampler_name", ["hf", "prefix_sharing"])
def test_mc_rollouts_ask_only_for_the_room_left_after_the_prefix(tokenizer, small_model, sampler_name):
    """VinePPO's MC rollouts from a prefix of L response tokens generate at most budget − L tokens
    (issue 11 §4); the env would truncate there anyway, so the values are unchanged in law."""
    from algos.samplers.hf import HFSampler
    from algos.samplers.prefix_sharing import PrefixSharingSampler

    base = {"hf": HFSampler, "prefix_sharing": PrefixSharingSampler}[sampler_name]

    class Recording(base):  # the real sampler, recording what it returned for which prompt
        def generate(self, prompts, params, seed=None, **kwargs):
            out = super().generate(prompts, params, seed=seed, **kwargs)
            self.seen.extend((len(p), len(c.token_ids)) for p, group in zip(prompts, out) for c in group)
            return out

    budget = 20
    task = ToyTask()
    env = LanguageEnv(task, tokenizer, split="train", max_new_tokens=budget)
    sampler = Recording(small_model, tokenizer, max_batch_size=32)
    sampler.seen = []
    ctx = TrainContext(task, env, sampler, small_model, clone_reference(small_model), tokenizer, seed=0)
    algo = make_algo(ctx, samples_per_prompt=2, mc_rollouts=3, max_new_tokens=budget, temperature=1.0, top_p=1.0)
    params = algo.config.sampling.params(2, task.stop_strings)
    episodes = collect_episodes(env, sampler, env.problems, params, seed=0)
    # MC states at 0, 5, 10 and 15 response tokens of each episode (a random model writes few lines)
    layouts = [step_layout(e, tokenizer, lambda text: [text]) for e in episodes]
    layouts = [type(l)((0, 5, 10, 15), tuple(min(t // 5, 3) for t in range(len(e.response_ids))))
               for l, e in zip(layouts, episodes)]
    assert all(len(e.response_ids) == budget for e in episodes)  # (the random model never stops)
    prompt_len = len(episodes[0].prompt_ids)
    sampler.seen = []
    values, stats = algo.estimate_values(episodes, layouts, 0)
    assert stats["unique_states"] == 1 + 3 * len(episodes)
    rooms = {budget - (n - prompt_len) for n, _ in sampler.seen}
    assert rooms == {20, 15, 10, 5}
    longest: dict[int, int] = {}
    for n, generated in sampler.seen:
        room = budget - (n - prompt_len)
        assert generated <= room  # never a token past the room the prefix leaves
        longest[room] = max(longest.get(room, 0), generated)
    assert longest == {r: r for r in rooms}  # (rows that do not stop run exactly to their room)
    assert all(len(v) == 4 and all(0.0 <= x <= 1.0 for x in v) for v in values)
