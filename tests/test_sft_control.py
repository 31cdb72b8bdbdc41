"""The SFT control (algos/sft_control.py) sized like an RL run: with the RL run's G, mini-batch and
epochs it takes the same number of optimiser steps (the fair control of issue 11)."""

from __future__ import annotations

from conftest import ToyTask

from algos.config import with_fields
from algos.models.policy import clone_reference
from algos.samplers import HFSampler
from algos.sft_control import SFTControl, SFTControlConfig
from algos.training.context import TrainContext
from langenv import LanguageEnv


def test_copies_give_the_rl_runs_number_of_steps(tokenizer, small_model):
    task = ToyTask(n=2)
    env = LanguageEnv(task, tokenizer, split="train", max_new_tokens=8)
    ctx = TrainContext(task, env, HFSampler(small_model, tokenizer), small_model, clone_reference(small_model),
                       tokenizer, seed=0)
    # an RL run with 2 problems x G=4, mini-batch 4, 2 epochs takes 2 * ceil(8 / 4) = 4 steps per iteration
    cfg = with_fields(SFTControlConfig(), prompts_per_iteration=2, samples_per_prompt=4, minibatch_size=4,
                      micro_batch_size=2, epochs=2, learning_rate=1e-3)
    algo = SFTControl(cfg, ctx, total_iterations=3)
    metrics = algo.iteration(task.problems, 0)
    assert metrics["update/optimizer_steps"] == 4.0
    assert algo.scheduler.last_epoch == 4  # the schedule is sized for 3 iterations x 4 steps
    assert cfg.optim.steps_per_iteration(2 * 4) * 3 == 12
    default = SFTControlConfig.cpu_tiny()
    assert default.sampling.samples_per_prompt == 1 and default.optim.steps_per_iteration(8) == 1
