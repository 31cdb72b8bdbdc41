"""The PPO actor update shared by VinePPO, PPO and the GRPO family.

Given episodes and per-token advantages, run ``epochs`` passes of shuffled mini-batches with the
clipped surrogate, a k3 KL penalty to the frozen reference in the loss, per-mini-batch advantage
whitening, gradient clipping and one optimiser step per mini-batch. This follows the trainer the
VinePPO paper used for both VinePPO and PPO (McGill-NLP/VinePPO, trainers/ppo_trainer.py):
``L = token_mean(ℓ_t) + β · mean_seqs(Σ_t clamp(k3_t, 0, 10))``; a mini-batch whose mean ratio
exceeds 10 is skipped.
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
def _logprobs(model, batch, temperature: float, micro: int) -> torch.Tensor:
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
        Means over optimiser steps of: loss, pg_loss, kl (k3 per token, nats), clip_frac, ratio,
        grad_norm, plus the number of optimiser steps and of skipped mini-batches.
    """
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], pad_token_id)
    batch["advantages"] = place_per_token(batch, advantages)
    policy.eval()
    batch["old_logp"] = _logprobs(policy, batch, settings.temperature, settings.micro_batch_size)
    batch["ref_logp"] = (
        _logprobs(reference, batch, settings.temperature, settings.micro_batch_size)
        if settings.kl_coef > 0 else batch["old_logp"].clone()
    )
    policy.train()
    stats: dict[str, list[float]] = {k: [] for k in ("loss", "pg_loss", "kl", "clip_frac", "ratio", "grad_norm")}
    skipped = 0
    n = len(episodes)
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator).tolist()
        for mb_rows in _chunks(order, settings.minibatch_size):
            mb = _select(batch, mb_rows)
            mask = mb["response_mask"].float()
            adv = core.masked_whiten(mb["advantages"], mask) if settings.whiten_advantages else mb["advantages"]
            n_tokens, n_seqs = mask.sum().clamp(min=1), len(mb_rows)
            optimizer.zero_grad(set_to_none=True)
            sums = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio": 0.0}
            for part in _chunks(list(range(n_seqs)), settings.micro_batch_size):
                sub = {k: v[part] for k, v in mb.items()}
                sub_mask, sub_adv = mask[part], adv[part]
                logp = response_logprobs(policy, sub, settings.temperature).float()
                pg, ratio, clipped = core.clipped_surrogate(logp, sub["old_logp"], sub_adv, settings.clip_eps)
                k3 = core.kl_estimate(logp, sub["ref_logp"], "k3").clamp(0.0, settings.kl_clamp)
                pg_sum = core.masked_sum(pg, sub_mask)
                kl_seq_sum = core.masked_sum(k3, sub_mask)
                loss = pg_sum / n_tokens + settings.kl_coef * kl_seq_sum / n_seqs
                loss.backward()
                sums["loss"] += loss.item()
                sums["pg_loss"] += pg_sum.item() / n_tokens.item()
                sums["kl"] += kl_seq_sum.item() / n_tokens.item()
                sums["clip_frac"] += core.masked_sum(clipped, sub_mask).item() / n_tokens.item()
                sums["ratio"] += core.masked_sum(ratio.detach(), sub_mask).item() / n_tokens.item()
            if not math.isfinite(sums["loss"]) or sums["ratio"] > settings.max_ratio:
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), settings.grad_clip)
            optimizer.step()
            scheduler.step()
            for name, value in sums.items():
                stats[name].append(value)
            stats["grad_norm"].append(float(grad_norm))
    policy.eval()
    out = {k: (sum(v) / len(v) if v else float("nan")) for k, v in stats.items()}
    out["optimizer_steps"] = float(len(stats["loss"]))
    out["skipped_minibatches"] = float(skipped)
    return out
