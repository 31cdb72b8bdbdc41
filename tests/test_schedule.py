"""The learning-rate schedule every algorithm shares (`algos.config.make_optimizer`, DPO+'s
`warmup_decay_lr`) and GRPO's schedule when it drops groups (issue 11 §4)."""

from __future__ import annotations

import json

import pytest
import torch

from algos.config import OptimConfig, with_fields
from algos.dpo_plus import warmup_decay_lr


def _lrs_used(optimizer, scheduler, steps):
    """The rate each of ``steps`` optimiser updates runs at, stepping as `algos.actor` does."""
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used, optimizer.param_groups[0]["lr"]


def test_schedule_hand_computed_first_step_is_not_zero_and_ends_at_zero():
    # 10 steps, warm-up ceil(0.2 * 10) = 2 steps: (s+1)/(W+1) = 1/3, 2/3, then peak, then (10 - s)/8
    model = torch.nn.Linear(2, 1)
    optimizer, scheduler = OptimConfig(learning_rate=0.3, warmup_ratio=0.2).build(model, total_steps=10)
    used, after = _lrs_used(optimizer, scheduler, 10)
    expected = [0.1, 0.2, 0.3] + [0.3 * (10 - s) / 8 for s in range(3, 10)]
    assert used == pytest.approx(expected, abs=1e-12)
    assert used[-1] == pytest.approx(0.3 / 8) and after == 0.0
    # no warm-up: the first step at the peak, as before
    optimizer, scheduler = OptimConfig(learning_rate=0.3, warmup_ratio=0.0).build(model, total_steps=4)
    used, after = _lrs_used(optimizer, scheduler, 4)
    assert used == pytest.approx([0.3, 0.225, 0.15, 0.075]) and after == 0.0


def test_first_optimiser_step_changes_the_weights_with_the_default_warmup():
    # the paper's 3% warm-up over a short run: the first update used to run at lr 0 and change nothing
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, scheduler = OptimConfig(learning_rate=1e-2).build(model, total_steps=100)  # warmup_ratio 0.03: W = 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_dpo_plus_schedule_is_the_shared_one():
    model = torch.nn.Linear(2, 1)
    for steps, ratio in ((100, 0.03), (7, 0.5), (1, 0.03), (5, 0.0)):
        optimizer, scheduler = OptimConfig(learning_rate=1e-3, warmup_ratio=ratio).build(model, total_steps=steps)
        used, after = _lrs_used(optimizer, scheduler, steps)
        assert [warmup_decay_lr(1e-3, ratio, k, steps) for k in range(steps)] == pytest.approx(used, abs=1e-15)
        assert warmup_decay_lr(1e-3, ratio, steps, steps) == after == 0.0
    assert warmup_decay_lr(1e-3, 0.03, 0, 100) == pytest.approx(1e-3 / 4)  # W = 3: 1/(W+1) of the peak


def test_grpo_dropping_uniform_groups_still_decays_the_rate_to_zero(tmp_path, guess_model_dir):
    from algos.grpo import GRPO, GRPOConfig
    from algos.training.config import RunConfig
    from algos.training.loop import train

    run = RunConfig(task="guess", model=str(guess_model_dir), iterations=3, out=tmp_path / "run", wandb="disabled",
                    eval_problems=4, eval_every=0, threads=1, canary_problems=0)
    config = with_fields(GRPOConfig(), prompts_per_iteration=4, samples_per_prompt=2, minibatch_size=4,
                         micro_batch_size=4, max_new_tokens=16, learning_rate=1e-3, warmup_ratio=0.0,
                         drop_uniform_groups=True)
    seen = {}

    def build(cfg, ctx, total):
        seen["algo"] = GRPO(cfg, ctx, total)
        return seen["algo"]

    train(run, "grpo", config, build)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    assert len(rows) == 3  # row 0 (the evaluation before training) left out
    assert sum(r["grpo/uniform_groups"] for r in rows) > 0  # some groups were dropped...
    assert sum(r["grpo/trained_responses"] for r in rows) > 0  # ...and some trained on
    # the schedule was sized for 3 iterations x 2 steps (8 responses, 4 per step) and ends at 0
    assert rows[-1]["update/lr"] == 0.0 and seen["algo"].optimizer.param_groups[0]["lr"] == 0.0
    assert seen["algo"].scheduler.last_epoch == 6
    assert sum(r["grpo/schedule_steps_skipped"] for r in rows) >= 1
