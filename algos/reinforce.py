"""REINFORCE with a moving-average baseline (Williams 1992, "Simple statistical gradient-following
algorithms", eq. 11 with a reinforcement baseline) — the worked example of adding an algorithm.

Every token of response i gets the advantage ``Â_i = R_i − b``, where the baseline ``b`` is an
exponential moving average of past iterations' mean rewards, updated after each iteration:
``b ← α b + (1 − α) mean(R)`` (``b`` starts at the first batch's mean). The loss is the registered
``unclipped`` policy loss ``−ρ Â`` (`algos.core.POLICY_LOSSES`); with one epoch of one mini-batch
ρ ≡ 1 and the gradient is REINFORCE's. Everything else — sampling, grading, the KL term, the
update, checkpoints — is the shared machinery.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from algos.actor import ActorSettings, actor_update
from algos.config import ActorConfig, OptimConfig, SamplingConfig, load_optimizer_state, optimizer_state, with_fields
from algos.models.sft import cpu_has_fast_bf16
from algos.rollout import collect_episodes, episode_metrics
from algos.training.checks import check_interval, check_types
from algos.training.context import TrainContext


@dataclass
class REINFORCEConfig:
    """REINFORCE settings; the defaults are one on-policy step per iteration on 64 x 8 samples."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=1, minibatch_size=512))
    actor: ActorConfig = field(default_factory=lambda: ActorConfig(
        policy_loss="unclipped", kl_coef=0.0, whiten_advantages=False, aggregation="seq_mean_token_sum"))
    baseline_decay: float = 0.9
    """α of the moving-average baseline, in [0, 1) (0: this batch's mean)."""

    def __post_init__(self) -> None:
        check_types(self)
        check_interval(self, "baseline_decay", 0, 1, high_open=True)

    @classmethod
    def cpu_tiny(cls) -> "REINFORCEConfig":
        return with_fields(cls(), prompts_per_iteration=8, samples_per_prompt=4, max_new_tokens=200,
                           minibatch_size=32, micro_batch_size=16, learning_rate=1e-5,
                           bf16_autocast=cpu_has_fast_bf16())


class REINFORCE:
    name = "reinforce"
    supports_distributed = True  # the baseline uses the global mean reward; actor_update is exact across ranks

    def __init__(self, config: REINFORCEConfig, ctx: TrainContext, total_iterations: int) -> None:
        self.config, self.ctx = config, ctx
        episodes = config.sampling.prompts_per_iteration * config.sampling.samples_per_prompt
        self.optimizer, self.scheduler = config.optim.build(
            ctx.policy, config.optim.steps_per_iteration(episodes) * total_iterations)
        self.settings = ActorSettings.from_configs(config.optim, config.actor, config.sampling.temperature)
        self.baseline: float | None = None

    def state_dict(self) -> dict:
        return {**optimizer_state(self.optimizer, self.scheduler, self.ctx.sharded), "baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(self.optimizer, self.scheduler, state)
        self.baseline = state["baseline"]

    def trainables(self) -> dict:
        """The trained modules and their optimisers, by name (sharded checkpoints, `algos.training.context`)."""
        return {"policy": (self.ctx.policy, self.optimizer)}

    def iteration(self, problems: Sequence, iteration: int) -> dict[str, float]:
        cfg, ctx = self.config, self.ctx
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        params = cfg.sampling.params(cfg.sampling.samples_per_prompt, ctx.task.stop_strings)
        episodes = collect_episodes(ctx.env, ctx.sampler, problems, params, seed=ctx.seed_for(iteration, "episodes"),
                                    timings=timings)
        t1 = time.perf_counter()
        total = ctx.dist.all_reduce_sum(torch.tensor([sum(e.reward for e in episodes), float(len(episodes))]))
        batch_mean = float(total[0] / total[1])
        baseline = batch_mean if self.baseline is None else self.baseline
        per_token = [[e.reward - baseline] * len(e.response_ids) for e in episodes]
        ctx.observe_advantages(iteration, episodes, per_token)
        update = actor_update(ctx.policy, ctx.reference, self.optimizer, self.scheduler, episodes, per_token,
                              self.settings, ctx.pad_token_id, ctx.generator, dist=ctx.dist)
        ctx.sampler.update_weights(ctx.policy)
        self.baseline = cfg.baseline_decay * baseline + (1 - cfg.baseline_decay) * batch_mean
        t2 = time.perf_counter()
        metrics = episode_metrics(episodes)
        metrics.update({"reinforce/baseline": baseline, "time/sampling": timings.get("generate", 0.0),
                        "time/grading": timings.get("env", 0.0), "time/update": t2 - t1, "time/iteration": t2 - t0,
                        "time/logprobs": update.pop("time_logprobs", 0.0), "update/lr": self.scheduler.get_last_lr()[0]})
        metrics.update({f"update/{k}": v for k, v in update.items()})
        return metrics
