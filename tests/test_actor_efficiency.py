"""Training-side efficiency of the actor update (algos/actor.py): length-sorted, trimmed micro-batches
leave the gradient unchanged; π_old / π_ref log-probs once per update, π_old none for a single-step update;
``nonfinite_trailing``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from algos.actor import ActorSettings, actor_update, batch_logprobs, micro_batch_rows, whiten_global
from algos.models.policy import batch_sequences
from algos.rollout import Episode
from langenv import Problem
from langenv.state import EnvState

VOCAB = 48


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def fake_episodes(n: int, seed: int = 0) -> tuple[list[Episode], list[list[float]]]:
    """``n`` episodes with prompts of 2–9 and responses of 1–16 random tokens, and random advantages."""
    g = torch.Generator().manual_seed(seed)
    episodes, advantages = [], []
    for i in range(n):
        p = int(torch.randint(2, 10, (1,), generator=g))
        r = int(torch.randint(1, 17, (1,), generator=g))
        prompt = tuple(torch.randint(3, VOCAB, (p,), generator=g).tolist())
        response = tuple(torch.randint(3, VOCAB, (r,), generator=g).tolist())
        state = EnvState(Problem(f"p{i}", "q", "s", "1"), prompt, response, max_new_tokens=16, terminated=True)
        episodes.append(Episode(state, float(i % 2), "correct", ""))
        advantages.append(torch.randn(r, generator=g).tolist())
    return episodes, advantages


class GradRecorder(torch.optim.Optimizer):
    """An optimiser whose step records the gradients and leaves the parameters alone."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.grads.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])


class NoSchedule:
    def step(self):
        pass


def settings(**overrides) -> ActorSettings:
    base = {"epochs": 1, "minibatch_size": 12, "micro_batch_size": 3, "clip_eps": 0.2, "kl_coef": 0.1, "temperature": 0.7,
            "grad_clip": 1e9}
    base.update(overrides)
    return ActorSettings(**base)


def recorded_gradient(policy, episodes, advantages, s: ActorSettings) -> tuple[list[torch.Tensor], dict]:
    policy = copy.deepcopy(policy)
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
        for p in reference.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    optimizer = GradRecorder(policy.parameters())
    stats = actor_update(policy, reference, optimizer, NoSchedule(), episodes, advantages, s, 0,
                         torch.Generator().manual_seed(0))
    assert len(optimizer.grads) == 1
    return optimizer.grads[0], stats


@pytest.mark.parametrize("pg,kl,whiten", [("token_mean", "seq_mean_token_sum", True),
                                          ("seq_mean_token_mean", "seq_mean_token_mean", False),
                                          ("seq_sum_const", "seq_sum_const", False)])
def test_sorted_trimmed_micro_batches_give_the_same_gradient(pg, kl, whiten):
    policy = tiny_llama()
    episodes, advantages = fake_episodes(12)
    common = {"pg_aggregation": pg, "kl_aggregation": kl, "whiten_advantages": whiten, "aggregation_constant": 16.0}
    whole, whole_stats = recorded_gradient(policy, episodes, advantages, settings(micro_batch_size=12, **common))
    unsorted, _ = recorded_gradient(policy, episodes, advantages, settings(sort_micro_batches=False, **common))
    ordered, stats = recorded_gradient(policy, episodes, advantages, settings(sort_micro_batches=True, **common))
    assert any(float(g.abs().max()) > 0 for g in whole)
    for a, b, c in zip(whole, unsorted, ordered):
        scale = float(a.abs().max()) + 1e-12
        assert float((a - b).abs().max()) <= 1e-5 * scale
        assert float((a - c).abs().max()) <= 1e-5 * scale
    for key in ("loss", "pg_loss", "kl", "clip_frac", "ratio", "grad_norm"):
        assert stats[key] == pytest.approx(whole_stats[key], rel=1e-5, abs=1e-6), key  # pg_loss ≈ 0 when whitened
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-5)  # π_old is the policy at the start


def test_micro_batch_rows_sort_longest_first_and_cover_every_row():
    mask = torch.zeros(7, 10, dtype=torch.long)
    for i, n in enumerate([3, 9, 1, 9, 5, 10, 2]):
        mask[i, :n] = 1
    parts = micro_batch_rows(mask, 3)
    assert parts == [[5, 1, 3], [4, 0, 6], [2]]
    assert micro_batch_rows(mask, 3, sort=False) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError, match="micro-batch size"):
        micro_batch_rows(mask, 0)


def test_batch_logprobs_sorted_equals_unsorted_in_input_order():
    policy = tiny_llama()
    episodes, _ = fake_episodes(9, seed=3)
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], 0)
    sorted_ = batch_logprobs(policy, batch, 0.7, micro=2, sort=True)
    plain = batch_logprobs(policy, batch, 0.7, micro=2, sort=False)
    whole = batch_logprobs(policy, batch, 0.7, micro=9, sort=False)
    assert torch.allclose(sorted_, plain, atol=1e-5) and torch.allclose(sorted_, whole, atol=1e-5)
    assert (sorted_[~batch["response_mask"]] == 0).all() and (sorted_[batch["response_mask"]] < 0).all()


def test_old_and_reference_logprobs_are_computed_once_per_update(monkeypatch):
    from algos import actor

    calls = []
    original = actor.batch_logprobs
    monkeypatch.setattr(actor, "batch_logprobs", lambda *a, **k: calls.append(1) or original(*a, **k))
    episodes, advantages = fake_episodes(8)
    policy = tiny_llama()
    stats = actor_update(policy, copy.deepcopy(policy), torch.optim.SGD(policy.parameters(), lr=1e-3), NoSchedule(),
                         episodes, advantages, settings(epochs=3, minibatch_size=4), 0, torch.Generator().manual_seed(0))
    assert stats["optimizer_steps"] == 6 and len(calls) == 2  # π_old and π_ref, not per epoch or mini-batch


def test_precomputed_old_logprobs_give_the_same_update():
    episodes, advantages = fake_episodes(8)
    policy = tiny_llama()
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], 0)
    old = batch_logprobs(policy, batch, 0.7, micro=8)
    a, stats_a = recorded_gradient(policy, episodes, advantages, settings(minibatch_size=8))
    p2 = copy.deepcopy(policy)
    opt = GradRecorder(p2.parameters())
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    stats_b = actor_update(p2, ref, opt, NoSchedule(), episodes, advantages, settings(minibatch_size=8), 0,
                           torch.Generator().manual_seed(0), old_logprobs=old)
    assert all(torch.allclose(x, y, atol=1e-7) for x, y in zip(a, opt.grads[0]))
    assert stats_a["loss"] == pytest.approx(stats_b["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="old_logprobs"):
        actor_update(p2, ref, opt, NoSchedule(), episodes, advantages, settings(minibatch_size=8), 0,
                     torch.Generator().manual_seed(0), old_logprobs=old[:, :3])


def test_single_step_update_reuses_the_training_pass_as_pi_old(monkeypatch):
    """One epoch, one mini-batch (GRPO's on-policy step): no π_old pass; the gradient and loss are those
    of the update with π_old from a separate pass; ρ is exactly 1."""
    from algos import actor

    calls = []
    original = actor.batch_logprobs
    monkeypatch.setattr(actor, "batch_logprobs", lambda model, *a, **k: calls.append(model) or original(model, *a, **k))
    episodes, advantages = fake_episodes(8)
    policy = tiny_llama()
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], 0)
    old = original(policy, batch, 0.7, micro=8)
    for kl_coef in (0.0, 0.1):
        s = settings(minibatch_size=8, kl_coef=kl_coef, whiten_advantages=False)
        calls.clear()
        reused, stats = recorded_gradient(policy, episodes, advantages, s)
        assert len(calls) == (1 if kl_coef else 0)  # π_ref only, when there is a KL term
        assert all(model is not policy for model in calls)
        p2 = copy.deepcopy(policy)
        ref = copy.deepcopy(policy).requires_grad_(False)
        with torch.no_grad():  # the same reference as recorded_gradient's
            for p in ref.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        opt = GradRecorder(p2.parameters())
        separate = actor_update(p2, ref, opt, NoSchedule(), episodes, advantages, s, 0, torch.Generator().manual_seed(0),
                                old_logprobs=old)
        assert any(float(g.abs().max()) > 0 for g in reused)
        for a, b in zip(reused, opt.grads[0]):
            assert float((a - b).abs().max()) <= 1e-5 * (float(b.abs().max()) + 1e-12)
        assert stats["loss"] == pytest.approx(separate["loss"], rel=1e-5)
        assert stats["ratio"] == 1.0 and stats["clip_frac"] == 0.0


def test_pi_old_pass_runs_when_the_update_takes_several_steps(monkeypatch):
    from algos import actor

    assert actor.single_step(8, 8, 1) and not actor.single_step(8, 4, 1) and not actor.single_step(8, 8, 2)
    calls = []
    original = actor.batch_logprobs
    monkeypatch.setattr(actor, "batch_logprobs", lambda *a, **k: calls.append(1) or original(*a, **k))
    episodes, advantages = fake_episodes(8)
    for epochs, minibatch, steps in ((1, 4, 2), (2, 8, 2)):
        calls.clear()
        policy = tiny_llama()
        stats = actor_update(policy, policy, torch.optim.SGD(policy.parameters(), lr=1e-3), NoSchedule(), episodes,
                             advantages, settings(epochs=epochs, minibatch_size=minibatch, kl_coef=0.0), 0,
                             torch.Generator().manual_seed(0))
        assert stats["optimizer_steps"] == steps and len(calls) == 1  # π_old, once


def test_nonfinite_trailing_counts_the_nonfinite_minibatches_at_the_end():
    episodes, advantages = fake_episodes(8)
    advantages[5] = [float("nan")] * len(advantages[5])
    s = settings(epochs=3, minibatch_size=4, whiten_advantages=False, kl_coef=0.0)
    policy = tiny_llama()
    before = [p.detach().clone() for p in policy.parameters()]
    stats = actor_update(policy, copy.deepcopy(policy), torch.optim.SGD(policy.parameters(), lr=1e-2), NoSchedule(),
                         episodes, advantages, s, 0, torch.Generator().manual_seed(0))
    # replay the shuffle: the mini-batch holding episode 5 is non-finite, the other one steps
    g = torch.Generator().manual_seed(0)
    flags = []
    for _ in range(3):
        order = torch.randperm(8, generator=g).tolist()
        flags += [5 in order[:4], 5 in order[4:]]
    trailing = len(flags) - max((i + 1 for i, bad in enumerate(flags) if not bad), default=0)
    assert stats["nonfinite_minibatches"] == 3 and stats["optimizer_steps"] == 3
    assert stats["nonfinite_trailing"] == trailing
    assert all(math.isfinite(p.detach().sum()) for p in policy.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))

    advantages = [[float("nan")] * len(a) for a in advantages]
    stats = actor_update(policy, copy.deepcopy(policy), torch.optim.SGD(policy.parameters(), lr=1e-2), NoSchedule(),
                         episodes, advantages, s, 0, torch.Generator().manual_seed(0))
    assert stats["nonfinite_trailing"] == stats["nonfinite_minibatches"] == 6 and stats["optimizer_steps"] == 0


def test_whiten_global_in_one_process_is_masked_whiten():
    from algos import core

    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    mask = (torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    assert torch.equal(whiten_global(x, mask, None), core.masked_whiten(x, mask))


def test_bf16_autocast_gives_nearly_the_fp32_gradient():
    policy = tiny_llama()
    episodes, advantages = fake_episodes(12)
    fp32, _ = recorded_gradient(policy, episodes, advantages, settings())
    bf16, stats = recorded_gradient(policy, episodes, advantages, settings(bf16_autocast=True))
    a, b = torch.cat([g.flatten() for g in fp32]), torch.cat([g.flatten() for g in bf16])
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.99
    assert float((a - b).norm() / a.norm()) < 0.1
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-2) and math.isfinite(stats["loss"])
