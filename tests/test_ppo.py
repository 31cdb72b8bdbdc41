"""PPO with a learned critic (algos/ppo.py): the critic's init and alignment, GAE, the clipped value
loss, one full iteration on a tiny model with a stub sampler, and saving the critic."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from algos import core
from algos.config import make_optimizer, with_fields
from algos.critic import CriticSettings, ValueModel, compute_values, critic_update, explained_variance, terminal_rewards
from algos.models.policy import batch_sequences, clone_reference
from algos.ppo import PPO, PPOConfig
from algos.samplers.base import Completion
from algos.training.context import TrainContext
from langenv import LanguageEnv, Problem
from langenv.steps import split_gsm8k

RESPONSES = ["3 + 4 = 7\n#### 7", "#### 5", "3 + 4 is 7\nso\n#### 7", "4 + 3 = 8\n#### 8", "7"]


class ToyTask:
    name, grading_kind, stop_strings = "toy", "gsm8k", ()

    def load(self, split):
        return [Problem(id=f"toy/{i}", question=f"q{i}: 3 + 4?", solution="3 + 4 = 7\n#### 7", answer="7")
                for i in range(2)]

    def prompt(self, problem):
        return f"Q: {problem.question}\nA:"

    def target(self, problem):
        return problem.solution

    def split_steps(self, response):
        return split_gsm8k(response)


class StubSampler:
    """Picks each completion from a fixed list (correct and incorrect answers, varying lengths)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def generate(self, prompts, params, seed=None):
        rng = np.random.default_rng(seed)
        out = []
        for _ in prompts:
            group = []
            for _ in range(params.n):
                text = RESPONSES[int(rng.integers(len(RESPONSES)))]
                tokens = self.tok(text, add_special_tokens=False).input_ids + [self.tok.eos_token_id]
                group.append(Completion(tokens, [0.0] * len(tokens), "stop", text))
            out.append(group)
        return out

    def update_weights(self, model):
        pass


@pytest.fixture
def ctx(tokenizer, small_model):
    task = ToyTask()
    env = LanguageEnv(task, tokenizer, split="train", max_new_tokens=64)
    context = TrainContext(task, env, StubSampler(tokenizer), small_model, clone_reference(small_model), tokenizer, seed=0)
    context.generator.manual_seed(0)
    return context


def toy_batch(tokenizer):
    prompts = [tokenizer("Q: 3 + 4?\nA:").input_ids, tokenizer("Q: 12 apples\nA:").input_ids]
    responses = [tokenizer(" 7\n#### 7", add_special_tokens=False).input_ids + [tokenizer.eos_token_id],
                 tokenizer(" #### 5", add_special_tokens=False).input_ids]
    return batch_sequences(prompts, responses, tokenizer.pad_token_id)


# ---------------------------------------------------------------- critic

def test_head_init_std_and_zero_bias():
    hidden = 4095
    backbone = torch.nn.Linear(1, 1)
    backbone.config = SimpleNamespace(hidden_size=hidden)
    critic = ValueModel(backbone, generator=torch.Generator().manual_seed(0))
    w = critic.head.weight.detach().flatten()
    assert critic.head.weight.shape == (1, hidden)
    assert float(w.std()) == pytest.approx(1 / math.sqrt(hidden + 1), rel=0.05)
    assert abs(float(w.mean())) < 4 / math.sqrt(hidden + 1) / math.sqrt(hidden)
    assert torch.equal(critic.head.bias, torch.zeros(1))
    # on unit-RMS features (what a final RMSNorm gives) the initial value has std √(H/(H+1)) ≈ 1
    features = torch.randn(2000, hidden, generator=torch.Generator().manual_seed(1))
    assert float(critic.head(features).detach().std()) == pytest.approx(float(w.norm()), rel=0.1)


def test_critic_backbone_is_a_separate_copy_of_the_policy_backbone(small_model):
    critic = ValueModel.from_policy(small_model)
    policy_backbone = small_model.get_decoder().state_dict()
    critic_backbone = critic.backbone.state_dict()
    assert policy_backbone.keys() == critic_backbone.keys()
    assert all(torch.equal(policy_backbone[k], critic_backbone[k]) for k in policy_backbone)
    assert all(p.requires_grad for p in critic.parameters())
    assert critic.dtype == next(small_model.parameters()).dtype and critic.device == small_model.device

    before = {k: v.clone() for k, v in small_model.state_dict().items()}
    optimizer = torch.optim.SGD(critic.parameters(), lr=0.1)
    ids = torch.tensor([[1, 5, 9, 12]])
    critic(ids, torch.ones_like(ids)).sum().backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in small_model.state_dict().items())
    assert any(not torch.equal(policy_backbone[k], v) for k, v in critic.backbone.state_dict().items())


def test_value_of_token_t_is_read_from_the_prefix_before_t(tokenizer, small_model):
    critic = ValueModel.from_policy(small_model, generator=torch.Generator().manual_seed(0))
    batch = toy_batch(tokenizer)
    with torch.no_grad():
        values = critic.response_values(batch)
    mask = batch["response_mask"]
    assert (values[~mask] == 0).all()
    for i in range(2):
        for p in mask[i].nonzero().flatten().tolist():
            prefix = batch["input_ids"][i : i + 1, :p]  # tokens 0..p-1: the state before token p
            with torch.no_grad():
                expected = critic(prefix, torch.ones_like(prefix))[0, -1]
            assert float(values[i, p]) == pytest.approx(float(expected), abs=1e-5)
    # the micro-batched no-grad pass agrees with the direct one
    assert torch.allclose(compute_values(critic, batch, micro_batch_size=1), values, atol=1e-5)


def test_terminal_rewards_put_r_on_the_last_response_token(tokenizer):
    batch = toy_batch(tokenizer)
    rewards = terminal_rewards(batch, [1.0, 0.5])
    for i, r in enumerate([1.0, 0.5]):
        last = int(batch["prompt_lengths"][i] + batch["response_lengths"][i]) - 1
        assert rewards[i, last] == r and batch["response_mask"][i, last]
        assert float(rewards[i].sum()) == r


# ---------------------------------------------------------------- GAE and the value loss

def right_padded(lengths, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), width)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    rewards = torch.randn(len(lengths), width, generator=g) * mask
    values = torch.randn(len(lengths), width, generator=g) * mask
    return rewards, values, mask


def test_gae_with_lambda_gamma_one_and_terminal_reward_is_r_minus_v():
    _, values, mask = right_padded([5, 3, 1], 6)
    rewards = torch.zeros_like(values)
    R = torch.tensor([1.0, 0.0, 1.0])
    for i, n in enumerate([5, 3, 1]):
        rewards[i, n - 1] = R[i]
    adv, ret = core.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, (R[:, None] - values) * mask, atol=1e-6)
    assert torch.allclose(ret, R[:, None] * mask, atol=1e-6)


def test_gae_with_lambda_zero_is_the_td_error():
    rewards, values, mask = right_padded([4, 2], 5, seed=1)
    adv, ret = core.gae(rewards, values, mask, gamma=0.9, lam=0.0)
    next_v = torch.cat([values[:, 1:], torch.zeros(2, 1)], dim=1) * mask
    delta = (rewards + 0.9 * next_v - values) * mask
    assert torch.allclose(adv, delta, atol=1e-6)
    assert torch.allclose(ret, (delta + values) * mask, atol=1e-6)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (0.5, 0.3)])
def test_gae_matches_brute_force_under_right_padding(gamma, lam):
    lengths, width = [7, 4, 1, 5], 8
    rewards, values, mask = right_padded(lengths, width, seed=2)
    # padding holds garbage: it must not leak into the result
    noise = torch.randn(rewards.shape, generator=torch.Generator().manual_seed(3)) * (1 - mask)
    adv, ret = core.gae(rewards + noise, values + noise, mask, gamma, lam)
    for i, n in enumerate(lengths):
        v = values[i, :n].tolist() + [0.0]
        delta = [rewards[i, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        expected = [sum((gamma * lam) ** l * delta[t + l] for l in range(n - t)) for t in range(n)]
        assert adv[i, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert ret[i, :n].tolist() == pytest.approx([a + v[t] for t, a in enumerate(expected)], abs=1e-5)
        assert (adv[i, n:] == 0).all() and (ret[i, n:] == 0).all()


def test_clipped_value_loss_bounds_the_unclipped_one():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(50, 20, generator=g)
    values = old + torch.randn(50, 20, generator=g) * 0.5
    returns = torch.randn(50, 20, generator=g)
    clipped = core.clipped_value_loss(values, old, returns, 0.2)
    unclipped = 0.5 * (values - returns) ** 2
    assert (clipped >= unclipped - 1e-7).all()
    inside = (values - old).abs() <= 0.2
    assert inside.any() and (~inside).any()
    assert torch.equal(clipped[inside], unclipped[inside])
    # hand-computed: V = 1.5 overshoots G = 1 from V_old = 0; the clipped V = 0.2 is further from G
    loss = core.clipped_value_loss(torch.tensor([1.5]), torch.tensor([0.0]), torch.tensor([1.0]), 0.2)
    assert float(loss) == pytest.approx(0.5 * 0.8**2)


def test_explained_variance_hand_computed():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 1.0, 9.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2 / 3), returns, mask) == pytest.approx(0.0, abs=1e-9)
    assert explained_variance(torch.zeros_like(returns), torch.ones_like(returns), mask) == 0.0  # Var(G) = 0


# ---------------------------------------------------------------- critic update

def test_critic_update_fits_the_returns_and_skips_nonfinite_minibatches(tokenizer, small_model):
    critic = ValueModel.from_policy(small_model, generator=torch.Generator().manual_seed(0))
    batch = toy_batch(tokenizer)
    mask = batch["response_mask"].float()
    returns = terminal_rewards(batch, [1.0, 0.0]).sum(1, keepdim=True) * mask  # G_t = R
    settings = CriticSettings(epochs=10, minibatch_size=2, micro_batch_size=1, value_clip=10.0, grad_clip=1.0)
    optimizer, scheduler = make_optimizer(critic, 1e-3, 0.0, 0.0, total_steps=100)
    old = compute_values(critic, batch, 2)
    mse_before = float(core.masked_mean((old - returns) ** 2, mask))
    stats = critic_update(critic, optimizer, scheduler, batch, old, returns, settings, torch.Generator().manual_seed(0))
    mse_after = float(core.masked_mean((compute_values(critic, batch, 2) - returns) ** 2, mask))
    assert stats["optimizer_steps"] == 10 and stats["nonfinite_minibatches"] == 0
    assert mse_after < 0.5 * mse_before

    params = [p.detach().clone() for p in critic.parameters()]
    bad = returns.clone()
    bad[0, mask[0].bool()] = float("nan")
    stats = critic_update(critic, optimizer, scheduler, batch, old, bad,
                          CriticSettings(1, 2, 2, 0.2, 1.0), torch.Generator().manual_seed(0))
    assert stats["nonfinite_minibatches"] == 1 and stats["optimizer_steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(params, critic.parameters()))


# ---------------------------------------------------------------- the algorithm

def test_one_iteration_updates_policy_and_critic_and_the_critic_round_trips(ctx, tmp_path):
    cfg = with_fields(PPOConfig(), prompts_per_iteration=2, samples_per_prompt=4, max_new_tokens=64, minibatch_size=8,
                    micro_batch_size=4, learning_rate=1e-3, critic_learning_rate=1e-3, warmup_ratio=0.0)
    algo = PPO(cfg, ctx, total_iterations=2)
    policy_before = [p.detach().clone() for p in ctx.policy.parameters()]
    critic_before = [p.detach().clone() for p in algo.critic.parameters()]
    metrics = algo.iteration(ctx.env.problems, 0)
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, ctx.policy.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, algo.critic.parameters()))
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert 0 < metrics["train/reward"] < 1  # the stub mixes right and wrong answers
    assert metrics["update/optimizer_steps"] == 2 and metrics["value/optimizer_steps"] == 2
    assert metrics["update/lr"] == metrics["value/lr"] == pytest.approx(1e-3 * 0.5)  # 2 of 4 steps, no warm-up
    for key in ("value/loss", "value/clip_frac", "value/explained_variance", "value/mean", "time/sampling",
                "time/values", "time/update", "time/grading", "time/iteration", "update/kl", "grading/correct"):
        assert key in metrics

    algo.save(tmp_path)
    loaded = ValueModel.from_pretrained(tmp_path / "value_model")
    batch = toy_batch(ctx.tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded.response_values(batch), algo.critic.response_values(batch))
    assert loaded.dtype == algo.critic.dtype


def test_returns_equal_rewards_with_lambda_gamma_one(ctx):
    cfg = with_fields(PPOConfig(), prompts_per_iteration=2, samples_per_prompt=2, max_new_tokens=64, minibatch_size=4,
                    micro_batch_size=4)
    algo = PPO(cfg, ctx, total_iterations=1)
    from algos.rollout import collect_episodes
    episodes = collect_episodes(ctx.env, ctx.sampler, ctx.env.problems, cfg.sampling.params(2, ()), seed=0)
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], ctx.pad_token_id)
    mask = batch["response_mask"].float()
    values = compute_values(algo.critic, batch, 2)
    adv, ret = core.gae(terminal_rewards(batch, [e.reward for e in episodes]), values, mask, cfg.gamma, cfg.lam)
    rewards = torch.tensor([e.reward for e in episodes])[:, None]
    assert torch.allclose(ret, rewards * mask, atol=1e-6)
    assert torch.allclose(adv, (rewards - values) * mask, atol=1e-6)


def test_config_defaults_and_validation():
    cfg = PPOConfig()
    assert (cfg.sampling.prompts_per_iteration, cfg.sampling.samples_per_prompt, cfg.optim.epochs, cfg.optim.minibatch_size) == (64, 8, 2, 64)
    assert (cfg.gamma, cfg.lam, cfg.value_clip, cfg.actor.kl_coef) == (1.0, 1.0, 0.2, 1e-4)
    assert cfg.optim.steps_per_iteration(64 * 8) == 16
    tiny = PPOConfig.cpu_tiny()
    assert (tiny.sampling.prompts_per_iteration, tiny.sampling.samples_per_prompt, tiny.sampling.max_new_tokens) == (8, 4, 200)
    assert tiny.optim.learning_rate == tiny.critic_learning_rate == 1e-5 and tiny.optim.steps_per_iteration(8 * 4) == 4
    for field, value in [("learning_rate", 0.0), ("critic_learning_rate", -1e-6), ("gamma", 1.5), ("lam", -0.1),
                         ("clip_eps", 0.0), ("value_clip", -0.2), ("top_p", 1.5), ("warmup_ratio", 1.0),
                         ("kl_coef", -1.0), ("micro_batch_size", 0)]:
        with pytest.raises(ValueError, match=field):
            with_fields(PPOConfig(), **{field: value})


def test_decoupled_and_length_adaptive_lambda_in_an_iteration(ctx):
    # VC-PPO's λ_critic = 1 keeps the targets at the outcome whatever λ_actor is: G_t = R on every token
    cfg = with_fields(PPOConfig(), prompts_per_iteration=2, samples_per_prompt=2, max_new_tokens=64, minibatch_size=4,
                      micro_batch_size=4, lam=0.95, lam_critic=1.0, lam_adaptive_alpha=0.05)
    algo = PPO(cfg, ctx, total_iterations=1)
    metrics = algo.iteration(ctx.env.problems, 0)
    assert 0.0 <= metrics["train/return_mean"] <= 1.0 and math.isfinite(metrics["train/advantage_mean"])
    with pytest.raises(ValueError, match=r"PPOConfig\.lam_critic: expected a value in \[0, 1\], got 1\.5"):
        with_fields(PPOConfig(), lam_critic=1.5)
