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

import copy
import dataclasses
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoModel

from algos import core
from algos.actor import ActorSettings, actor_update
from algos.config import ActorConfig, OptimConfig, SamplingConfig, with_fields
from algos.models.policy import batch_sequences
from algos.models.sft import cpu_has_fast_bf16
from algos.models.sharding import copy_full_weights, full_state_dict, grad_norm_clip, is_sharded
from algos.rollout import collect_episodes, episode_metrics
from algos.training.checks import check_finite, check_fraction, check_positive, check_types
from algos.training.context import TrainContext
from algos.value_pretraining import ValuePretrainConfig, pretrain_critic

__all__ = ["PPO", "CriticSettings", "PPOConfig", "ValueModel", "compute_values", "critic_update", "explained_variance",
           "terminal_rewards"]

VALUE_HEAD_FILE = "value_head.safetensors"


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


class ValueModel(torch.nn.Module):
    """The critic: a transformer backbone (no LM head) and a linear value head H → 1.

    Build it from a policy with `from_policy` (a deep copy of the policy's backbone, so it starts
    from the SFT weights), or reload one written by `save_pretrained` with `from_pretrained`.

    Attributes:
        backbone: the decoder stack (e.g. ``LlamaModel``) returning ``last_hidden_state``.
        head: ``Linear(hidden_size, 1)``.
    """

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear | None = None,
                 generator: torch.Generator | None = None) -> None:
        """Args:
            backbone: the transformer body; it must have ``config.hidden_size``.
            head: an existing head (e.g. loaded); None creates one with weight ~ N(0, 1/√(H+1))
                and bias 0, drawn from ``generator`` (torch's global RNG if None).
        """
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        param = next(backbone.parameters())
        new = head is None
        head = torch.nn.Linear(int(self.config.hidden_size), 1, bias=True) if new else head
        self.head = head.to(device=param.device, dtype=param.dtype)
        if new:
            self.reset_head(generator)

    def reset_head(self, generator: torch.Generator | None = None) -> None:
        """Re-draw the head: weight ~ N(0, 1/√(H+1)) drawn in float32 on the CPU from ``generator``
        (torch's global RNG if None), bias 0."""
        hidden = self.head.weight.shape[1]
        with torch.no_grad():
            self.head.weight.copy_(torch.empty(1, hidden).normal_(0.0, 1.0 / math.sqrt(hidden + 1), generator=generator))
            self.head.bias.zero_()

    @classmethod
    def from_policy(cls, policy, generator: torch.Generator | None = None) -> ValueModel:
        """A critic whose backbone is a deep copy of ``policy``'s (``get_decoder()``, e.g. the
        ``LlamaModel`` of a ``LlamaForCausalLM``), on the policy's device and dtype, trainable. From
        an FSDP2-sharded policy the backbone is built from its config and the full weights are
        gathered into it (a collective: every rank calls this); the critic is unsharded either way."""
        decoder = policy.get_decoder() if hasattr(policy, "get_decoder") else policy.base_model
        if decoder is policy:
            raise ValueError(f"could not find the backbone of {type(policy).__name__}: get_decoder() returned the model")
        if is_sharded(policy):  # FSDP2 shards: a fresh unsharded backbone, filled with the gathered weights
            param = next(decoder.parameters())
            backbone = AutoModel.from_config(decoder.config, dtype=param.dtype).to(param.device)
            copy_full_weights(backbone, decoder)  # collective
        else:
            backbone = copy.deepcopy(decoder)
        critic = cls(backbone, generator=generator)
        critic.requires_grad_(True)
        critic.train(policy.training)
        return critic

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The head's output at every position: ``values[b, p]`` is the value of the state made of
        tokens ``0..p`` (it has read token p).

        Args:
            input_ids, attention_mask: (B, T), left or right padded (positions follow the mask).
        Returns:
            (B, T) float32; padding positions hold meaningless numbers (mask them).
        """
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def response_values(self, batch: dict[str, Tensor]) -> Tensor:
        """V(s_t) for every response token t of a `batch_sequences` batch: the value of the state
        *before* token t, read at position t − 1 (the same alignment as `response_logprobs`, whose
        log-prob at position t is predicted from position t − 1).

        Returns:
            (B, L) float32 on the critic's device, 0 outside ``response_mask``.
        """
        values = self(batch["input_ids"], batch["attention_mask"])
        shifted = torch.cat([values.new_zeros(values.shape[0], 1), values[:, :-1]], dim=1)
        return shifted * batch["response_mask"].to(shifted.device)

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write the backbone in Hugging Face format (``config.json`` + weights) and the head as
        ``value_head.safetensors`` into the directory ``path``.

        ``state_dict``: the critic's full weights (``backbone.*`` and ``head.*`` names), e.g. the
        `algos.models.sharding.full_state_dict` of a sharded critic; default: its own."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            self.backbone.save_pretrained(path)
            head = self.head.state_dict()
        else:
            self.backbone.save_pretrained(path, state_dict={k[len("backbone."):]: v for k, v in state_dict.items()
                                                            if k.startswith("backbone.")})
            head = {k[len("head."):]: v for k, v in state_dict.items() if k.startswith("head.")}
        save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, str(path / VALUE_HEAD_FILE))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | str = "auto",
                        device: str | torch.device = "cpu") -> ValueModel:
        """Load a critic written by `save_pretrained` (local directory only, no hub lookup).

        Raises:
            FileNotFoundError: ``path`` has no ``value_head.safetensors``.
        """
        path = Path(path)
        head_file = path / VALUE_HEAD_FILE
        if not head_file.is_file():
            raise FileNotFoundError(f"no {VALUE_HEAD_FILE} in {path}; expected a directory written by ValueModel.save_pretrained")
        backbone = AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=True).to(device)
        state = load_file(str(head_file))
        head = torch.nn.Linear(state["weight"].shape[1], 1, bias=True)
        head.load_state_dict(state)
        return cls(backbone, head=head)


def terminal_rewards(batch: dict[str, Tensor], rewards: Sequence[float]) -> Tensor:
    """Per-token rewards: 0 everywhere except each response's last token, which gets its R.

    Args:
        batch: a right-padded `batch_sequences` batch of B episodes.
        rewards: B outcome rewards.
    Returns:
        (B, L) float32; an empty response gets no reward (it has no token).
    """
    mask = batch["response_mask"]
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for i, r in enumerate(rewards):
        n = int(batch["response_lengths"][i])
        if n > 0:
            out[i, int(batch["prompt_lengths"][i]) + n - 1] = float(r)
    return out


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 − Var(G − V) / Var(G)`` over the masked tokens (1 is perfect, 0 no better than a
    constant, < 0 worse). Returns 0.0 when Var(G) = 0 (e.g. every reward equal), where it is
    undefined."""
    m = mask.bool()
    g, v = returns[m].double(), values[m].double()
    if g.numel() < 2:
        return 0.0
    var_g = float(g.var())
    if var_g <= 1e-12:
        return 0.0
    return 1.0 - float((g - v).var()) / var_g


@dataclass(frozen=True)
class CriticSettings:
    """Settings of the critic update (from `PPOConfig`)."""

    epochs: int
    minibatch_size: int
    micro_batch_size: int
    value_clip: float
    grad_clip: float
    bf16_autocast: bool = False  # critic forward passes under bf16 autocast (weights and loss stay float32)


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def _rows(batch: dict[str, Tensor], rows: list[int]) -> dict[str, Tensor]:
    """Rows of a right-padded batch, trimmed to the longest selected sequence."""
    sub = {k: v[rows] for k, v in batch.items() if v.dim() == 2}
    width = max(int(sub["attention_mask"].sum(1).max()), 1)
    return {k: v[:, :width] for k, v in sub.items()}


@torch.no_grad()
def compute_values(critic: ValueModel, batch: dict[str, Tensor], micro_batch_size: int,
                   bf16_autocast: bool = False) -> Tensor:
    """V(s_t) for every response token of a right-padded batch, without gradient, in micro-batches of
    ``micro_batch_size`` length-sorted rows (`algos.actor.micro_batch_rows`), each trimmed to its
    longest row.

    Returns:
        (B, L) float32 on the CPU, 0 outside ``response_mask``, in the input's row order.
    """
    from algos.actor import _precision, micro_batch_rows

    was_training = critic.training
    critic.eval()
    out = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
    for part in micro_batch_rows(batch["attention_mask"], micro_batch_size):
        sub = _rows(batch, part)
        with _precision(critic.device, bf16_autocast):
            values = critic.response_values(sub)
        out[part, : sub["input_ids"].shape[1]] = values.float().cpu()
    critic.train(was_training)
    return out


def critic_update(
    critic: ValueModel,
    optimizer: torch.optim.Optimizer,
    scheduler,
    batch: dict[str, Tensor],
    old_values: Tensor,
    returns: Tensor,
    settings: CriticSettings,
    generator: torch.Generator,
    *,
    dist=None,
) -> dict[str, float]:
    """Fit the critic to the returns: ``epochs`` passes of shuffled mini-batches, each one optimiser
    step on ``½ · token_mean(max((V − G)², (clip(V, V_old ± c) − G)²))``.

    Micro-batches are length-sorted and trimmed (`algos.actor.micro_batch_rows`); each adds its
    masked sum over the mini-batch's token count, so the gradient does not depend on the split.

    Args:
        batch: a right-padded `batch_sequences` batch of the N episodes (this rank's shard).
        old_values, returns: (N, L) V_old(s_t) and G_t on the response tokens (0 elsewhere).
        generator: RNG for the mini-batch shuffle (one ``randperm(N)`` per epoch, as `actor_update`).
        dist: an `algos.training.distributed.Dist`; None (or world size 1) is a single process. As in
            `algos.actor.actor_update`: ``minibatch_size`` is global (``minibatch_size // world``
            episodes per rank and step), the token count of the mini-batch and the logged sums are
            reduced over ranks and gradients summed before clipping, so the update equals a
            single-process one on the concatenated batch up to float summation order.
    Returns:
        Means over optimiser steps of loss, clip_frac (fraction of tokens where the clipped term is
        the larger) and grad_norm; the number of optimiser steps, of mini-batches skipped for a
        non-finite loss or gradient norm, and of those in a row at the end (``nonfinite_trailing``).
    Raises:
        ValueError: ranks whose episode counts give different numbers of mini-batches, or a global
            mini-batch size not divisible by the world size (`algos.actor.check_step_counts`).
    """
    from algos.actor import _precision, check_step_counts, micro_batch_rows

    multi = dist is not None and dist.world_size > 1
    n = batch["input_ids"].shape[0]
    local_mb = check_step_counts(n, settings.minibatch_size, dist)
    data = dict(batch)
    data["old_values"], data["returns"] = old_values.float(), returns.float()
    stats: dict[str, list[float]] = {"loss": [], "clip_frac": [], "grad_norm": []}
    nonfinite = trailing = 0
    device = critic.device
    critic.train()
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator).tolist()
        for mb_rows in _chunks(order, local_mb):
            mb = _rows(data, mb_rows)
            n_tok = torch.tensor([float(mb["response_mask"].sum())], dtype=torch.float64)
            n_tokens = max(float(dist.all_reduce_sum(n_tok)[0] if multi else n_tok[0]), 1.0)
            optimizer.zero_grad(set_to_none=True)
            acc = torch.zeros(2, dtype=torch.float64, device=device)  # Σ loss share, Σ clipped tokens
            for part in micro_batch_rows(mb["attention_mask"], settings.micro_batch_size):
                sub = {k: v.to(device) for k, v in _rows(mb, part).items()}
                mask = sub["response_mask"].float()
                with _precision(critic.device, settings.bf16_autocast):
                    values = critic.response_values(sub).float()
                old, ret = sub["old_values"], sub["returns"]
                per_token = core.clipped_value_loss(values, old, ret, settings.value_clip)
                loss = core.masked_sum(per_token, mask) / n_tokens
                loss.backward()
                with torch.no_grad():
                    clipped = old + torch.clamp(values - old, -settings.value_clip, settings.value_clip)
                    frac = ((clipped - ret) ** 2 > (values - ret) ** 2).float()
                    acc += torch.stack([loss.detach(), core.masked_sum(frac, mask)]).double()
            if multi:
                acc = dist.all_reduce_sum(acc)
            loss_sum, clip_count = acc.tolist()
            if multi:
                dist.all_reduce_grads(critic)
            grad_norm = grad_norm_clip(critic.parameters(), settings.grad_clip)  # global when sharded
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                nonfinite += 1
                trailing += 1
                continue
            optimizer.step()
            scheduler.step()
            trailing = 0
            stats["loss"].append(loss_sum)
            stats["clip_frac"].append(clip_count / n_tokens)
            stats["grad_norm"].append(grad_norm)
    critic.eval()
    out = {k: (sum(v) / len(v) if v else float("nan")) for k, v in stats.items()}
    out["optimizer_steps"] = float(len(stats["loss"]))
    out["nonfinite_minibatches"] = float(nonfinite)
    out["nonfinite_trailing"] = float(trailing)
    return out


class PPO:
    """PPO with a learned critic (GAE advantages) and the shared PPO actor update."""

    name = "ppo"
    supports_distributed = True  # actor_update shards the batch across processes (algos.training.distributed)

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
        episodes = collect_episodes(ctx.env, ctx.sampler, problems, params, seed=ctx.seed_for(iteration, "episodes"),
                                    timings=timings)
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
        t4 = time.perf_counter()

        n_tokens = max(float(mask.sum()), 1.0)
        metrics = episode_metrics(episodes)
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
