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
from dataclasses import dataclass, field
from typing import Sequence

import torch

from algos import core
from algos.actor import ActorSettings, actor_update, batch_logprobs
from algos.config import (
    ActorConfig,
    OptimConfig,
    SamplingConfig,
    advance_schedule,
    load_optimizer_state,
    optimizer_state,
    with_fields,
)
from algos.models.policy import batch_sequences
from algos.models.sft import cpu_has_fast_bf16
from algos.rollout import episode_metrics
from algos.training.checks import check_at_least, check_types
from algos.training.context import TrainContext


@dataclass
class RLOOConfig:
    """RLOO hyperparameters. The paper studies k ∈ {2, 4} (larger is better) in RLHF; the VinePPO
    repository has no RLOO config, so the batch follows VinePPO's (64 prompts × k = 8, T 0.6,
    top_p 0.9, 1024 tokens, lr 1e-6); `cpu_tiny` is the small CPU setting."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Problems per iteration and k responses each (samples_per_prompt, >= 2)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=1, minibatch_size=512))
    """AdamW and schedule; the default mini-batch is the whole batch: one on-policy REINFORCE step."""
    actor: ActorConfig = field(default_factory=lambda: ActorConfig(
        kl_coef=0.0, whiten_advantages=False, aggregation="seq_mean_token_sum"))
    """kl_coef: β of the k1 KL penalty folded into the sequence reward (0: the plain verifier
    score); aggregation: seq_mean_token_sum is REINFORCE on sequence log-probs (paper), token_mean the
    TRL/verl variant; clip_eps is active only off-policy (epochs > 1 or several mini-batches)."""

    def __post_init__(self) -> None:
        """Raises TypeError / ValueError naming ``RLOOConfig.<field>`` (see `algos.training.checks`)."""
        check_types(self)
        check_at_least(self, "sampling.samples_per_prompt", 2, "the leave-one-out baseline needs k >= 2")

    @classmethod
    def cpu_tiny(cls) -> "RLOOConfig":
        """Small setting for the offline tiny model on a 2-core CPU (not a paper's)."""
        return with_fields(cls(), prompts_per_iteration=8, samples_per_prompt=4, max_new_tokens=200,
                           minibatch_size=32, micro_batch_size=16, learning_rate=1e-6,
                           bf16_autocast=cpu_has_fast_bf16())


def sequence_kl_k1(policy, reference, episodes, temperature: float, pad_token_id: int, micro: int = 16,
                   bf16_autocast: bool = False, share_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_t k1_t = Σ_t [log π(y_t) − log π_ref(y_t)] per episode, shape (N,), nats, no gradient; and the
    policy's per-token log-probs, (N, L) in `batch_sequences` layout, which the actor update reuses
    as π_old instead of a second forward pass. ``share_prompt``: see `algos.actor.batch_logprobs`."""
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], pad_token_id)
    mask = batch["response_mask"].float()
    logp = batch_logprobs(policy, batch, temperature, micro, bf16_autocast=bf16_autocast, share_prompt=share_prompt)
    ref = batch_logprobs(reference, batch, temperature, micro, bf16_autocast=bf16_autocast, share_prompt=share_prompt)
    return core.masked_sum(core.kl_estimate(logp, ref, "k1"), mask, dim=1), logp


class RLOO:
    """REINFORCE Leave-One-Out."""

    name = "rloo"
    supports_distributed = True  # actor_update shards the batch across processes (algos.training.distributed)
    supports_dynamic_sampling = True  # collects through ctx.collect_groups

    def __init__(self, config: RLOOConfig, ctx: TrainContext, total_iterations: int) -> None:
        self.config = config
        self.ctx = ctx
        episodes = config.sampling.prompts_per_iteration * config.sampling.samples_per_prompt
        self.optimizer, self.scheduler = config.optim.build(
            ctx.policy, config.optim.steps_per_iteration(episodes) * total_iterations)
        # the KL is a k1 penalty in the reward (see `iteration`), not a term of the loss
        self.settings = ActorSettings.from_configs(config.optim, config.actor, config.sampling.temperature, kl_coef=0.0)

    def state_dict(self) -> dict:
        """What a resumable checkpoint needs besides the policy: optimiser and LR-schedule states."""
        return optimizer_state(self.optimizer, self.scheduler, self.ctx.sharded)

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(self.optimizer, self.scheduler, state)

    def trainables(self) -> dict:
        """The trained modules and their optimisers, by name (sharded checkpoints, `algos.training.context`)."""
        return {"policy": (self.ctx.policy, self.optimizer)}

    def iteration(self, problems: Sequence, iteration: int) -> dict[str, float]:
        cfg, ctx = self.config, self.ctx
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        k = cfg.sampling.samples_per_prompt
        episodes, collection = ctx.collect_groups(problems, cfg.sampling.params(k, ctx.task.stop_strings), iteration,
                                                  timings)
        t1 = time.perf_counter()
        scores = torch.tensor([e.reward for e in episodes], dtype=torch.float32)
        kl, old_logp = torch.zeros_like(scores), None
        if cfg.actor.kl_coef > 0:
            kl, old_logp = sequence_kl_k1(ctx.policy, ctx.reference, episodes, cfg.sampling.temperature,
                                          ctx.pad_token_id, cfg.optim.micro_batch_size, cfg.actor.bf16_autocast,
                                          cfg.actor.share_prompt_forward)
        rewards = (scores - cfg.actor.kl_coef * kl).view(len(episodes) // k, k)
        advantages = core.leave_one_out_advantages(rewards).flatten().tolist()
        per_token = [[a] * len(e.response_ids) for a, e in zip(advantages, episodes)]
        update: dict[str, float] = {"optimizer_steps": 0.0}
        schedule_start = self.scheduler.last_epoch
        if episodes:  # dynamic sampling may keep no group
            ctx.observe_advantages(iteration, episodes, per_token)
            update = actor_update(ctx.policy, ctx.reference, self.optimizer, self.scheduler, episodes, per_token,
                                  self.settings, ctx.pad_token_id, ctx.generator, dist=ctx.dist, old_logprobs=old_logp)
            ctx.sampler.update_weights(ctx.policy)
        # this iteration's share of the schedule even when dynamic sampling kept fewer groups
        planned = cfg.optim.steps_per_iteration(len(problems) * k)
        advance_schedule(self.scheduler, planned - (self.scheduler.last_epoch - schedule_start))
        t2 = time.perf_counter()
        metrics = {**episode_metrics(episodes), **collection}
        metrics.update({
            "train/advantage_abs_mean": sum(abs(a) for a in advantages) / max(len(advantages), 1),
            "rloo/sequence_kl": float(kl.mean()) if kl.numel() else 0.0,
            "time/sampling": timings.get("generate", 0.0),
            "time/grading": timings.get("env", 0.0),
            "time/update": t2 - t1,
            "time/iteration": t2 - t0,
        })
        metrics["time/logprobs"] = update.pop("time_logprobs", 0.0)  # π_old / π_ref passes, part of time/update
        metrics.update({f"update/{k}": v for k, v in update.items()})
        metrics["update/lr"] = self.scheduler.get_last_lr()[0]
        return metrics
