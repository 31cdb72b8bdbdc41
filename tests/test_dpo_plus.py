"""DPO+ (algos/dpo_plus.py): the loss, the pair builder, the schedule and one iteration on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ToyTask
from conftest import fake_episodes as _episodes

from algos import core
from algos.config import with_fields
from algos.dpo_plus import DPOPlus, DPOPlusConfig, build_pairs, sequence_logprobs, warmup_decay_lr
from algos.models.policy import clone_reference
from algos.samplers.base import Completion
from algos.samplers.hf import HFSampler
from algos.training.context import TrainContext
from langenv import LanguageEnv

# ----------------------------------------------------------------------------------------- loss

def _random_logps(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 30) for _ in range(4)]


def test_lambda_zero_is_standard_dpo():
    pc, pr, rc, rr = _random_logps()
    for beta in (0.1, 0.3):
        loss, margin = core.dpo_positive_loss(pc, pr, rc, rr, beta, 0.0)
        expected = -F.logsigmoid(beta * ((pc - pr) - (rc - rr)))
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(margin, beta * ((pc - rc) - (pr - rr)))


def test_loss_is_log2_when_policy_equals_reference():
    _, _, rc, rr = _random_logps()
    for lam in (0.0, 50.0):
        loss, margin = core.dpo_positive_loss(rc.clone(), rr.clone(), rc, rr, 0.3, lam)
        torch.testing.assert_close(loss, torch.full_like(loss, math.log(2)))
        assert torch.all(margin == 0)


def test_penalty_is_zero_when_chosen_is_not_below_reference():
    pc, pr, rc, rr = _random_logps(seed=1)
    pc = rc + torch.rand_like(rc) * 3  # Δ_w >= 0
    plus, _ = core.dpo_positive_loss(pc, pr, rc, rr, 0.3, 50.0)
    dpo, _ = core.dpo_positive_loss(pc, pr, rc, rr, 0.3, 0.0)
    torch.testing.assert_close(plus, dpo)


def test_active_penalty_pushes_the_chosen_logprob_up_harder_than_dpo():
    _, pr, rc, rr = _random_logps(seed=2)
    base = rc - 0.05 - torch.rand_like(rc) * 3  # Δ_w < 0: the penalty is active
    grads = {}
    for lam in (0.0, 50.0):
        pc = base.clone().requires_grad_(True)
        loss, _ = core.dpo_positive_loss(pc, pr, rc, rr, 0.3, lam)
        loss.sum().backward()
        grads[lam] = pc.grad
    assert torch.all(grads[0.0] < 0)
    assert torch.all(grads[50.0] < grads[0.0])


# ---------------------------------------------------------------------------------------- pairs

def test_pairs_are_correct_vs_incorrect_capped_and_skip_one_sided_problems():
    episodes = _episodes({
        "mixed": [1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 0],   # 5 correct x 7 incorrect = 35 candidates
        "small": [1, 0, 0],                             # 2 pairs, below the cap
        "all_right": [1, 1, 1, 1],
        "all_wrong": [0, 0, 0],
        "half": [0.5, 0.4],                             # 0.5 is correct at threshold 0.5
    })
    pairs = build_pairs(episodes, reward_threshold=0.5, max_pairs_per_problem=10, seed=3)
    by_problem: dict[str, list] = {}
    for c, r in pairs:
        assert episodes[c].reward >= 0.5 and episodes[r].reward < 0.5
        assert episodes[c].state.problem.id == episodes[r].state.problem.id
        by_problem.setdefault(episodes[c].state.problem.id, []).append((c, r))
    assert set(by_problem) == {"mixed", "small", "half"}
    assert len(by_problem["mixed"]) == 10 and len(set(by_problem["mixed"])) == 10  # capped, no repeats
    assert len(by_problem["small"]) == 2 and len(by_problem["half"]) == 1
    uncapped = build_pairs(episodes, 0.5, None, seed=3)
    assert len(uncapped) == 35 + 2 + 1


def test_pairs_are_deterministic_for_a_seed():
    episodes = _episodes({f"p{i}": [1, 0] * 6 for i in range(4)})  # 36 candidates per problem
    a = build_pairs(episodes, 0.5, 8, seed=11)
    assert a == build_pairs(episodes, 0.5, 8, seed=11)
    assert a != build_pairs(episodes, 0.5, 8, seed=12)
    assert len(a) == 4 * 8


def test_warmup_decay_schedule_matches_the_shared_one_for_one_round():
    from algos.config import make_optimizer

    steps, ratio, peak = 100, 0.03, 1e-3
    opt, sched = make_optimizer(torch.nn.Linear(1, 1), peak, 0.0, ratio, steps)
    for k in range(steps):
        assert warmup_decay_lr(peak, ratio, k, steps) == pytest.approx(sched.get_last_lr()[0], abs=1e-12)
        opt.step()
        sched.step()
    assert warmup_decay_lr(peak, 0.0, 0, steps) == peak and warmup_decay_lr(peak, ratio, steps, steps) == 0.0


# ------------------------------------------------------------------------------- one iteration

class FixedSampler:
    """Returns the same completions for every prompt, cycling through ``texts`` (graded against "1")."""

    def __init__(self, tokenizer, texts):
        self.tok, self.texts, self.calls = tokenizer, texts, 0

    def generate(self, prompts, params, seed=None):
        self.calls += 1
        out = []
        for _ in prompts:
            group = []
            for j in range(params.n):
                text = self.texts[j % len(self.texts)]
                ids = self.tok(text, add_special_tokens=False).input_ids + [self.tok.eos_token_id]
                group.append(Completion(ids, [0.0] * len(ids), "stop", text))
            out.append(group)
        return out

    def update_weights(self, model):
        pass


MIXED = ["so\n#### 1", "so\n#### 0", "then\n#### 1", "no\n#### 7"]


def _ctx(tokenizer, model, sampler, n_problems=2):
    task = ToyTask(n_problems)
    env = LanguageEnv(task, tokenizer, split="train", max_new_tokens=32)
    ctx = TrainContext(task, env, sampler, model, clone_reference(model), tokenizer, seed=0)
    ctx.generator.manual_seed(0)
    return ctx


def _config(**overrides):
    settings = dict(prompts_per_iteration=2, samples_per_prompt=4, max_new_tokens=32, minibatch_size=4,
                    micro_batch_size=2, learning_rate=1e-3, warmup_ratio=0.0)
    return with_fields(DPOPlusConfig(), **{**settings, **overrides})


def _pair_logratio(ctx, episodes_pairs, model):
    with torch.no_grad():
        return [float(sequence_logprobs(model, [c], 0.6, ctx.pad_token_id) - sequence_logprobs(model, [r], 0.6, ctx.pad_token_id))
                for c, r in episodes_pairs]


def test_one_iteration_trains_the_policy_from_reference_samples(tokenizer, small_model):
    policy_sampler = FixedSampler(tokenizer, MIXED)
    ref_sampler = FixedSampler(tokenizer, MIXED)
    ctx = _ctx(tokenizer, small_model, policy_sampler)
    algo = DPOPlus(_config(), ctx, total_iterations=1, reference_sampler=ref_sampler)
    ref_before = {k: v.clone() for k, v in ctx.reference.state_dict().items()}
    pol_before = [p.detach().clone() for p in ctx.policy.parameters()]
    metrics = algo.iteration(ctx.env.problems, 0)

    assert ref_sampler.calls == 1 and policy_sampler.calls == 0  # offline: samples from π_ref
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    # per problem 2 correct x 2 incorrect = 4 pairs; 3 epochs of one batch of 4
    assert metrics["dpo/pairs"] == 8 and metrics["dpo/problems_with_pairs"] == 2
    assert metrics["update/optimizer_steps"] == 3 * 2
    assert metrics["tokens/episodes"] > 0 and metrics["train/reward"] == 0.5
    assert any(not torch.equal(a, b) for a, b in zip(pol_before, ctx.policy.parameters()))
    assert all(torch.equal(v, ref_before[k]) for k, v in ctx.reference.state_dict().items())
    # the update raised the chosen-vs-rejected log-ratio above the reference's
    from algos.rollout import collect_episodes
    episodes = collect_episodes(ctx.env, ref_sampler, ctx.env.problems[:1], _config().sampling.params(_config().sampling.samples_per_prompt, ()), seed=0)
    correct = [e for e in episodes if e.reward == 1.0]
    wrong = [e for e in episodes if e.reward == 0.0]
    pairs = [(c, r) for c in correct for r in wrong]
    after = _pair_logratio(ctx, pairs, ctx.policy)
    before = _pair_logratio(ctx, pairs, ctx.reference)
    assert sum(after) > sum(before)


def test_no_pairs_means_no_update(tokenizer, small_model):
    sampler = FixedSampler(tokenizer, ["so\n#### 1"])  # every answer correct: no incorrect partner
    ctx = _ctx(tokenizer, small_model, sampler)
    algo = DPOPlus(_config(), ctx, total_iterations=1, reference_sampler=sampler)
    before = [p.detach().clone() for p in ctx.policy.parameters()]
    metrics = algo.iteration(ctx.env.problems, 0)
    assert metrics["dpo/pairs"] == 0 and metrics["update/optimizer_steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, ctx.policy.parameters()))


def test_online_mode_samples_from_the_policy_and_can_refresh_the_reference(tokenizer, small_model):
    policy_sampler = FixedSampler(tokenizer, MIXED)
    ctx = _ctx(tokenizer, small_model, policy_sampler)
    algo = DPOPlus(_config(sample_from="policy", refresh_reference=True), ctx, total_iterations=2)
    algo.iteration(ctx.env.problems, 0)
    assert policy_sampler.calls == 1 and algo._reference_sampler is None
    changed = any(not torch.equal(a, b) for a, b in zip(ctx.policy.state_dict().values(),
                                                         ctx.reference.state_dict().values()))
    assert changed
    start_of_round_1 = {k: v.clone() for k, v in ctx.policy.state_dict().items()}
    algo.iteration(ctx.env.problems, 1)  # the reference is reset to the policy before this round
    assert policy_sampler.calls == 2
    assert all(torch.equal(v, start_of_round_1[k]) for k, v in ctx.reference.state_dict().items())
    assert any(not torch.equal(v, start_of_round_1[k]) for k, v in ctx.policy.state_dict().items())
    assert all(not p.requires_grad for p in ctx.reference.parameters())


def test_default_reference_sampler_mirrors_the_trainer_sampler(tokenizer, small_model):
    sampler = HFSampler(small_model, tokenizer, max_batch_size=7, max_context=123)
    ctx = _ctx(tokenizer, small_model, sampler)
    algo = DPOPlus(_config(), ctx, total_iterations=1)
    ref = algo.reference_sampler
    assert isinstance(ref, HFSampler) and ref.model is ctx.reference
    assert ref.max_batch_size == 7 and ref.max_context == 123


def test_trainer_smoke_run(tmp_path, tokenizer, small_model):
    from algos.training.config import RunConfig
    from algos.training.loop import train

    model_dir = tmp_path / "model"
    small_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    run = RunConfig(model=str(model_dir), iterations=1, out=tmp_path / "run", wandb="disabled", eval_problems=2,
                    threads=1)
    cfg = with_fields(DPOPlusConfig(), prompts_per_iteration=2, samples_per_prompt=3, max_new_tokens=12, minibatch_size=4,
                        micro_batch_size=2)
    summary = train(run, "dpo_plus", cfg, DPOPlus)
    assert 0.0 <= summary["accuracy_after"] <= 1.0
    assert (tmp_path / "run" / "final").is_dir()


def test_config_rejects_bad_values():
    for field, value in (("beta", 0.0), ("lam", -1.0), ("samples_per_prompt", 0), ("top_p", 1.5),
                         ("max_pairs_per_problem", 0), ("warmup_ratio", 1.0), ("sample_from", "sft")):
        with pytest.raises(ValueError, match=field):
            with_fields(DPOPlusConfig(), **{field: value})
    with pytest.raises(ValueError, match="micro_batch_size"):
        with_fields(DPOPlusConfig(), minibatch_size=4, micro_batch_size=8)
    with pytest.raises(ValueError, match="refresh_reference"):
        with_fields(DPOPlusConfig(), refresh_reference=True)
    cfg = DPOPlusConfig()
    assert (cfg.sampling.samples_per_prompt, cfg.beta, cfg.lam, cfg.optim.learning_rate, cfg.optim.minibatch_size, cfg.optim.epochs,
            cfg.max_pairs_per_problem, cfg.sampling.temperature, cfg.sampling.top_p) == (64, 0.3, 50.0, 1e-6, 64, 3, 64, 0.6, 0.9)
    tiny = DPOPlusConfig.cpu_tiny()
    assert tiny.sampling.prompts_per_iteration == 8 and tiny.sampling.max_new_tokens == 200
