"""Monte-Carlo value diagnostics (algos/training/mc_diagnostics.py): hand-computed comparisons, and a
real diagnosis through the env on a task whose state values are known exactly."""

from __future__ import annotations

import pytest
from conftest import ToyTask

from algos.config import SamplingConfig
from algos.models.policy import clone_reference
from algos.rollout import Episode
from algos.samplers.base import Completion
from algos.training.context import TrainContext
from algos.training.mc_diagnostics import MCDiagnostics, compare_to_mc
from langenv import LanguageEnv


def test_compare_to_mc_by_hand():
    m = compare_to_mc([0.5, -0.2, 0.1, 0.3], [1.0, -1.0, 0.0, -0.5], critic=[0.5, 0.5], mc_values_=[0.0, 1.0])
    assert m["mc_diag/sign_agreement"] == pytest.approx(2 / 3)  # the step with MC advantage 0 is not counted
    assert m["mc_diag/value_mae"] == pytest.approx(0.5) and m["mc_diag/value_bias"] == pytest.approx(0.0)
    assert m["mc_diag/value_corr"] == pytest.approx(float("nan"), nan_ok=True)  # a constant critic


class PrefixSampler:
    """Continues any state with the right answer if its text so far contains "good", else a wrong one:
    V(s) is exactly 1 after a "good" line and 0 before."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def generate(self, prompts, params, seed=None):
        out = []
        for ids in prompts:
            text = " #### 1" if "good" in self.tok.decode(ids) else " #### 2"
            toks = self.tok(text, add_special_tokens=False).input_ids
            out.append([Completion(toks, [0.0] * len(toks), "stop", text)] * params.n)
        return out

    def update_weights(self, model):
        pass


def test_a_diagnosis_with_known_state_values(tokenizer, small_model):
    task = ToyTask(n=1)
    env = LanguageEnv(task, tokenizer, split="train", max_new_tokens=48)
    ctx = TrainContext(task, env, PrefixSampler(tokenizer), small_model, clone_reference(small_model), tokenizer,
                       seed=0)
    ids = tokenizer(" good\nstep\n#### 1", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    [result] = env.step_states([env.initial_state(task.problems[0])], [ids])
    assert result.reward == 1.0
    episode = Episode(result.state, result.reward, result.status, result.text)
    n = len(episode.response_ids)
    diag = MCDiagnostics(ctx, SamplingConfig(max_new_tokens=48), every=2, states=8, k=2)
    ctx.advantage_observers.append(diag.observe)

    ctx.observe_advantages(0, [episode], [[0.5] * n], [[0.5] * n])  # iteration 0: not due (every 2)
    assert diag.pop_metrics() == {}
    # steps " good\n" and "step\n#### 1" (the "####" line joins the last step): V(s0) = 0 (no "good" yet),
    # V(s1) = 1; MC step advantages (1 − 0, R − 1) = (1, 0): only step 0 is decided
    ctx.observe_advantages(1, [episode], [[0.5] * n], [[0.5] * n])
    m = diag.pop_metrics()
    assert m["mc_diag/states"] == 2.0 and m["mc_diag/sign_agreement"] == 1.0
    assert m["mc_diag/value_mae"] == pytest.approx(0.5) and m["mc_diag/value_bias"] == pytest.approx(0.0)
    assert m["mc_diag/mc_value_mean"] == pytest.approx(0.5) and m["tokens/mc_diagnostics"] > 0
    ctx.observe_advantages(3, [episode], [[-0.5] * n])  # advantages of the wrong sign, no critic
    m = diag.pop_metrics()
    assert m["mc_diag/sign_agreement"] == 0.0 and "mc_diag/value_mae" not in m
