"""Hand-computed values and invariants of the shared maths in algos.core."""

from __future__ import annotations

import math

import pytest
import torch

from algos import core


def test_kl_estimators_hand_computed_and_k3_nonnegative():
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.2)]])
    k1 = core.kl_estimate(logp, ref, "k1")
    k2 = core.kl_estimate(logp, ref, "k2")
    k3 = core.kl_estimate(logp, ref, "k3")
    assert torch.allclose(k1, torch.tensor([[math.log(2), 0.0]]))
    assert torch.allclose(k2, torch.tensor([[0.5 * math.log(2) ** 2, 0.0]]))
    assert torch.allclose(k3, torch.tensor([[0.5 - 1 + math.log(2), 0.0]]))
    x, y = torch.randn(1000), torch.randn(1000)
    assert (core.kl_estimate(x, y, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1"):
        core.kl_estimate(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_estimates_of_kl():
    torch.manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.3, 0.3, 0.4])
    exact = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 200_000, replacement=True)
    logp, logq = p.log()[samples], q.log()[samples]
    for kind in ("k1", "k3"):
        est = core.kl_estimate(logp, logq, kind)
        stderr = float(est.std() / math.sqrt(len(est)))
        assert abs(float(est.mean()) - exact) < 5 * stderr


def test_masked_whiten_mean_zero_unbiased_std_one():
    torch.manual_seed(0)
    x = torch.randn(4, 7) * 3 + 2
    mask = torch.ones(4, 7)
    mask[0, 5:] = 0
    mask[2, 1:] = 0
    w = core.masked_whiten(x, mask)
    vals = w[mask.bool()]
    assert abs(float(vals.mean())) < 1e-6
    assert abs(float(vals.std(unbiased=True)) - 1) < 1e-4
    assert (w[~mask.bool()] == 0).all()


def test_clipped_surrogate_gradient_vanishes_outside_the_clip_range():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.3, 1.3, 0.7, 0.7]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, ratio, clipped = core.clipped_surrogate(logp, old, adv, 0.2)
    loss.sum().backward()
    # A>0, ρ>1+ε and A<0, ρ<1−ε: clipped, no gradient; the other two keep the plain gradient −A·ρ
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 1.3, -0.7, 0.0]]), atol=1e-6)
    assert clipped.tolist() == [[1.0, 0.0, 0.0, 1.0]]


def test_surrogate_gradient_at_theta_old_is_the_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    adv = torch.tensor([[0.5, -2.0, 1.5]])
    loss, _, _ = core.clipped_surrogate(logp, logp.detach(), adv)
    loss.sum().backward()
    assert torch.allclose(logp.grad, -adv)


def test_aggregation_modes_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert core.aggregate(loss, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert core.aggregate(loss, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert core.aggregate(loss, mask, "seq_mean_token_sum").item() == pytest.approx((6 + 4) / 2)
    assert core.aggregate(loss, mask, "seq_sum_const", constant=5).item() == pytest.approx(10 / (2 * 5))
    with pytest.raises(ValueError):
        core.aggregate(loss, mask, "seq_sum_const")


def test_permute_advantages_swaps_whole_rows_for_outcome_advantages():
    adv = torch.tensor([[1.0, 1.0, 0.0], [-2.0, -2.0, -2.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    out = core.permute_advantages(adv, mask, torch.Generator().manual_seed(0))
    per_row = [out[i, 0].item() for i in range(3)]
    assert sorted(per_row) == [-2.0, 1.0, 3.0]                     # the same values, reassigned to rows
    for i in range(3):                                             # constant within each row, 0 off the mask
        assert torch.all(out[i][mask[i].bool()] == per_row[i]) and torch.all(out[i][~mask[i].bool()] == 0)


def test_permute_advantages_permutes_tokens_for_step_advantages():
    adv = torch.tensor([[0.5, -0.5, 0.0], [0.25, 0.25, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = core.permute_advantages(adv, mask, torch.Generator().manual_seed(1))
    assert sorted(out[mask.bool()].tolist()) == sorted(adv[mask.bool()].tolist()) and out[0, 2] == 0


def test_decoupled_gae_by_hand_on_four_tokens():
    # δ = r_t + V_{t+1} − V_t with V = (0.5, 0.2, 0.9, 0.4), terminal reward 1: (−0.3, 0.7, −0.5, 0.6)
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.9, 0.4, 9.0]])     # the last position is padding
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    adv, ret = core.decoupled_gae(rewards, values, mask, gamma=1.0, lam_actor=0.5, lam_critic=1.0)
    # λ_actor = 0.5: A3 = 0.6, A2 = −0.5 + 0.3, A1 = 0.7 − 0.1, A0 = −0.3 + 0.3
    assert adv[0].tolist() == pytest.approx([0.0, 0.6, -0.2, 0.6, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.0], abs=1e-6)  # λ_critic = 1: G_t = R


def test_decoupled_gae_with_equal_lambdas_is_gae():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.rand(3, 6, generator=g), torch.rand(3, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    for lam in (0.0, 0.95, 1.0):
        a1, r1 = core.gae(rewards, values, mask, 0.99, lam)
        a2, r2 = core.decoupled_gae(rewards, values, mask, 0.99, lam, lam)
        assert torch.allclose(a1, a2) and torch.allclose(r1, r2)
    # a per-sequence λ equals running each row with its own λ
    lams = torch.tensor([0.0, 0.5, 1.0])
    a, _ = core.gae(rewards, values, mask, 1.0, lams)
    for i, lam in enumerate(lams.tolist()):
        assert torch.allclose(a[i], core.gae(rewards[i:i + 1], values[i:i + 1], mask[i:i + 1], 1.0, lam)[0][0])


def test_length_adaptive_lambda_follows_vapo():
    lam = core.length_adaptive_lambda(torch.tensor([4, 20, 100, 1000]), alpha=0.05)
    assert lam.tolist() == pytest.approx([0.0, 0.0, 0.8, 0.98])


def test_pass_at_k_unbiased_estimator_by_hand():
    from algos.training.evaluation import pass_at_k

    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)       # 1 − C(3,2)/C(4,2)
    assert pass_at_k(8, 2, 4) == pytest.approx(1 - 15 / 70)     # 1 − C(6,4)/C(8,4)
    with pytest.raises(ValueError, match="need 1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_sampled_metrics_pass_at_k_and_by_operation_count():
    from conftest import fake_episodes

    from algos.training.evaluation import sampled_metrics
    from langenv.tasks.base import Problem

    episodes = fake_episodes({"a": [1.0, 0.0, 0.0, 0.0], "b": [0.0, 0.0, 0.0, 0.0]})
    problems = [Problem("a", "q", "s", "1", meta=(("num_ops", "2"),)), Problem("b", "q", "s", "1", meta=(("num_ops", "3"),))]
    m = sampled_metrics(episodes, problems, 4)
    assert m["eval/accuracy_sampled"] == pytest.approx(0.125)
    assert m["eval/pass@2"] == pytest.approx((0.5 + 0.0) / 2) and m["eval/pass@4"] == pytest.approx(0.5)
    assert m["eval/accuracy_sampled/num_ops=2"] == 0.25 and m["eval/accuracy_sampled/num_ops=3"] == 0.0
