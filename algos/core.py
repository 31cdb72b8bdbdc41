"""Pure tensor maths shared by the algorithms.

Shapes: ``(B, T)`` is a batch of B sequences of T positions; ``mask`` is a (B, T) tensor of 0/1
marking the response tokens that count. Log-probabilities are in nats.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AggregationMode = Literal["token_mean", "seq_mean_token_mean", "seq_sum_const", "seq_mean_token_sum"]


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x * mask`` over ``dim`` (all dims if None)."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1; 0 where the mask is empty."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8, shift_mean: bool = True) -> Tensor:
    """Whiten ``x`` over the masked positions: (x - mean) / std, unbiased variance.

    The token-weighted statistics over all masked positions of the batch follow the VinePPO code
    (McGill-NLP/VinePPO, trainers/ppo_trainer.py, ``masked_whiten``). Unmasked positions are 0.
    With fewer than two masked positions the input is only centred.

    Args:
        x: (B, T) values, e.g. advantages.
        mask: (B, T) 0/1.
    Returns:
        (B, T) whitened values.
    """
    n = mask.sum()
    mean = masked_mean(x, mask)
    if n < 2:
        out = x - mean if shift_mean else x
        return out * mask
    var = masked_sum((x - mean) ** 2, mask) / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: Literal["k1", "k2", "k3"] = "k3") -> Tensor:
    """Per-token estimator of KL(π‖π_ref) from samples of π (Schulman 2020, "Approximating KL").

    With ``log r = ref_logp − logp``:
        k1 = −log r (unbiased, high variance, can be negative),
        k2 = ½ (log r)² (biased, ≥ 0),
        k3 = (r − 1) − log r (unbiased, ≥ 0; the estimator GRPO and VinePPO put in the loss).

    Args:
        logp, ref_logp: (B, T) log-probs of the sampled tokens under the policy and the reference.
    Returns:
        (B, T) estimates in nats.
    """
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kind: expected 'k1', 'k2' or 'k3', got {kind!r}")


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float = 0.2, clip_high: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped policy-gradient loss per token (Schulman et al. 2017, eq. 7).

    ``ℓ_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε_lo, 1 + ε_hi) A_t)`` with ``ρ_t = exp(logp − old_logp)``.
    The gradient is zero where the clipped branch is the minimum (A > 0 and ρ > 1 + ε_hi, or
    A < 0 and ρ < 1 − ε_lo).

    Args:
        logp: (B, T) current log-probs (with grad); old_logp, advantages: (B, T), no grad needed.
        clip_low, clip_high: ε_lo and ε_hi (ε_hi defaults to ε_lo; DAPO's clip-higher sets 0.28).
    Returns:
        (loss, ratio, clipped): (B, T) per-token loss, ratio ρ, and a 0/1 float of where clipping was active.
    """
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, ratio, (clipped < unclipped).float()


def aggregate(loss: Tensor, mask: Tensor, mode: AggregationMode = "token_mean", constant: float | None = None) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    Modes (reference/algorithms.md §0):
        token_mean: Σ_i Σ_t ℓ / Σ_i T_i (VinePPO, PPO, DAPO);
        seq_mean_token_mean: (1/B) Σ_i (1/T_i) Σ_t ℓ (original GRPO);
        seq_sum_const: Σ_i Σ_t ℓ / (B · constant), constant = L_max (Dr. GRPO);
        seq_mean_token_sum: (1/B) Σ_i Σ_t ℓ (REINFORCE / RLOO on sequence log-probs).

    Raises:
        ValueError: unknown mode, or seq_sum_const without a positive constant.
    """
    if mode == "token_mean":
        return masked_mean(loss, mask)
    if mode == "seq_mean_token_mean":
        return masked_mean(loss, mask, dim=1).mean()
    if mode == "seq_sum_const":
        if not constant or constant <= 0:
            raise ValueError(f"seq_sum_const needs a positive constant (L_max), got {constant}")
        return masked_sum(loss, mask) / (loss.shape[0] * constant)
    if mode == "seq_mean_token_sum":
        return masked_sum(loss, mask, dim=1).mean()
    raise ValueError(f"mode: expected one of {AggregationMode.__args__}, got {mode!r}")
