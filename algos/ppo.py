"""PPO with a learned critic: the baseline of the VinePPO paper (Kazemnejad et al., arXiv 2410.01679).

Standard PPO for LLMs (Schulman et al. 2017, "Proximal Policy Optimization Algorithms") with GAE
(Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"),
set up as in McGill-NLP/VinePPO ``trainers/ppo_trainer.py`` and the ``polIter_*_ppo_*`` configs:

- **Critic.** A copy of the SFT policy's transformer backbone plus a new linear head H → 1 with
  weight ~ N(0, std = 1/√(H+1)) and bias 0 (``models/pretrained_with_value_head.py``). It has its
  own AdamW with the actor's settings (lr 1e-6, 3% warm-up then linear decay), stepped alongside
  the actor. ``V(s_t)``, the value of the state before response token t, is the head's output at
  position t − 1 of the full sequence; the value after the last token is 0.
- **Reward.** Per token, 0 except the last response token, which gets the outcome R ∈ {0, 1}. The
  KL to the reference is a k3 term in the actor's loss (β = 1e-4), not in the reward.
- **GAE** (`algos.core.gae`; `algos.core.decoupled_gae` with ``lam_critic`` / ``lam_adaptive_alpha``,
  VC-PPO's and VAPO's decoupled and length-adaptive λ), with the configs' γ = λ = 1 (the base trainer file's λ = 0.96 is
  overridden by ``lam1.jsonnet``)::

      δ_t = r_t + γ V(s_{t+1}) − V(s_t),   A_t = Σ_l (γλ)^l δ_{t+l},   G_t = A_t + V(s_t)

  so with γ = λ = 1, ``A_t = R − V(s_t)`` and ``G_t = R``. Returns are taken before the
  advantages are whitened (per mini-batch, inside the actor update).
- **Actor loss** (`algos.actor.actor_update`, shared with VinePPO): ``token_mean(ℓ_t) + β ·
  mean_seqs(Σ_t clamp(k3_t, 0, 10))`` with ``ℓ_t = −min(ρ_t A_t, clip(ρ_t, 1 ± ε) A_t)``, ε = 0.2.
- **Critic loss** (`algos.core.clipped_value_loss`)::

      L_V = ½ · token_mean( max((V − G)², (clip(V, V_old ± 0.2) − G)²) )

  over the same epochs (2) and mini-batches (64 episodes) as the actor.

Differences from the paper's code, none of which changes the maths:

- The paper's trainer interleaves one actor step and one critic step per mini-batch; here the
  actor's whole update runs first, then the critic's, over the *same* mini-batches (the critic
  replays the shuffle RNG's state). The two networks share no parameters and their targets
  (advantages, returns, ``V_old``) are fixed at the start of the iteration, so the result is the same.
- GAE is computed once per iteration over all episodes instead of inside each training step;
  per-episode, it gives the same numbers.
- The paper's ``vf_coef`` (0.1) is dropped: with a separate critic optimiser it is never read.
- A mini-batch whose critic loss or gradient norm is not finite is skipped and counted (as in
  `actor_update`); the paper relies on DeepSpeed's overflow check instead.
- The head is kept in the policy's dtype (the paper casts the hidden state to the head's dtype,
  which under bf16 DeepSpeed is also bf16); values are returned in float32.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from algos import core
from algos.actor import ActorSettings, actor_update
from algos.config import ActorConfig, OptimConfig, SamplingConfig, advance_schedule, with_fields
from algos.critic import CriticSettings, ValueModel, compute_values, critic_update, explained_variance, terminal_rewards
from algos.models.policy import batch_sequences
from algos.models.sft import cpu_has_fast_bf16
from algos.models.sharding import full_state_dict, is_sharded
from algos.rollout import episode_metrics
from algos.training.checks import check_finite, check_fraction, check_positive, check_types
from algos.training.context import TrainContext
from algos.value_pretraining import ValuePretrainConfig, pretrain_critic

__all__ = ["PPO", "PPOConfig"]


@dataclass
class PPOConfig:
    """PPO hyperparameters. Defaults are the paper's (McGill-NLP/VinePPO configs
    ``polIter_rho1bSft2_ppo_{MATH,GSM8K}``); `cpu_tiny` is the small CPU setting of the offline
    default model. ``optim`` drives the actor and the critic alike (epochs, mini-batches, schedule,
    clip), except the critic's learning rate."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Trajectories per iteration."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=2, minibatch_size=64))
    """AdamW, schedule and PPO epochs / mini-batches (actor and critic; micro_batch_size is also the
    batch of the critic's value pass)."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """The clipped surrogate, the k3 KL in the actor's loss and advantage whitening (returns are
    not whitened); bf16_autocast covers the critic's passes too."""
    critic_learning_rate: float = 1e-6
    """Critic AdamW learning rate (peak, after warm-up); same schedule as the actor's."""
    value_clip: float = 0.2
    """Clip range of the critic's value loss: V is clipped to V_old ± this."""
    gamma: float = 1.0
    """GAE discount γ."""
    lam: float = 1.0
    """GAE λ of the policy's advantages (the paper's PPO configs set 1; the base trainer file says
    0.96); also of the critic's targets unless lam_critic is set."""
    lam_critic: float | None = None
    """Decoupled GAE (VC-PPO, arXiv 2503.01491): λ of the critic's value targets (VC-PPO: 1.0) while
    ``lam`` drives the advantages (VC-PPO: 0.95); None: coupled, as PPO."""
    lam_adaptive_alpha: float | None = None
    """VAPO's length-adaptive λ of the advantages, 1 − 1/(α·l) per response of l tokens (arXiv
    2504.05118; α = 0.05), replacing ``lam``; None: off."""
    value_pretrain: ValuePretrainConfig = field(default_factory=ValuePretrainConfig)
    """VC-PPO's value pretraining before the first policy update (`algos.value_pretraining`); off by default."""

    def __post_init__(self) -> None:
        """Raises TypeError / ValueError naming ``PPOConfig.<field>`` (see `algos.training.checks`)."""
        check_types(self)
        check_finite(self)
        check_positive(self, ("critic_learning_rate", "value_clip"))
        check_fraction(self, "gamma", high_open=False)
        check_fraction(self, "lam", high_open=False)
        if self.lam_critic is not None:
            check_fraction(self, "lam_critic", high_open=False)
        if self.lam_adaptive_alpha is not None:
            check_positive(self, ("lam_adaptive_alpha",))

    @classmethod
    def cpu_tiny(cls) -> PPOConfig:
        """Small setting for the offline tiny model on a 2-core CPU (not the paper's); the same
        sizes as `VinePPOConfig.cpu_tiny`."""
        return with_fields(cls(), prompts_per_iteration=8, samples_per_prompt=4, max_new_tokens=200,
                           minibatch_size=16, micro_batch_size=16, learning_rate=1e-5, critic_learning_rate=1e-5,
                           bf16_autocast=cpu_has_fast_bf16())


class PPO:
    """PPO with a learned critic (GAE advantages) and the shared PPO actor update."""

    name = "ppo"
    supports_distributed = True  # actor_update shards the batch across processes (algos.training.distributed)
    supports_dynamic_sampling = True  # collects through ctx.collect_groups

    def __init__(self, config: PPOConfig, ctx: TrainContext, total_iterations: int) -> None:
        self.config = config
        self.ctx = ctx
        episodes = config.sampling.prompts_per_iteration * config.sampling.samples_per_prompt
        total_steps = config.optim.steps_per_iteration(episodes) * total_iterations
        self.optimizer, self.scheduler = config.optim.build(ctx.policy, total_steps)
        # the same head on every rank (a per-rank seed would give each data-parallel rank its own critic)
        head_rng = torch.Generator().manual_seed(ctx.seed_for(0, "critic_head", per_rank=False))
        self.critic = ctx.shard(ValueModel.from_policy(ctx.policy, generator=head_rng))
        self.critic.eval()
        self.critic_optimizer, self.critic_scheduler = dataclasses.replace(
            config.optim, learning_rate=config.critic_learning_rate).build(self.critic, total_steps)
        self.actor = ActorSettings.from_configs(config.optim, config.actor, config.sampling.temperature,
                                                kl_aggregation="seq_mean_token_sum")
        self.critic_settings = CriticSettings(
            epochs=config.optim.epochs, minibatch_size=config.optim.minibatch_size,
            micro_batch_size=config.optim.micro_batch_size, value_clip=config.value_clip,
            grad_clip=config.optim.grad_clip, bf16_autocast=config.actor.bf16_autocast,
        )
        self.value_pretraining_pending = config.value_pretrain.enabled  # done before the first iteration's sampling

    def state_dict(self) -> dict:
        """What a resumable checkpoint needs besides the policy: the critic, and the optimiser and
        LR-schedule states of actor and critic."""
        state = {"scheduler": self.scheduler.state_dict(), "critic_scheduler": self.critic_scheduler.state_dict(),
                 "value_pretraining_pending": self.value_pretraining_pending}
        if not self.ctx.sharded:  # sharded: models and optimisers are in the checkpoint's sharded/ (`trainables`)
            state.update({"optimizer": self.optimizer.state_dict(), "critic": self.critic.state_dict(),
                          "critic_optimizer": self.critic_optimizer.state_dict()})
        return state

    def load_state_dict(self, state: dict) -> None:
        if "critic" in state:
            self.critic.load_state_dict(state["critic"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.critic_scheduler.load_state_dict(state["critic_scheduler"])
        self.value_pretraining_pending = bool(state.get("value_pretraining_pending", False))  # older: past iteration 0

    def trainables(self) -> dict:
        """The trained modules and their optimisers, by name (sharded checkpoints, `algos.training.context`)."""
        return {"policy": (self.ctx.policy, self.optimizer), "critic": (self.critic, self.critic_optimizer)}

    def iteration(self, problems: Sequence, iteration: int) -> dict[str, float]:
        cfg, ctx = self.config, self.ctx
        timings: dict[str, float] = {}
        pretrain = {}
        if self.value_pretraining_pending:  # VC-PPO: fit the critic to the initial policy first
            pretrain = pretrain_critic(self.critic, ctx, cfg, self.critic_settings, ctx.cache_dir)
            self.value_pretraining_pending = False
        t0 = time.perf_counter()
        params = cfg.sampling.params(cfg.sampling.samples_per_prompt, ctx.task.stop_strings)
        episodes, collection = ctx.collect_groups(problems, params, iteration, timings)
        # this iteration's share of both schedules, also when dynamic sampling kept fewer groups (or none)
        planned = cfg.optim.steps_per_iteration(len(problems) * cfg.sampling.samples_per_prompt)
        schedule_start = (self.scheduler.last_epoch, self.critic_scheduler.last_epoch)
        if not episodes:
            advance_schedule(self.scheduler, planned)
            advance_schedule(self.critic_scheduler, planned)
            return {**episode_metrics(episodes), **collection, **pretrain, "update/optimizer_steps": 0.0,
                    "value/optimizer_steps": 0.0, "time/sampling": timings.get("generate", 0.0),
                    "time/grading": timings.get("env", 0.0), "time/iteration": time.perf_counter() - t0}
        t1 = time.perf_counter()
        batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], ctx.pad_token_id)
        mask = batch["response_mask"].float()
        old_values = compute_values(self.critic, batch, cfg.optim.micro_batch_size, cfg.actor.bf16_autocast)
        t2 = time.perf_counter()
        rewards = terminal_rewards(batch, [e.reward for e in episodes])
        lam_actor = cfg.lam if cfg.lam_adaptive_alpha is None else \
            core.length_adaptive_lambda(batch["response_mask"].sum(dim=1), cfg.lam_adaptive_alpha)
        lam_critic = cfg.lam if cfg.lam_critic is None else cfg.lam_critic
        advantages, returns = core.decoupled_gae(rewards, old_values, mask, cfg.gamma, lam_actor, lam_critic)
        per_episode = [advantages[i][batch["response_mask"][i]].tolist() for i in range(len(episodes))]
        t3 = time.perf_counter()
        ctx.observe_advantages(iteration, episodes, per_episode,
                               [old_values[i][batch["response_mask"][i]].tolist() for i in range(len(episodes))])
        # the critic replays the actor's shuffle, so both train on the same mini-batches
        shuffle_state = ctx.generator.get_state()
        update = actor_update(ctx.policy, ctx.reference, self.optimizer, self.scheduler, episodes, per_episode,
                              self.actor, ctx.pad_token_id, ctx.generator, dist=ctx.dist)
        critic_rng = torch.Generator()
        critic_rng.set_state(shuffle_state)
        value_update = critic_update(self.critic, self.critic_optimizer, self.critic_scheduler, batch, old_values,
                                     returns, self.critic_settings, critic_rng, dist=ctx.dist)
        ctx.sampler.update_weights(ctx.policy)
        advance_schedule(self.scheduler, planned - (self.scheduler.last_epoch - schedule_start[0]))
        advance_schedule(self.critic_scheduler, planned - (self.critic_scheduler.last_epoch - schedule_start[1]))
        t4 = time.perf_counter()

        n_tokens = max(float(mask.sum()), 1.0)
        metrics = {**episode_metrics(episodes), **collection}
        metrics.update({
            "train/advantage_mean": float(core.masked_sum(advantages, mask)) / n_tokens,
            "train/return_mean": float(core.masked_sum(returns, mask)) / n_tokens,
            "value/mean": float(core.masked_sum(old_values, mask)) / n_tokens,
            "value/explained_variance": explained_variance(old_values, returns, mask),
            "value/loss": value_update["loss"],
            "value/clip_frac": value_update["clip_frac"],
            "value/grad_norm": value_update["grad_norm"],
            "value/optimizer_steps": value_update["optimizer_steps"],
            "value/nonfinite_minibatches": value_update["nonfinite_minibatches"],
            "value/lr": self.critic_scheduler.get_last_lr()[0],
            "time/sampling": timings.get("generate", 0.0),
            "time/grading": timings.get("env", 0.0),
            "time/values": t2 - t1,
            "time/advantages": t3 - t2,
            "time/update": t4 - t3,
            "time/iteration": t4 - t0,
        })
        metrics["time/logprobs"] = update.pop("time_logprobs", 0.0)  # π_old / π_ref passes, part of time/update
        metrics.update({f"update/{k}": v for k, v in update.items()})
        metrics["update/lr"] = self.scheduler.get_last_lr()[0]
        return {**metrics, **pretrain}

    def save(self, path: Path) -> None:
        """Write the critic under ``path / "value_model"`` (see `ValueModel.save_pretrained`),
        through a temporary directory renamed into place. With a sharded critic every rank calls
        this (the weights are gathered, a collective) and rank 0 writes."""
        state = full_state_dict(self.critic) if is_sharded(self.critic) else None
        if state is not None and not self.ctx.dist.is_main:
            return
        target = Path(path) / "value_model"
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.critic.save_pretrained(tmp, state_dict=state)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
