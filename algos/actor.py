"""The PPO-style actor update shared by VinePPO, PPO, GRPO and RLOO.

Given episodes and per-token advantages, run ``epochs`` passes of shuffled mini-batches with the
clipped surrogate, a KL penalty to the frozen reference in the loss, optional per-mini-batch
advantage whitening, gradient clipping and one optimiser step per mini-batch. The defaults follow
the trainer the VinePPO paper used for both VinePPO and PPO (McGill-NLP/VinePPO,
trainers/ppo_trainer.py): ``L = token_mean(ℓ_t) + β · mean_seqs(Σ_t clamp(k3_t, 0, 10))``; a
mini-batch whose mean ratio exceeds 10 is skipped. GRPO sets both aggregations to its mode
(``seq_mean_token_mean`` originally: ``(1/G) Σ_i (1/|o_i|) Σ_t {ℓ + β k3}``, DeepSeekMath eq. 3).

A mini-batch whose loss or gradient norm is NaN or infinite is skipped (no optimiser step) and
counted in ``nonfinite_minibatches``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from algos import core
from algos.policy import batch_sequences, response_logprobs
from algos.rollout import Episode


@dataclass(frozen=True)
class ActorSettings:
    """Settings of the actor update (each algorithm's Config provides them)."""

    epochs: int
    minibatch_size: int  # episodes per optimiser step
    micro_batch_size: int  # episodes per forward/backward pass (gradient accumulation)
    clip_eps: float
    kl_coef: float
    temperature: float
    grad_clip: float
    whiten_advantages: bool = True
    max_ratio: float = 10.0
    kl_clamp: float = 10.0
    clip_eps_high: float | None = None  # ε_hi (DAPO clip-higher); None = clip_eps
    pg_aggregation: core.AggregationMode = "token_mean"
    kl_aggregation: core.AggregationMode = "seq_mean_token_sum"
    kl_estimator: str = "k3"
    aggregation_constant: float | None = None  # L_max for seq_sum_const (Dr. GRPO)


def place_per_token(batch: dict[str, torch.Tensor], values: Sequence[Sequence[float]]) -> torch.Tensor:
    """Scatter per-response-token values into a (B, L) tensor aligned with ``batch['response_mask']``.

    Raises:
        ValueError: if an episode's values do not have its response length.
    """
    mask = batch["response_mask"]
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for i, vals in enumerate(values):
        positions = mask[i].nonzero().flatten()
        if len(vals) != len(positions):
            raise ValueError(f"episode {i}: {len(vals)} values for {len(positions)} response tokens")
        out[i, positions] = torch.as_tensor(list(vals), dtype=torch.float32)
    return out


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def _select(batch: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    """Rows of a right-padded batch, trimmed to the longest selected sequence."""
    sub = {k: v[rows] for k, v in batch.items() if v.dim() == 2}
    width = int(sub["attention_mask"].sum(1).max())
    return {k: v[:, :width] for k, v in sub.items()}


@torch.no_grad()
def batch_logprobs(model, batch, temperature: float, micro: int) -> torch.Tensor:
    """Tempered log-probs of every response token of a padded batch, (B, L) float32, computed without
    gradient in micro-batches of ``micro`` rows (0 off the response mask)."""
    rows = list(range(batch["input_ids"].shape[0]))
    out = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
    for part in _chunks(rows, micro):
        sub = _select(batch, part)
        out[part, : sub["input_ids"].shape[1]] = response_logprobs(model, sub, temperature).float()
    return out


def actor_update(
    policy,
    reference,
    optimizer: torch.optim.Optimizer,
    scheduler,
    episodes: Sequence[Episode],
    advantages: Sequence[Sequence[float]],
    settings: ActorSettings,
    pad_token_id: int,
    generator: torch.Generator,
) -> dict[str, float]:
    """Run the PPO actor update on one iteration's episodes.

    Args:
        episodes: N episodes; their response tokens are trained on.
        advantages: N lists, one advantage per response token (before whitening).
        generator: RNG for mini-batch shuffling.
    Returns:
        Means over optimiser steps of: loss, pg_loss, kl (the estimator's per-token mean, nats;
        only when kl_coef > 0), clip_frac, ratio, grad_norm; plus the number of optimiser steps, of
        mini-batches skipped for a mean ratio above ``max_ratio``, and of non-finite ones.
    """
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], pad_token_id)
    batch["advantages"] = place_per_token(batch, advantages)
    policy.eval()
    batch["old_logp"] = batch_logprobs(policy, batch, settings.temperature, settings.micro_batch_size)
    batch["ref_logp"] = (
        batch_logprobs(reference, batch, settings.temperature, settings.micro_batch_size)
        if settings.kl_coef > 0 else batch["old_logp"].clone()
    )
    policy.train()
    stats: dict[str, list[float]] = {k: [] for k in ("loss", "pg_loss", "kl", "clip_frac", "ratio", "grad_norm")}
    skipped = nonfinite = 0
    n = len(episodes)
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator).tolist()
        for mb_rows in _chunks(order, settings.minibatch_size):
            mb = _select(batch, mb_rows)
            mask = mb["response_mask"].float()
            adv = core.masked_whiten(mb["advantages"], mask) if settings.whiten_advantages else mb["advantages"]
            n_tokens = mask.sum().clamp(min=1).item()
            pg_norm = core.aggregate_norm(mask, settings.pg_aggregation, settings.aggregation_constant)
            kl_norm = core.aggregate_norm(mask, settings.kl_aggregation, settings.aggregation_constant)
            optimizer.zero_grad(set_to_none=True)
            sums = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio": 0.0}
            for part in _chunks(list(range(len(mb_rows))), settings.micro_batch_size):
                sub = {k: v[part] for k, v in mb.items()}
                sub_mask, sub_adv = mask[part], adv[part]
                logp = response_logprobs(policy, sub, settings.temperature).float()
                pg, ratio, clipped = core.clipped_surrogate(logp, sub["old_logp"], sub_adv, settings.clip_eps,
                                                            settings.clip_eps_high)
                pg_term = core.aggregate_sum(pg, sub_mask, settings.pg_aggregation) / pg_norm
                loss = pg_term
                if settings.kl_coef > 0:
                    kl = core.kl_estimate(logp, sub["ref_logp"], settings.kl_estimator).clamp(-settings.kl_clamp, settings.kl_clamp)
                    loss = loss + settings.kl_coef * core.aggregate_sum(kl, sub_mask, settings.kl_aggregation) / kl_norm
                    sums["kl"] += core.masked_sum(kl.detach(), sub_mask).item() / n_tokens
                loss.backward()
                sums["loss"] += loss.item()
                sums["pg_loss"] += pg_term.item()
                sums["clip_frac"] += core.masked_sum(clipped, sub_mask).item() / n_tokens
                sums["ratio"] += core.masked_sum(ratio.detach(), sub_mask).item() / n_tokens
            if sums["ratio"] > settings.max_ratio:
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), settings.grad_clip)
            if not (math.isfinite(sums["loss"]) and math.isfinite(float(grad_norm))):
                optimizer.zero_grad(set_to_none=True)
                nonfinite += 1
                continue
            optimizer.step()
            scheduler.step()
            for name, value in sums.items():
                stats[name].append(value)
            stats["grad_norm"].append(float(grad_norm))
    policy.eval()
    out = {k: (sum(v) / len(v) if v else float("nan")) for k, v in stats.items()}
    out["optimizer_steps"] = float(len(stats["loss"]))
    out["skipped_minibatches"] = float(skipped)
    out["nonfinite_minibatches"] = float(nonfinite)
    if settings.kl_coef == 0:
        del out["kl"]
    return out
