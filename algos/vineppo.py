"""VinePPO (Kazemnejad et al., "VinePPO: Refining Credit Assignment in RL Training of LLMs",
arXiv 2410.01679, ICML 2025).

PPO with the value network replaced by Monte-Carlo value estimates. The language environment can
be restored to any prefix of a response, so from the prompt and from every reasoning-step
boundary we sample K continuations with the same sampler, grade them and average:

    V̂(s) = (1/K) Σ_k R(s ⊕ continuation_k),        V(s_n) := 0 after the last step,
    A_i  = r_i + V̂(s_{i+1}) − V̂(s_i)               (γ = 1; r_i = 0 except r_{n−1} = R),

and every token of step i gets A_i (the appended EOS gets the last step's). Identical prefixes
are estimated once (so V̂(s_0) is shared by a prompt's G samples). Past an optional step cap, values
are filled backwards with the realised return, giving those steps advantage 0. The update is the
shared PPO actor update (`algos.actor`) with advantage whitening and a k3 KL in the loss.

Where the paper's code and this file could differ, the code was followed
(McGill-NLP/VinePPO, episode_generators/math_episode_generator_with_mc_advantages.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from algos import core
from algos.actor import ActorSettings, actor_update
from algos.config import (ActorConfig, OptimConfig, SamplingConfig, advance_schedule, load_optimizer_state,
                          optimizer_state, with_fields)
from algos.models.sft import cpu_has_fast_bf16
from algos.rollout import Episode, StepLayout, episode_metrics, mc_values, step_layout
from algos.training.checks import check_non_negative, check_positive, check_types
from algos.training.context import TrainContext
from langenv.state import EnvState


@dataclass
class VinePPOConfig:
    """VinePPO hyperparameters. Defaults are the paper's (McGill-NLP/VinePPO configs
    ``polIter_rho1bSft2_vineppo_{MATH,GSM8K}``: 64 problems x 8 samples, K = 9, 2 epochs of
    mini-batch 64, lr 1e-6, k3 KL β 1e-4 in the loss); `cpu_tiny` is the small CPU setting of the
    offline default model."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Trajectories per iteration; the MC rollouts use the same temperature, top-p and budget."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=2, minibatch_size=64))
    """AdamW, schedule and PPO epochs / mini-batches over each iteration's episodes."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """The clipped surrogate, the k3 KL in the loss and per-mini-batch advantage whitening."""
    mc_rollouts: int = 9
    """K: Monte-Carlo continuations per state for V̂."""
    max_step_for_value_estimation: int | None = None
    """Only the first this many step boundaries get MC values (paper: 25 on GSM8K, none on MATH)."""

    def __post_init__(self) -> None:
        """Raises TypeError / ValueError naming ``VinePPOConfig.<field>`` (see `algos.training.checks`)."""
        check_types(self)
        check_positive(self, ("mc_rollouts",))
        check_non_negative(self, ("max_step_for_value_estimation",))

    @classmethod
    def cpu_tiny(cls) -> "VinePPOConfig":
        """Small setting for the offline tiny model on a 2-core CPU (not the paper's)."""
        return with_fields(cls(), prompts_per_iteration=8, samples_per_prompt=4, mc_rollouts=4,
                           max_step_for_value_estimation=25, max_new_tokens=200, minibatch_size=16,
                           micro_batch_size=16, learning_rate=1e-5, bf16_autocast=cpu_has_fast_bf16())


def token_advantages(layout: StepLayout, values: Sequence[float], reward: float) -> list[float]:
    """Per-token advantages of one response, shape (T,): every token gets its step's A_i
    (`algos.core.step_advantages`); a trailing EOS belongs to the last step."""
    step_adv = core.step_advantages(values, reward)
    return [step_adv[s] for s in layout.token_steps]


class VinePPO:
    """The VinePPO algorithm: MC value estimates from restored prefix states + the PPO actor update."""

    name = "vineppo"
    supports_distributed = True  # actor_update shards the batch across processes (algos.training.distributed)
    supports_dynamic_sampling = True  # collects through ctx.collect_groups

    def __init__(self, config: VinePPOConfig, ctx: TrainContext, total_iterations: int) -> None:
        self.config = config
        self.ctx = ctx
        episodes = config.sampling.prompts_per_iteration * config.sampling.samples_per_prompt
        self.optimizer, self.scheduler = config.optim.build(
            ctx.policy, config.optim.steps_per_iteration(episodes) * total_iterations)
        # the paper code's KL normalisation: a per-sequence token sum, averaged over sequences
        self.actor = ActorSettings.from_configs(config.optim, config.actor, config.sampling.temperature,
                                                kl_aggregation="seq_mean_token_sum")

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
        params = cfg.sampling.params(cfg.sampling.samples_per_prompt, ctx.task.stop_strings)
        episodes, collection = ctx.collect_groups(problems, params, iteration, timings)
        t1 = time.perf_counter()
        layouts = [step_layout(e, ctx.tokenizer, ctx.task.split_steps) for e in episodes]
        values, mc = self.estimate_values(episodes, layouts, iteration)
        t2 = time.perf_counter()
        advantages = [token_advantages(layout, v, e.reward) for e, layout, v in zip(episodes, layouts, values)]
        update: dict[str, float] = {"optimizer_steps": 0.0}
        schedule_start = self.scheduler.last_epoch
        if episodes:  # dynamic sampling may keep no group
            ctx.observe_advantages(iteration, episodes, advantages)
            update = actor_update(ctx.policy, ctx.reference, self.optimizer, self.scheduler, episodes, advantages,
                                  self.actor, ctx.pad_token_id, ctx.generator, dist=ctx.dist)
            ctx.sampler.update_weights(ctx.policy)
        # this iteration's share of the schedule even when dynamic sampling kept fewer groups
        planned = cfg.optim.steps_per_iteration(len(problems) * cfg.sampling.samples_per_prompt)
        advance_schedule(self.scheduler, planned - (self.scheduler.last_epoch - schedule_start))
        t3 = time.perf_counter()
        n_steps = [len(l.boundaries) for l in layouts]
        flat_adv = [a for adv in advantages for a in adv]
        metrics = {**episode_metrics(episodes), **collection}
        metrics.update({
            "train/steps_per_response": sum(n_steps) / max(len(n_steps), 1),
            "train/value_s0": sum(v[0] for v in values) / max(len(values), 1),
            "train/advantage_mean": sum(flat_adv) / max(len(flat_adv), 1),
            "vineppo/unique_states": mc["unique_states"],
            "vineppo/value_requests": mc["requests"],
            "vineppo/mc_rollouts": mc["rollouts"],
            "tokens/mc_rollouts": mc["tokens"],
            "time/sampling": timings.get("generate", 0.0),
            "time/mc_rollouts": mc["generate"],
            "time/grading": timings.get("env", 0.0) + mc["env"],
            "time/update": t3 - t2,
            "time/advantages": (t2 - t1) - mc["generate"] - mc["env"],
            "time/iteration": t3 - t0,
        })
        metrics["time/logprobs"] = update.pop("time_logprobs", 0.0)  # π_old / π_ref passes, part of time/update
        metrics.update({f"update/{k}": v for k, v in update.items()})
        metrics["update/lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def estimate_values(self, episodes: Sequence[Episode], layouts: Sequence[StepLayout], iteration: int):
        """V̂ for the state at the start of every step of every episode.

        Returns:
            (values, stats): values[j][i] = V̂(s_i) of episode j (len = its number of steps);
            stats counts requests, unique states, rollouts, tokens and seconds.
        """
        cfg, ctx = self.config, self.ctx
        cap = cfg.max_step_for_value_estimation
        requests: list[list[EnvState | None]] = []
        unique: dict[tuple[int, ...], EnvState] = {}
        for e, layout in zip(episodes, layouts):
            row = []
            for i, b in enumerate(layout.boundaries):
                if cap is not None and i > cap:
                    row.append(None)
                    continue
                state = e.state.prefix(b)
                unique.setdefault(state.token_ids, state)
                row.append(state)
            requests.append(row)
        states = list(unique.values())
        timings: dict[str, float] = {}
        params = cfg.sampling.params(cfg.mc_rollouts, ctx.task.stop_strings)
        value_of, tokens = mc_values(ctx.env, ctx.sampler, states, params, seed=ctx.seed_for(iteration, "mc"),
                                     timings=timings)
        values = []
        for e, row in zip(episodes, requests):
            v = [value_of[s.token_ids] if s is not None else None for s in row]
            for i in range(len(v) - 1, -1, -1):  # past the cap: the realised return (r_i = 0 before the end)
                if v[i] is None:
                    v[i] = e.reward
            values.append(v)
        stats = {"requests": float(sum(len([s for s in r if s is not None]) for r in requests)),
                 "unique_states": float(len(states)), "rollouts": float(len(states) * cfg.mc_rollouts),
                 "tokens": float(tokens), "generate": timings.get("generate", 0.0), "env": timings.get("env", 0.0)}
        return values, stats
