"""ReST-EM (algos/restem.py): filtering, checkpoint selection, M-steps from the base weights, and
which weights sample each round."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ToyTask
from conftest import fake_episodes as _episodes

from algos.config import with_fields
from algos.models.policy import clone_reference
from algos.restem import RestEM, RestEMConfig, filter_kept, nll_loss, select_checkpoint
from algos.rollout import Episode
from algos.samplers.base import Completion
from algos.training.context import TrainContext
from langenv import LanguageEnv
from langenv.state import EnvState

# ------------------------------------------------------------------------------------- filtering

def test_kept_samples_pass_the_threshold_and_respect_the_cap():
    episodes = _episodes({"a": [1.0] * 14 + [0.0] * 3, "b": [0.0, 1.0, 0.5, 1.0], "c": [0.0, 0.0]})
    kept = filter_kept(episodes, reward_threshold=1.0, max_per_problem=10)
    assert all(e.reward >= 1.0 for e in kept)
    counts = {}
    for e in kept:
        counts[e.state.problem.id] = counts.get(e.state.problem.id, 0) + 1
    assert counts == {"a": 10, "b": 2}
    assert [e.text for e in kept if e.state.problem.id == "a"] == [f"a-{j}" for j in range(10)]  # first M
    assert len(filter_kept(episodes, 1.0, None)) == 16
    assert len(filter_kept(episodes, 0.5, None)) == 17


# ---------------------------------------------------------------------------- checkpoint selection

def test_checkpoint_selection_stops_before_the_first_drop():
    assert select_checkpoint([0.2, 0.3, 0.25, 0.4]) == 1
    assert select_checkpoint([0.1, 0.2, 0.3, 0.4]) == 3
    assert select_checkpoint([0.5, 0.4, 0.9]) == 0
    assert select_checkpoint([0.3]) == 0
    assert select_checkpoint([0.2, 0.2, 0.3]) == 0  # a tie ends the walk, as in the VinePPO code
    assert select_checkpoint([0.2, 0.3, 0.25, 0.4], "choose_best") == 3
    assert select_checkpoint([0.2, 0.4, 0.4], "choose_best") == 1
    assert select_checkpoint([0.4, 0.2, 0.1], "last") == 2
    with pytest.raises(ValueError):
        select_checkpoint([])


def test_nll_is_a_per_sequence_token_mean(tokenizer, small_model):
    episodes = _episodes({"a": [1.0, 1.0]})
    episodes[1] = Episode(EnvState(episodes[1].state.problem, (1, 9), (5, 6, 7, 8, 2), max_new_tokens=8,
                                   eos_token_id=2, terminated=True), 1.0, "correct", "")
    with torch.no_grad():
        both = nll_loss(small_model, episodes, 0.6, 0)
        singles = torch.cat([nll_loss(small_model, [e], 0.6, 0) for e in episodes])
    torch.testing.assert_close(both, singles)
    from algos.dpo_plus import sequence_logprobs
    with torch.no_grad():
        total = sequence_logprobs(small_model, episodes[1:], 0.6, 0)
    torch.testing.assert_close(singles[1:], -total / 5)


# ------------------------------------------------------------------------------------ iterations

class RecordingSampler:
    """Fixed completions (cycling through ``texts``); records its model's weights at every call.
    Like `HFSampler`, it shares the policy object, so it samples from the current policy."""

    def __init__(self, tokenizer, model, texts):
        self.tok, self.model, self.texts = tokenizer, model, texts
        self.seen: list[dict[str, torch.Tensor]] = []

    def generate(self, prompts, params, seed=None):
        self.seen.append({k: v.clone() for k, v in self.model.state_dict().items()})
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
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())


MIXED = ["so\n#### 1", "so\n#### 0", "then\n#### 1", "no\n#### 7"]


def _setup(tokenizer, small_model, texts=MIXED, **overrides):
    task = ToyTask(2)
    env = LanguageEnv(task, tokenizer, split="train", max_new_tokens=32)
    sampler = RecordingSampler(tokenizer, small_model, texts)
    ctx = TrainContext(task, env, sampler, small_model, clone_reference(small_model), tokenizer, seed=0)
    ctx.generator.manual_seed(0)
    settings = dict(prompts_per_iteration=2, samples_per_prompt=4, max_new_tokens=32, epochs=3, minibatch_size=1,
                    micro_batch_size=1, learning_rate=1e-3, warmup_ratio=0.0, eval_every_steps=2,
                    validation_problems=2, validation_samples=1, validation_temperature=0.0)
    algo = RestEM(with_fields(RestEMConfig(), **{**settings, **overrides}), ctx, total_iterations=2)
    return ctx, sampler, algo


def _script_validation(algo, accuracies=None):
    """Replace validation by a script; record the weights each checkpoint was validated with."""
    seen = []

    def validate():
        seen.append({k: v.clone() for k, v in algo.ctx.policy.state_dict().items()})
        acc = accuracies[len(seen) - 1] if accuracies is not None else 0.1 * len(seen)  # default: always improving
        return {"accuracy": acc, "tokens": 10.0}

    algo.validate = validate
    return seen


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_m_steps_start_from_base_weights_and_rounds_sample_from_the_chosen_checkpoint(tokenizer, small_model):
    ctx, sampler, algo = _setup(tokenizer, small_model)
    _script_validation(algo)  # improving: the last checkpoint of each round is chosen
    base = {k: v.clone() for k, v in ctx.reference.state_dict().items()}
    first_training_forward = []

    def hook(module, args, kwargs):
        if module.training and len(first_training_forward) < len(sampler.seen):
            first_training_forward.append({k: v.detach().clone() for k, v in module.state_dict().items()})

    handle = ctx.policy.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        m0 = algo.iteration(ctx.env.problems, 0)
        after_round_0 = {k: v.clone() for k, v in ctx.policy.state_dict().items()}
        m1 = algo.iteration(ctx.env.problems, 1)
    finally:
        handle.remove()

    # 4 kept (2 correct per problem), batch 1, 3 epochs: 12 steps, checkpoints at 0, 2, ..., 12
    assert m0["restem/kept"] == 4 and m0["restem/problems_with_kept"] == 2
    assert m0["update/optimizer_steps"] == 12 and m0["restem/selected_step"] == 12
    assert m0["restem/checkpoints_evaluated"] == 7 and m1["restem/checkpoints_evaluated"] == 6  # base cached
    assert all(math.isfinite(v) for v in {**m0, **m1}.values())
    assert not _same(after_round_0, base)
    # the E-step of round i samples with the checkpoint chosen in round i - 1 (π_0 = the base)
    assert len(sampler.seen) == 2
    assert _same(sampler.seen[0], base) and _same(sampler.seen[1], after_round_0)
    # every M-step's first training forward pass sees the base weights, not the previous policy
    assert len(first_training_forward) == 2
    assert all(_same(p, base) for p in first_training_forward)
    assert _same(ctx.reference.state_dict(), base)


def test_the_checkpoint_before_the_first_drop_becomes_the_policy(tokenizer, small_model):
    ctx, sampler, algo = _setup(tokenizer, small_model)
    seen = _script_validation(algo, [0.1, 0.3, 0.2, 0.5, 0.6])
    metrics = algo.iteration(ctx.env.problems, 0)
    # checkpoints: step 0 (0.1), step 2 (0.3), step 4 (0.2: drop) -> step 2; training stops at step 4
    assert metrics["restem/selected_step"] == 2 and metrics["restem/validation_accuracy"] == 0.3
    assert metrics["update/optimizer_steps"] == 4 and metrics["update/planned_steps"] == 12
    assert len(seen) == 3 and metrics["tokens/validation"] == 30.0
    assert _same(ctx.policy.state_dict(), seen[1]) and not _same(seen[1], seen[2])
    assert _same(sampler.model.state_dict(), seen[1])


def test_choose_best_runs_every_checkpoint(tokenizer, small_model):
    ctx, sampler, algo = _setup(tokenizer, small_model, early_stop_method="choose_best")
    seen = _script_validation(algo, [0.1, 0.3, 0.2, 0.5, 0.4, 0.1, 0.0])
    metrics = algo.iteration(ctx.env.problems, 0)
    assert metrics["update/optimizer_steps"] == 12 and metrics["restem/selected_step"] == 6
    assert _same(ctx.policy.state_dict(), seen[3])


def test_no_kept_samples_returns_to_the_base_model(tokenizer, small_model):
    ctx, sampler, algo = _setup(tokenizer, small_model, texts=["so\n#### 0"])
    _script_validation(algo)
    with torch.no_grad():
        for p in ctx.policy.parameters():
            p.add_(0.01)
    metrics = algo.iteration(ctx.env.problems, 0)
    assert metrics["restem/kept"] == 0 and metrics["update/optimizer_steps"] == 0
    assert metrics["restem/selected_step"] == 0
    assert _same(ctx.policy.state_dict(), ctx.reference.state_dict())


def test_real_validation_counts_tokens(tokenizer, small_model):
    ctx, sampler, algo = _setup(tokenizer, small_model, epochs=1, minibatch_size=4, micro_batch_size=2,
                                eval_every_steps=1)
    metrics = algo.iteration(ctx.env.problems, 0)
    # the recording sampler answers "so\n#### 1" first: greedy validation of 2 problems is all correct
    assert metrics["restem/validation_accuracy_start"] == 1.0
    assert metrics["restem/selected_step"] == 0  # no checkpoint can beat 1.0
    assert metrics["tokens/validation"] > 0 and metrics["restem/checkpoints_evaluated"] == 2
    # the walk ended at step 1, the first checkpoint after the start: its accuracy is logged too
    assert metrics["restem/validation_step_last"] == 1.0
    assert 0.0 <= metrics["restem/validation_accuracy_last"] <= 1.0


def test_trainer_smoke_run(tmp_path, tokenizer, small_model):
    from algos.training.config import RunConfig
    from algos.training.loop import train

    model_dir = tmp_path / "model"
    small_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    run = RunConfig(model=str(model_dir), iterations=1, out=tmp_path / "run", wandb="disabled", eval_problems=2,
                    threads=1)
    cfg = with_fields(RestEMConfig(), prompts_per_iteration=2, samples_per_prompt=2, max_new_tokens=12, minibatch_size=4,
                       micro_batch_size=2, validation_problems=2, validation_samples=1, validation_temperature=0.0)
    summary = train(run, "restem", cfg, RestEM)
    assert 0.0 <= summary["accuracy_after"] <= 1.0
    import json
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["iteration"] == 1)
    assert row["tokens/validation"] > 0 and row["restem/checkpoints_evaluated"] >= 1


def test_config_rejects_bad_values():
    for field, value in (("samples_per_prompt", 0), ("max_per_problem", 0), ("eval_every_steps", 0),
                         ("validation_temperature", -1.0), ("validation_problems", -1), ("top_p", 0.0),
                         ("early_stop_method", "latest"), ("learning_rate", 0.0)):
        with pytest.raises(ValueError, match=field):
            with_fields(RestEMConfig(), **{field: value})
    with pytest.raises(ValueError, match="micro_batch_size"):
        with_fields(RestEMConfig(), minibatch_size=4, micro_batch_size=8)
    cfg = RestEMConfig()
    assert (cfg.sampling.samples_per_prompt, cfg.sampling.temperature, cfg.sampling.top_p, cfg.reward_threshold, cfg.max_per_problem,
            cfg.optim.epochs, cfg.optim.learning_rate, cfg.optim.minibatch_size, cfg.validation_samples, cfg.validation_temperature) == (
        8, 0.6, 0.9, 1.0, 10, 8, 1e-6, 64, 16, 0.35)
    tiny = RestEMConfig.cpu_tiny()
    assert tiny.sampling.prompts_per_iteration == 8 and tiny.sampling.max_new_tokens == 200
