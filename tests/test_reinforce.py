"""The worked example of adding an algorithm (algos/reinforce.py): the moving-average baseline by
hand, the registered ``unclipped`` policy loss, and an update that moves the policy. The smoke run
and the exact resume are in tests/test_run.py and tests/test_resume.py with every algorithm."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyTask

from algos import core
from algos.config import with_fields
from algos.models.policy import clone_reference
from algos.reinforce import REINFORCE, REINFORCEConfig
from algos.samplers import HFSampler
from algos.training.context import TrainContext
from langenv import LanguageEnv


def test_unclipped_loss_is_minus_ratio_times_advantage():
    logp = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.5, -2.0]])
    adv = torch.tensor([[2.0, -1.0]])
    loss, ratio, clipped = core.POLICY_LOSSES["unclipped"](logp, old, adv, 0.2, None)
    assert ratio.flatten().tolist() == pytest.approx([torch.exp(torch.tensor(0.5)).item(), 1.0])
    assert loss.flatten().tolist() == pytest.approx([-2.0 * ratio[0, 0].item(), 1.0])
    assert clipped.sum() == 0


def test_registries_name_the_shared_estimators_and_losses():
    assert {"gae", "group", "leave_one_out", "step_mc"} <= set(core.ADVANTAGE_ESTIMATORS)
    assert {"clip", "unclipped"} <= set(core.POLICY_LOSSES)
    with pytest.raises(ValueError, match="already registered"):
        core.register_policy_loss("clip")(lambda *a: None)
    with pytest.raises(ValueError, match=r"REINFORCEConfig\.actor\.policy_loss: expected one of 'clip', .*got 'nope'"):
        with_fields(REINFORCEConfig(), policy_loss="nope")


def test_baseline_is_a_moving_average_of_the_batch_means(tokenizer, small_model):
    task = ToyTask(n=2)
    env = LanguageEnv(task, tokenizer, split="train", max_new_tokens=8)
    sampler = HFSampler(small_model, tokenizer)
    ctx = TrainContext(task, env, sampler, small_model, clone_reference(small_model), tokenizer, seed=0)
    cfg = with_fields(REINFORCEConfig(), prompts_per_iteration=2, samples_per_prompt=2, max_new_tokens=8,
                      minibatch_size=4, micro_batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, baseline_decay=0.5)
    algo = REINFORCE(cfg, ctx, total_iterations=2)
    before = [p.detach().clone() for p in small_model.parameters()]

    m1 = algo.iteration(task.problems, 0)
    mean1 = m1["train/reward"]
    assert m1["reinforce/baseline"] == pytest.approx(mean1)  # the first batch is its own baseline
    assert algo.baseline == pytest.approx(mean1)             # 0.5 * mean1 + 0.5 * mean1
    algo.baseline = 0.25                                      # a known baseline for the second step
    m2 = algo.iteration(task.problems, 1)
    assert m2["reinforce/baseline"] == pytest.approx(0.25)
    assert algo.baseline == pytest.approx(0.5 * 0.25 + 0.5 * m2["train/reward"])
    assert m2["update/optimizer_steps"] == 1.0
    # rewards are 0 or 1, so every advantage R - 0.25 is non-zero: the policy must move
    assert any(not torch.equal(a, b) for a, b in zip(before, small_model.parameters()))
    state = algo.state_dict()
    fresh = REINFORCE(cfg, ctx, total_iterations=2)
    fresh.load_state_dict(state)
    assert fresh.baseline == algo.baseline
