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
(they carry no signal) from the update, DAPO's dynamic-sampling filter without the re-sampling (the
full DAPO dynamic sampling, which re-samples to fill the batch, is the trainer's ``--dynamic-sampling``);
``prune_keep`` is CPPO's completion pruning (the k completions per group with the largest |Â|).
The learning-rate schedule is sized for every response (``epochs · ceil(G · prompts / minibatch)``
optimiser steps per iteration); optimiser steps an iteration does not take (dropped groups, or
mini-batches the actor skips) are stepped through on the schedule afterwards
(`algos.config.advance_schedule`), so each iteration uses up its share of the schedule and the rate
reaches 0 at the end of the run whatever is dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from algos import core
from algos.actor import ActorSettings, actor_update
from algos.config import (ActorConfig, OptimConfig, SamplingConfig, advance_schedule, load_optimizer_state,
                          optimizer_state, with_fields)
from algos.models.sft import cpu_has_fast_bf16
from algos.rollout import episode_metrics
from algos.training.checks import check_at_least, check_types
from algos.training.context import TrainContext


@dataclass
class GRPOConfig:
    """GRPO hyperparameters. Defaults are DeepSeekMath's (lr 1e-6, β 0.04, G 64, 1024 tokens, one
    gradient update per sampling stage; 16 prompts × 64 = 1024 outputs per iteration) with
    VinePPO's sampling settings (T 0.6, top_p 0.9); `cpu_tiny` is the small CPU setting."""

    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(prompts_per_iteration=16,
                                                                            samples_per_prompt=64))
    """Groups per iteration (prompts_per_iteration) of G responses (samples_per_prompt, >= 2);
    max_new_tokens is also L_max of the seq_sum_const normaliser."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=1, minibatch_size=1024))
    """AdamW and schedule; epochs is μ (1 = on-policy, ρ ≡ 1 on the first pass)."""
    actor: ActorConfig = field(default_factory=lambda: ActorConfig(
        kl_coef=0.04, whiten_advantages=False, aggregation="seq_mean_token_mean"))
    """The clipped surrogate (clip_eps_high 0.28: DAPO's clip-higher), the k3 KL in the loss, and the
    loss normalisation of both terms: seq_mean_token_mean (GRPO), token_mean (DAPO), seq_sum_const
    (Dr. GRPO)."""
    scale_by_std: bool = True
    """Divide centred rewards by the group std (False: Dr. GRPO)."""
    drop_uniform_groups: bool = False
    """Leave groups with all-equal rewards out of the update (DAPO's dynamic-sampling filter); the
    optimiser steps they would have taken are skipped on the LR schedule, which still ends at 0."""
    prune_keep: int | None = None
    """CPPO completion pruning (Lin et al. 2025, arXiv 2503.22342): train on only the this many
    completions per group with the largest |advantage| (their gradient weight); None: all."""

    def __post_init__(self) -> None:
        """Raises TypeError / ValueError naming ``GRPOConfig.<field>`` (see `algos.training.checks`)."""
        check_types(self)
        check_at_least(self, "sampling.samples_per_prompt", 2, "group-normalised advantages need a group of at least 2")
        check_at_least(self, "prune_keep", 1)

    @classmethod
    def cpu_tiny(cls) -> "GRPOConfig":
        """Small setting for the offline tiny model on a 2-core CPU (not a paper's)."""
        return with_fields(cls(), prompts_per_iteration=8, samples_per_prompt=4, max_new_tokens=200,
                           minibatch_size=32, micro_batch_size=16, learning_rate=1e-5,
                           bf16_autocast=cpu_has_fast_bf16())


def prune_completions(advantages: torch.Tensor, k: int, keep: Sequence[int]) -> list[int]:
    """CPPO's pruning (arXiv 2503.22342 §3): per group, the ``k`` completions with the largest
    |advantage| among ``keep`` (flat indices into the (groups, G) ``advantages``; ties keep sampling
    order), in index order."""
    G = advantages.shape[1]
    flat = advantages.flatten().abs().tolist()
    by_group: dict[int, list[int]] = {}
    for i in keep:
        by_group.setdefault(i // G, []).append(i)
    chosen = [i for members in by_group.values() for i in sorted(members, key=lambda i: -flat[i])[:k]]
    return sorted(chosen)


class GRPO:
    """Group Relative Policy Optimization: group-normalised outcome advantages + the clipped
    surrogate with a k3 KL in the loss."""

    name = "grpo"
    supports_distributed = True  # actor_update shards the batch across processes (algos.training.distributed)
    supports_dynamic_sampling = True  # collects through ctx.collect_groups

    def __init__(self, config: GRPOConfig, ctx: TrainContext, total_iterations: int) -> None:
        self.config = config
        self.ctx = ctx
        if config.drop_uniform_groups and ctx.dist.world_size > 1:
            raise ValueError("GRPOConfig.drop_uniform_groups: not supported with several processes (ranks would "
                             "train on different numbers of responses); turn it off or use one process")
        episodes = config.sampling.prompts_per_iteration * min(config.sampling.samples_per_prompt,
                                                               config.prune_keep or config.sampling.samples_per_prompt)
        self.optimizer, self.scheduler = config.optim.build(
            ctx.policy, config.optim.steps_per_iteration(episodes) * total_iterations)
        self.settings = ActorSettings.from_configs(
            config.optim, config.actor, config.sampling.temperature, kl_aggregation=config.actor.aggregation,
            aggregation_constant=float(config.sampling.max_new_tokens))

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
        G = cfg.sampling.samples_per_prompt
        episodes, collection = ctx.collect_groups(problems, cfg.sampling.params(G, ctx.task.stop_strings), iteration,
                                                  timings)
        rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float32).view(len(episodes) // G, G)
        advantages = core.group_advantages(rewards, scale_by_std=cfg.scale_by_std)
        keep = list(range(len(episodes)))
        uniform = (rewards.max(dim=1).values == rewards.min(dim=1).values)
        if cfg.drop_uniform_groups:
            keep = [i for i in keep if not uniform[i // G]]
        if cfg.prune_keep is not None and cfg.prune_keep < G:
            keep = prune_completions(advantages, cfg.prune_keep, keep)
        t1 = time.perf_counter()
        flat = advantages.flatten().tolist()
        train_eps = [episodes[i] for i in keep]
        per_token = [[flat[i]] * len(episodes[i].response_ids) for i in keep]
        update: dict[str, float] = {"optimizer_steps": 0.0}
        schedule_start = self.scheduler.last_epoch
        if train_eps:
            ctx.observe_advantages(iteration, train_eps, per_token)
            update = actor_update(ctx.policy, ctx.reference, self.optimizer, self.scheduler, train_eps, per_token,
                                  self.settings, ctx.pad_token_id, ctx.generator, dist=ctx.dist)
            ctx.sampler.update_weights(ctx.policy)
        # this iteration's share of the schedule, whatever was dropped or skipped (module docstring)
        planned = cfg.optim.steps_per_iteration(len(problems) * min(G, cfg.prune_keep or G))
        advanced = planned - (self.scheduler.last_epoch - schedule_start)
        advance_schedule(self.scheduler, advanced)
        t2 = time.perf_counter()
        metrics = {**episode_metrics(episodes), **collection}
        metrics.update({
            "grpo/uniform_groups": float(uniform.float().mean()) if len(uniform) else 0.0,
            "grpo/trained_responses": float(len(train_eps)),
            "grpo/schedule_steps_skipped": float(max(advanced, 0)),
            "train/advantage_abs_mean": float(advantages.abs().mean()) if advantages.numel() else 0.0,
            "time/sampling": timings.get("generate", 0.0),
            "time/grading": timings.get("env", 0.0),
            "time/update": t2 - t1,
            "time/iteration": t2 - t0,
        })
        metrics["time/logprobs"] = update.pop("time_logprobs", 0.0)  # π_old / π_ref passes, part of time/update
        metrics.update({f"update/{k}": v for k, v in update.items()})
        metrics["update/lr"] = self.scheduler.get_last_lr()[0]
        return metrics
