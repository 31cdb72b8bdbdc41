"""GRPO (Shao et al., "DeepSeekMath", arXiv 2402.03300, §4.1) and its loss-normalisation fixes.

For each problem, sample a group of G responses from π_old and give every token of response i the
group-normalised outcome advantage

    Â_i = (r_i − mean(r)) / std(r)        (unbiased std + 1e-6, as verl; equal rewards give Â = 0),

then maximise the clipped surrogate with a k3 KL to the reference *in the loss* (no critic, no KL in
the reward):

    J = (1/G) Σ_i (1/|o_i|) Σ_t { min(ρ Â, clip(ρ, 1 ± ε) Â) − β k3_{i,t} }     (DeepSeekMath eq. 3).

The normalisation is a config field (`core.aggregate` modes; reference/algorithms.md §3):
``seq_mean_token_mean`` is the original above; ``token_mean`` is DAPO's token-level loss (Yu et al.
2025, arXiv 2503.14476), usually with clip-higher ε_hi = 0.28; Dr. GRPO (Liu et al. 2025, arXiv
2503.20783) is ``seq_sum_const`` (Σ_iΣ_t ℓ / (G · L_max), L_max = max_new_tokens) with
``scale_by_std=False`` and β = 0. ``drop_uniform_groups`` removes groups whose rewards are all equal
(they carry no signal) from the update, DAPO's dynamic-sampling filter without the re-sampling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from algos import core
from algos.actor import ActorSettings, actor_update
from algos.config import make_optimizer
from algos.models.sft import cpu_has_fast_bf16
from algos.rollout import collect_episodes, episode_metrics
from algos.samplers.base import SamplingParams
from algos.training.checks import (check_at_least, check_at_most, check_finite, check_fraction, check_non_negative,
                                   check_positive, check_top_p, check_types)
from algos.training.context import TrainContext


@dataclass
class GRPOConfig:
    """GRPO hyperparameters. Defaults are DeepSeekMath's (lr 1e-6, β 0.04, G 64, 1024 tokens, one
    gradient update per sampling stage; 16 prompts × 64 = 1024 outputs per iteration) with
    VinePPO's sampling settings (T 0.6, top_p 0.9); `cpu_tiny` is the small CPU setting."""

    prompts_per_iteration: int = 16
    """Distinct problems (groups) per iteration."""
    samples_per_prompt: int = 64
    """G: responses per problem (group size, >= 2)."""
    temperature: float = 0.6
    """Sampling temperature; training log-probs use it too."""
    top_p: float = 0.9
    """Nucleus sampling mass."""
    max_new_tokens: int = 1024
    """Response budget in tokens (also L_max of the seq_sum_const normaliser)."""
    aggregation: core.AggregationMode = "seq_mean_token_mean"
    """Loss normalisation: seq_mean_token_mean (GRPO), token_mean (DAPO), seq_sum_const (Dr. GRPO)."""
    scale_by_std: bool = True
    """Divide centred rewards by the group std (False: Dr. GRPO)."""
    drop_uniform_groups: bool = False
    """Leave groups with all-equal rewards out of the update (DAPO's dynamic-sampling filter)."""
    epochs: int = 1
    """Passes over each iteration's responses (μ; 1 = on-policy, ρ ≡ 1 on the first pass)."""
    minibatch_size: int = 1024
    """Responses per optimiser step."""
    micro_batch_size: int = 8
    """Responses per forward/backward pass."""
    learning_rate: float = 1e-6
    """AdamW learning rate (peak)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.03
    """Fraction of optimiser steps in linear warm-up, then linear decay to 0."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    bf16_autocast: bool = False
    """Run the policy/reference forward passes of the update under bf16 autocast (weights, optimiser
    and loss stay float32). ``cpu_tiny`` turns it on where the CPU has fast bf16 kernels: 2-3x faster
    updates on the 2-core AVX512-BF16 machine (experiments/bench/update.py)."""
    clip_eps: float = 0.2
    """ε (ε_lo with clip-higher)."""
    clip_eps_high: float | None = None
    """ε_hi for DAPO's clip-higher (0.28); None uses clip_eps."""
    kl_coef: float = 0.04
    """β of the k3 KL-to-reference term in the loss (0 drops the reference forward pass)."""

    def __post_init__(self) -> None:
        """Raises TypeError / ValueError naming ``GRPOConfig.<field>`` (see `algos.training.checks`);
        ``aggregation`` must be one of `core.AggregationMode` (checked with the types)."""
        check_types(self)
        check_finite(self)
        check_positive(self, ("prompts_per_iteration", "max_new_tokens", "epochs", "minibatch_size",
                              "micro_batch_size", "learning_rate", "temperature", "grad_clip", "clip_eps"))
        check_at_least(self, "samples_per_prompt", 2, "group-normalised advantages need a group of at least 2")
        if self.clip_eps_high is not None:
            check_positive(self, ("clip_eps_high",))
        check_top_p(self)
        check_non_negative(self, ("kl_coef", "weight_decay"))
        check_fraction(self, "warmup_ratio")
        check_at_most(self, "micro_batch_size", "minibatch_size")

    @classmethod
    def cpu_tiny(cls) -> "GRPOConfig":
        """Small setting for the offline tiny model on a 2-core CPU (not a paper's)."""
        return cls(prompts_per_iteration=8, samples_per_prompt=4, max_new_tokens=200, minibatch_size=32,
                   micro_batch_size=16, learning_rate=1e-5,
                   bf16_autocast=cpu_has_fast_bf16())

    def sampling(self, n: int, stop_strings: tuple[str, ...]) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.max_new_tokens, stop_strings, n)

    def steps_per_iteration(self) -> int:
        return self.epochs * -(-self.prompts_per_iteration * self.samples_per_prompt // self.minibatch_size)

    def actor_settings(self) -> ActorSettings:
        return ActorSettings(
            epochs=self.epochs, minibatch_size=self.minibatch_size, micro_batch_size=self.micro_batch_size,
            clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high, kl_coef=self.kl_coef,
            temperature=self.temperature, grad_clip=self.grad_clip, whiten_advantages=False,
            pg_aggregation=self.aggregation, kl_aggregation=self.aggregation,
            aggregation_constant=float(self.max_new_tokens), bf16_autocast=self.bf16_autocast,
        )


class GRPO:
    """Group Relative Policy Optimization: group-normalised outcome advantages + the clipped
    surrogate with a k3 KL in the loss."""

    name = "grpo"
    supports_distributed = True  # actor_update shards the batch across processes (algos.training.distributed)

    def __init__(self, config: GRPOConfig, ctx: TrainContext, total_iterations: int) -> None:
        self.config = config
        self.ctx = ctx
        if config.drop_uniform_groups and ctx.dist.world_size > 1:
            raise ValueError("GRPOConfig.drop_uniform_groups: not supported with several processes (ranks would "
                             "train on different numbers of responses); turn it off or use one process")
        self.optimizer, self.scheduler = make_optimizer(
            ctx.policy, config.learning_rate, config.weight_decay, config.warmup_ratio,
            total_steps=config.steps_per_iteration() * total_iterations,
        )

    def state_dict(self) -> dict:
        """What a resumable checkpoint needs besides the policy: optimiser and LR-schedule states."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def iteration(self, problems: Sequence, iteration: int) -> dict[str, float]:
        cfg, ctx = self.config, self.ctx
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        G = cfg.samples_per_prompt
        episodes = collect_episodes(ctx.env, ctx.sampler, problems, cfg.sampling(G, ctx.task.stop_strings),
                                    seed=ctx.seed_for(iteration, "episodes"), timings=timings)
        rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float32).view(len(problems), G)
        advantages = core.group_advantages(rewards, scale_by_std=cfg.scale_by_std)
        keep = list(range(len(episodes)))
        uniform = (rewards.max(dim=1).values == rewards.min(dim=1).values)
        if cfg.drop_uniform_groups:
            keep = [i for i in keep if not uniform[i // G]]
        t1 = time.perf_counter()
        flat = advantages.flatten().tolist()
        train_eps = [episodes[i] for i in keep]
        per_token = [[flat[i]] * len(episodes[i].response_ids) for i in keep]
        update: dict[str, float] = {"optimizer_steps": 0.0}
        if train_eps:
            update = actor_update(ctx.policy, ctx.reference, self.optimizer, self.scheduler, train_eps, per_token,
                                  cfg.actor_settings(), ctx.pad_token_id, ctx.generator, dist=ctx.dist)
            ctx.sampler.update_weights(ctx.policy)
        t2 = time.perf_counter()
        metrics = episode_metrics(episodes)
        metrics.update({
            "grpo/uniform_groups": float(uniform.float().mean()),
            "grpo/trained_responses": float(len(train_eps)),
            "train/advantage_abs_mean": float(advantages.abs().mean()),
            "time/sampling": timings.get("generate", 0.0),
            "time/grading": timings.get("env", 0.0),
            "time/update": t2 - t1,
            "time/iteration": t2 - t0,
        })
        metrics["time/logprobs"] = update.pop("time_logprobs", 0.0)  # π_old / π_ref passes, part of time/update
        metrics.update({f"update/{k}": v for k, v in update.items()})
        metrics["update/lr"] = self.scheduler.get_last_lr()[0]
        return metrics
