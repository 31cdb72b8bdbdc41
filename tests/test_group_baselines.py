"""GRPO and RLOO: advantages, loss aggregation across micro-batches, clipping, and one update each."""

from __future__ import annotations

import math

import pytest
import torch

from algos import core


def test_rloo_advantages_sum_to_zero_and_match_the_closed_form():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.3, 0.9, 0.1, 0.5]])
    adv = core.leave_one_out_advantages(rewards)
    assert torch.allclose(adv.sum(dim=1), torch.zeros(2), atol=1e-6)
    k = rewards.shape[1]
    assert torch.allclose(adv, k / (k - 1) * (rewards - rewards.mean(dim=1, keepdim=True)), atol=1e-6)
    # hand-computed: 1 - mean(0, 0, 1) = 2/3; 0 - mean(1, 0, 1) = -2/3
    assert adv[0].tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])


def test_rloo_with_two_samples_is_the_reward_difference():
    adv = core.leave_one_out_advantages(torch.tensor([[0.7, 0.2]]))
    assert adv[0].tolist() == pytest.approx([0.5, -0.5])


def test_rloo_perturbing_one_reward_moves_the_others_by_minus_delta_over_k_minus_one():
    rewards = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0]])
    delta = 0.4
    bumped = rewards.clone()
    bumped[0, 2] += delta
    diff = core.leave_one_out_advantages(bumped) - core.leave_one_out_advantages(rewards)
    expected = torch.full((5,), -delta / 4)
    expected[2] = delta
    assert torch.allclose(diff[0], expected, atol=1e-6)


def test_rloo_matches_a_naive_loop():
    rewards = torch.rand(3, 6, generator=torch.Generator().manual_seed(0))
    adv = core.leave_one_out_advantages(rewards)
    for g in range(3):
        for i in range(6):
            others = [rewards[g, j].item() for j in range(6) if j != i]
            assert adv[g, i].item() == pytest.approx(rewards[g, i].item() - sum(others) / 5, abs=1e-6)


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        core.leave_one_out_advantages(torch.tensor([[1.0], [0.0]]))


def test_grpo_all_equal_group_gives_zero_advantage_and_no_nan():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    adv = core.group_advantages(rewards)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:2], torch.zeros(2, 4))
    assert adv[2].sum().item() == pytest.approx(0.0, abs=1e-6)
    assert adv[2].std().item() == pytest.approx(1.0, abs=1e-4)  # unbiased std of Â ≈ 1


def test_grpo_is_affine_invariant_and_dr_grpo_scales():
    rewards = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0]])
    a, b = 3.0, -2.0
    assert torch.allclose(core.group_advantages(a * rewards + b), core.group_advantages(rewards), atol=1e-4)
    dr = core.group_advantages(rewards, scale_by_std=False)
    assert torch.allclose(core.group_advantages(a * rewards + b, scale_by_std=False), a * dr, atol=1e-6)
    assert dr[0].tolist() == pytest.approx([-0.6, 0.4, 0.4, -0.6, 0.4])


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_sum_const", "seq_mean_token_sum"])
def test_micro_batch_accumulation_equals_the_whole_batch_aggregate(mode):
    g = torch.Generator().manual_seed(1)
    loss = torch.randn(5, 7, generator=g)
    lengths = [7, 3, 5, 1, 6]
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths])
    whole = core.aggregate(loss, mask, mode, constant=10.0)
    norm = core.aggregate_norm(mask, mode, constant=10.0)
    parts = sum(core.aggregate_sum(loss[p], mask[p], mode) / norm for p in ([0, 1], [2], [3, 4]))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)


def test_doubling_a_sequence_doubles_its_weight_except_under_seq_mean_token_mean():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    short = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # loss only on sequence 0 (length 2)
    longer_mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    longer = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])  # same per-token loss, twice as long
    ratio = {m: (core.aggregate(longer, longer_mask, m, 4.0) / core.aggregate(short, mask, m, 4.0)).item()
             for m in ("seq_sum_const", "seq_mean_token_mean", "seq_mean_token_sum")}
    assert ratio["seq_sum_const"] == pytest.approx(2.0)
    assert ratio["seq_mean_token_sum"] == pytest.approx(2.0)
    assert ratio["seq_mean_token_mean"] == pytest.approx(1.0)


@pytest.mark.parametrize("adv,ratio,eps_hi,zero", [
    (1.0, 1.3, None, True), (1.0, 1.1, None, False), (-1.0, 0.7, None, True), (-1.0, 0.9, None, False),
    (1.0, 1.25, 0.28, False), (1.0, 1.3, 0.28, True), (-1.0, 0.79, 0.28, True),
])
def test_clipping_stops_the_gradient_outside_the_trust_region(adv, ratio, eps_hi, zero):
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(ratio), requires_grad=True)
    loss, _, _ = core.clipped_surrogate(logp, old, torch.full((1, 1), adv), 0.2, eps_hi)
    loss.sum().backward()
    assert (logp.grad.abs().item() == 0.0) is zero


def test_surrogate_gradient_at_the_old_policy_is_the_policy_gradient():
    logp = torch.tensor([[-1.2, -0.3, -2.0]], requires_grad=True)
    adv = torch.tensor([[0.5, -1.0, 2.0]])
    loss, _, _ = core.clipped_surrogate(logp, logp.detach(), adv, 0.2)
    loss.sum().backward()
    assert torch.allclose(logp.grad, -adv)


def test_cppo_pruning_keeps_the_largest_advantages_per_group():
    from algos.grpo import prune_completions

    adv = torch.tensor([[0.9, -1.2, 0.1, 0.0], [0.5, 0.5, -0.5, 2.0]])
    assert prune_completions(adv, 2, range(8)) == [0, 1, 4, 7]     # |1.2|, |0.9| ; |2.0|, then the first 0.5
    assert prune_completions(adv, 1, [0, 2, 4, 5, 6]) == [0, 4]    # only among the kept ones; ties: sampling order
