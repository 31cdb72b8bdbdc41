"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al., "Back to Basics: Revisiting
REINFORCE Style Optimization for Learning from Human Feedback in LLMs", arXiv 2402.14740).

For each problem, sample k responses; the whole response is one action. Its reward is the outcome
score, optionally minus a k1 KL penalty summed over the sequence (no gradient through it):

    R_i = r_i − β Σ_t [log π(y_{i,t}) − log π_ref(y_{i,t})],

and its advantage is R_i minus the mean reward of the other k − 1 samples (paper eq. 6):

    A_i = R_i − (1/(k−1)) Σ_{j≠i} R_j = k/(k−1) · (R_i − R̄).

The loss is REINFORCE on sequence log-probs, ``−(1/k) Σ_i A_i Σ_t log π(y_{i,t})`` — aggregation
``seq_mean_token_sum`` — computed through the shared actor update with one on-policy epoch, so the
ratio is 1 and the clipped surrogate's gradient is exactly REINFORCE's (TRL and verl feed the same
A_i into the clipped surrogate). A sequence sum weights long responses more than a token mean does
(Adam makes the overall scale of the loss largely irrelevant, but gradient clipping does see it);
``aggregation="token_mean"`` gives the TRL/verl variant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from algos import core
from algos.actor import ActorSettings, actor_update, batch_logprobs
from algos.config import make_optimizer
from algos.models.policy import batch_sequences
from algos.models.sft import cpu_has_fast_bf16
from algos.rollout import collect_episodes, episode_metrics
from algos.samplers.base import SamplingParams
from algos.training.checks import (check_at_least, check_at_most, check_finite, check_fraction, check_non_negative,
                                   check_positive, check_top_p, check_types)
from algos.training.context import TrainContext


@dataclass
class RLOOConfig:
    """RLOO hyperparameters. The paper studies k ∈ {2, 4} (larger is better) in RLHF; the VinePPO
    repository has no RLOO config, so the batch follows VinePPO's (64 prompts × k = 8, T 0.6,
    top_p 0.9, 1024 tokens, lr 1e-6); `cpu_tiny` is the small CPU setting."""

    prompts_per_iteration: int = 64
    """Distinct problems per iteration."""
    samples_per_prompt: int = 8
    """k: responses per problem (>= 2)."""
    temperature: float = 0.6
    """Sampling temperature; training log-probs use it too."""
    top_p: float = 0.9
    """Nucleus sampling mass."""
    max_new_tokens: int = 1024
    """Response budget in tokens."""
    kl_coef: float = 0.0
    """β of the k1 KL penalty folded into the sequence reward (0: the plain verifier score)."""
    aggregation: core.AggregationMode = "seq_mean_token_sum"
    """seq_mean_token_sum: REINFORCE on sequence log-probs (paper); token_mean: TRL/verl."""
    epochs: int = 1
    """Passes over each iteration's responses (1 = on-policy REINFORCE)."""
    minibatch_size: int = 512
    """Responses per optimiser step (the whole batch by default: one on-policy step)."""
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
    """PPO clip ε, active only when epochs > 1 or there are several mini-batches (off-policy steps)."""

    def __post_init__(self) -> None:
        """Raises TypeError / ValueError naming ``RLOOConfig.<field>`` (see `algos.training.checks`);
        ``aggregation`` must be one of `core.AggregationMode` (checked with the types)."""
        check_types(self)
        check_finite(self)
        check_positive(self, ("prompts_per_iteration", "max_new_tokens", "epochs", "minibatch_size",
                              "micro_batch_size", "learning_rate", "temperature", "grad_clip", "clip_eps"))
        check_at_least(self, "samples_per_prompt", 2, "the leave-one-out baseline needs k >= 2")
        check_top_p(self)
        check_non_negative(self, ("kl_coef", "weight_decay"))
        check_fraction(self, "warmup_ratio")
        check_at_most(self, "micro_batch_size", "minibatch_size")

    @classmethod
    def cpu_tiny(cls) -> "RLOOConfig":
        """Small setting for the offline tiny model on a 2-core CPU (not a paper's)."""
        return cls(prompts_per_iteration=8, samples_per_prompt=4, max_new_tokens=200, minibatch_size=32,
                   micro_batch_size=16, learning_rate=1e-6,
                   bf16_autocast=cpu_has_fast_bf16())

    def sampling(self, n: int, stop_strings: tuple[str, ...]) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.max_new_tokens, stop_strings, n)

    def steps_per_iteration(self) -> int:
        return self.epochs * -(-self.prompts_per_iteration * self.samples_per_prompt // self.minibatch_size)


def sequence_kl_k1(policy, reference, episodes, temperature: float, pad_token_id: int, micro: int = 16,
                   bf16_autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_t k1_t = Σ_t [log π(y_t) − log π_ref(y_t)] per episode, shape (N,), nats, no gradient; and the
    policy's per-token log-probs, (N, L) in `batch_sequences` layout, which the actor update reuses
    as π_old instead of a second forward pass."""
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], pad_token_id)
    mask = batch["response_mask"].float()
    logp = batch_logprobs(policy, batch, temperature, micro, bf16_autocast=bf16_autocast)
    ref = batch_logprobs(reference, batch, temperature, micro, bf16_autocast=bf16_autocast)
    return core.masked_sum(core.kl_estimate(logp, ref, "k1"), mask, dim=1), logp


class RLOO:
    """REINFORCE Leave-One-Out."""

    name = "rloo"
    supports_distributed = True  # actor_update shards the batch across processes (algos.training.distributed)

    def __init__(self, config: RLOOConfig, ctx: TrainContext, total_iterations: int) -> None:
        self.config = config
        self.ctx = ctx
        self.optimizer, self.scheduler = make_optimizer(
            ctx.policy, config.learning_rate, config.weight_decay, config.warmup_ratio,
            total_steps=config.steps_per_iteration() * total_iterations,
        )
        self.settings = ActorSettings(
            epochs=config.epochs, minibatch_size=config.minibatch_size, micro_batch_size=config.micro_batch_size,
            clip_eps=config.clip_eps, kl_coef=0.0, temperature=config.temperature, grad_clip=config.grad_clip,
            whiten_advantages=False, pg_aggregation=config.aggregation, bf16_autocast=config.bf16_autocast,
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
        k = cfg.samples_per_prompt
        episodes = collect_episodes(ctx.env, ctx.sampler, problems, cfg.sampling(k, ctx.task.stop_strings),
                                    seed=ctx.seed_for(iteration, "episodes"), timings=timings)
        t1 = time.perf_counter()
        scores = torch.tensor([e.reward for e in episodes], dtype=torch.float32)
        kl, old_logp = torch.zeros_like(scores), None
        if cfg.kl_coef > 0:
            kl, old_logp = sequence_kl_k1(ctx.policy, ctx.reference, episodes, cfg.temperature, ctx.pad_token_id,
                                          cfg.micro_batch_size, cfg.bf16_autocast)
        rewards = (scores - cfg.kl_coef * kl).view(len(problems), k)
        advantages = core.leave_one_out_advantages(rewards).flatten().tolist()
        per_token = [[a] * len(e.response_ids) for a, e in zip(advantages, episodes)]
        update = actor_update(ctx.policy, ctx.reference, self.optimizer, self.scheduler, episodes, per_token,
                              self.settings, ctx.pad_token_id, ctx.generator, dist=ctx.dist, old_logprobs=old_logp)
        ctx.sampler.update_weights(ctx.policy)
        t2 = time.perf_counter()
        metrics = episode_metrics(episodes)
        metrics.update({
            "train/advantage_abs_mean": sum(abs(a) for a in advantages) / len(advantages),
            "rloo/sequence_kl": float(kl.mean()),
            "time/sampling": timings.get("generate", 0.0),
            "time/grading": timings.get("env", 0.0),
            "time/update": t2 - t1,
            "time/iteration": t2 - t0,
        })
        metrics["time/logprobs"] = update.pop("time_logprobs", 0.0)  # π_old / π_ref passes, part of time/update
        metrics.update({f"update/{k}": v for k, v in update.items()})
        metrics["update/lr"] = self.scheduler.get_last_lr()[0]
        return metrics
