"""VC-PPO's value pretraining (algos/value_pretraining.py) on a real model, env and sampler: the
`guess` task (tests/conftest.py), whose fine-tuned small model is right about half the time, so
the Monte-Carlo targets vary; `HFSampler`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import GuessTask

from algos.config import with_fields
from algos.critic import ValueModel
from algos.models.policy import batch_sequences, clone_reference, load_policy
from algos.ppo import PPO, PPOConfig
from algos.rollout import collect_episodes
from algos.samplers.hf import HFSampler
from algos.training.context import TrainContext
from algos.value_pretraining import (MARKER, ValuePretrainConfig, cache_key, evaluate_critic, heldout_split,
                                     monte_carlo_returns, pretrain_critic, stop_reason)
from langenv import LanguageEnv


class CountingSampler(HFSampler):
    """An `HFSampler` that counts its calls (to tell a cache hit from a training run)."""

    calls = 0

    def generate(self, prompts, params, seed=None):
        self.calls += 1
        return super().generate(prompts, params, seed=seed)


def make_ctx(model_dir, seed=0, cache_dir=None) -> TrainContext:
    policy, tokenizer = load_policy(str(model_dir), dtype=torch.float32)
    policy.eval()
    task = GuessTask()
    env = LanguageEnv(task, tokenizer, split="train", max_new_tokens=16)
    ctx = TrainContext(task, env, CountingSampler(policy, tokenizer), policy, clone_reference(policy), tokenizer,
                       seed=seed, cache_dir=cache_dir)
    ctx.generator.manual_seed(seed)
    return ctx


def config(**overrides) -> PPOConfig:
    base = with_fields(PPOConfig(), prompts_per_iteration=8, samples_per_prompt=4, max_new_tokens=16,
                       minibatch_size=16, micro_batch_size=16, critic_learning_rate=1e-3, warmup_ratio=0.0,
                       value_pretrain_steps=16, value_pretrain_heldout_prompts=8, value_pretrain_patience=0,
                       value_pretrain_target_ev=1.0, value_pretrain_cache=False)
    return with_fields(base, **overrides)


def critic_for(ctx: TrainContext, cfg: PPOConfig) -> tuple[PPO, ValueModel]:
    algo = PPO(cfg, ctx, total_iterations=2)
    return algo, algo.critic


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- pieces

def test_monte_carlo_returns_are_the_reward_to_go_hand_computed(tokenizer):
    prompts = [[1, 5, 6], [1, 7]]
    responses = [[9, 10, 2], [11, 2]]
    batch = batch_sequences(prompts, responses, tokenizer.pad_token_id)
    mask = batch["response_mask"]
    g1 = monte_carlo_returns(batch, [1.0, 0.0], gamma=1.0)
    assert g1[0][mask[0]].tolist() == [1.0, 1.0, 1.0] and g1[1][mask[1]].tolist() == [0.0, 0.0]
    assert (g1[~mask] == 0).all()
    g_half = monte_carlo_returns(batch, [1.0, 1.0], gamma=0.5)
    assert g_half[0][mask[0]].tolist() == [0.25, 0.5, 1.0] and g_half[1][mask[1]].tolist() == [0.5, 1.0]


def test_heldout_split_is_disjoint_seeded_and_checks_its_size():
    problems = list(range(10))
    held, pool = heldout_split(problems, 3, seed=0)
    assert len(held) == 3 and len(pool) == 7 and sorted(held + pool) == problems
    assert heldout_split(problems, 3, seed=0) == (held, pool)
    with pytest.raises(ValueError, match="value_pretrain_heldout_prompts is 10 but the train split has only 10"):
        heldout_split(problems, 10, seed=0)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="value_pretrain_steps"):
        ValuePretrainConfig(value_pretrain_steps=-1)
    with pytest.raises(ValueError, match="value_pretrain_target_ev"):
        with_fields(PPOConfig(), value_pretrain_target_ev=1.5)
    with pytest.raises(ValueError, match="value_pretrain_heldout_prompts"):
        ValuePretrainConfig(value_pretrain_heldout_prompts=0)
    assert not PPOConfig().value_pretrain.enabled


def test_vc_ppo_registry_entry_has_the_papers_lambdas_and_pretraining_on():
    from experiments.presets import ALGORITHMS, COMMANDS

    entry = ALGORITHMS["vc-ppo"]
    assert entry.config is PPOConfig and entry.build is PPO
    cfg = COMMANDS["vc-ppo"]().algo
    assert (cfg.lam, cfg.lam_critic) == (0.95, 1.0) and cfg.value_pretrain.enabled
    assert COMMANDS["ppo"]().algo == PPOConfig.cpu_tiny()  # the plain entry keeps its defaults


# ---------------------------------------------------------------- the procedure

def test_pretraining_lowers_the_loss_on_held_out_episodes_and_leaves_the_policy_alone(guess_model_dir):
    ctx = make_ctx(guess_model_dir)
    cfg = config()
    _, critic = critic_for(ctx, cfg)
    initial = copy.deepcopy(critic)
    policy_before = copy.deepcopy(ctx.policy.state_dict())

    info = pretrain_critic(critic, ctx, cfg, PPO(cfg, ctx, 2).critic_settings, cache_dir=None)

    assert all(torch.equal(policy_before[k], v) for k, v in ctx.policy.state_dict().items())
    assert info["value_pretrain/steps"] >= 16 and info["value_pretrain/cached"] == 0.0
    assert info["value_pretrain/heldout_episodes"] == 8 * 4 and info["tokens/value_pretrain"] > 0
    assert info["value_pretrain/loss_after"] < 0.5 * info["value_pretrain/loss_before"]
    assert info["value_pretrain/explained_variance_after"] >= info["value_pretrain/explained_variance_before"]
    # fresh episodes of the held-out problems (a new sampling seed): the pretrained critic beats the
    # critic PPO would otherwise start with
    held, _ = heldout_split(ctx.env.problems, 8, cfg.value_pretrain.value_pretrain_seed)
    episodes = collect_episodes(ctx.env, ctx.sampler, held, cfg.sampling.params(4, ctx.task.stop_strings), seed=123)
    assert 0 < sum(e.reward for e in episodes) < len(episodes)  # the targets vary
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], ctx.pad_token_id)
    returns = monte_carlo_returns(batch, [e.reward for e in episodes])
    loss_initial, ev_initial = evaluate_critic(initial, batch, returns, 16)
    loss_pretrained, ev_pretrained = evaluate_critic(critic, batch, returns, 16)
    assert loss_pretrained < 0.5 * loss_initial and ev_pretrained > ev_initial
    print(f"held-out loss {info['value_pretrain/loss_before']:.4f} -> {info['value_pretrain/loss_after']:.4f}, "
          f"EV {info['value_pretrain/explained_variance_before']:.3f} -> "
          f"{info['value_pretrain/explained_variance_after']:.3f}; fresh episodes: loss {loss_initial:.4f} -> "
          f"{loss_pretrained:.4f}, EV {ev_initial:.3f} -> {ev_pretrained:.3f}")


def test_stop_reason_precedence_hand_computed():
    pre = ValuePretrainConfig(value_pretrain_steps=8, value_pretrain_target_ev=0.5, value_pretrain_patience=2)
    assert stop_reason(ev=0.1, stale=1, steps=4, round_steps=4, pre=pre) is None
    assert stop_reason(ev=0.1, stale=1, steps=8, round_steps=4, pre=pre) == "budget"
    assert stop_reason(ev=0.1, stale=2, steps=8, round_steps=4, pre=pre) == "plateau"
    assert stop_reason(ev=0.5, stale=2, steps=8, round_steps=4, pre=pre) == "target explained variance"
    assert stop_reason(ev=0.9, stale=0, steps=0, round_steps=0, pre=pre) == "no finite update"
    no_plateau = ValuePretrainConfig(value_pretrain_steps=8, value_pretrain_patience=0)
    assert stop_reason(ev=0.1, stale=5, steps=4, round_steps=4, pre=no_plateau) is None


def test_the_plateau_rule_stops_before_the_budget(guess_model_dir):
    ctx = make_ctx(guess_model_dir)
    # a learning rate too small to move the held-out loss by 1%: stop after `patience` rounds
    cfg = config(value_pretrain_steps=64, value_pretrain_patience=2, value_pretrain_learning_rate=1e-12)
    algo = PPO(cfg, ctx, 2)
    info = pretrain_critic(algo.critic, ctx, cfg, algo.critic_settings)
    steps_per_round = cfg.optim.steps_per_iteration(8 * 4)
    assert info["value_pretrain/rounds"] == 2 and info["value_pretrain/steps"] == 2 * steps_per_round < 64


def test_a_zero_budget_leaves_the_critic_unchanged_and_samples_nothing(guess_model_dir):
    ctx = make_ctx(guess_model_dir)
    cfg = config(value_pretrain_steps=0)
    algo = PPO(cfg, ctx, 2)
    before = copy.deepcopy(algo.critic)
    assert not algo.value_pretraining_pending
    assert pretrain_critic(algo.critic, ctx, cfg, algo.critic_settings) == {}
    assert same_state(before, algo.critic) and ctx.sampler.calls == 0


def test_the_cache_is_reused_by_a_run_with_another_seed(guess_model_dir, tmp_path):
    cache = tmp_path / "cache"
    cfg = config(value_pretrain_steps=8, value_pretrain_cache=True)
    ctx_a = make_ctx(guess_model_dir, seed=0, cache_dir=cache)
    algo_a = PPO(cfg, ctx_a, 2)
    info_a = pretrain_critic(algo_a.critic, ctx_a, cfg, algo_a.critic_settings, cache)
    assert info_a["value_pretrain/cached"] == 0.0 and ctx_a.sampler.calls > 0
    (entry,) = (cache / "value-pretrain").iterdir()
    assert entry.name.startswith("guess-") and (entry / MARKER).is_file()
    assert not [p for p in (cache / "value-pretrain").iterdir() if p.name.startswith(".tmp")]

    # another run seed: another head init, same key; the critic is loaded, nothing sampled or trained
    ctx_b = make_ctx(guess_model_dir, seed=1, cache_dir=cache)
    algo_b = PPO(cfg, ctx_b, 2)
    assert not same_state(algo_a.critic, algo_b.critic)
    assert cache_key(ctx_a, cfg, algo_a.critic_settings, algo_a.critic) == \
        cache_key(ctx_b, cfg, algo_b.critic_settings, algo_b.critic)
    info_b = pretrain_critic(algo_b.critic, ctx_b, cfg, algo_b.critic_settings, cache)
    assert info_b["value_pretrain/cached"] == 1.0 and ctx_b.sampler.calls == 0
    assert info_b["tokens/value_pretrain"] == 0.0
    for k in ("steps", "loss_before", "loss_after", "explained_variance_before", "explained_variance_after"):
        assert info_b[f"value_pretrain/{k}"] == info_a[f"value_pretrain/{k}"]
    assert same_state(algo_a.critic, algo_b.critic)
    assert json.loads((entry / MARKER).read_text())["metrics"]["value_pretrain/steps"] == info_a["value_pretrain/steps"]

    # other pretraining settings (or another policy) are another entry
    other = with_fields(cfg, value_pretrain_seed=1)
    assert cache_key(ctx_a, other, algo_a.critic_settings, algo_a.critic) != \
        cache_key(ctx_a, cfg, algo_a.critic_settings, algo_a.critic)
    with torch.no_grad():
        next(ctx_b.policy.parameters()).add_(1.0)
    assert cache_key(ctx_b, cfg, algo_b.critic_settings, algo_b.critic) != \
        cache_key(ctx_a, cfg, algo_a.critic_settings, algo_a.critic)


def test_ppo_pretrains_once_in_its_first_iteration_and_a_restored_state_does_not_again(guess_model_dir):
    ctx = make_ctx(guess_model_dir)
    cfg = config(value_pretrain_steps=4, minibatch_size=16, learning_rate=1e-3, lam=0.95, lam_critic=1.0)
    algo = PPO(cfg, ctx, 2)
    assert algo.value_pretraining_pending and algo.state_dict()["value_pretraining_pending"]
    first = algo.iteration(ctx.env.problems[:8], 0)
    assert first["value_pretrain/steps"] >= 4 and "value_pretrain/explained_variance_after" in first
    assert not algo.value_pretraining_pending
    state = algo.state_dict()
    second = algo.iteration(ctx.env.problems[8:16], 1)
    assert not any(k.startswith("value_pretrain/") for k in second)

    resumed = PPO(cfg, make_ctx(guess_model_dir), 2)
    resumed.load_state_dict(state)
    assert not resumed.value_pretraining_pending
    calls = resumed.ctx.sampler.calls
    metrics = resumed.iteration(ctx.env.problems[8:16], 1)
    assert resumed.ctx.sampler.calls == calls + 1 and not any(k.startswith("value_pretrain/") for k in metrics)
