"""Pure tensor maths shared by the algorithms.

Shapes: ``(B, T)`` is a batch of B sequences of T positions; ``mask`` is a (B, T) tensor of 0/1
marking the response tokens that count. Log-probabilities are in nats.

Advantage estimators and policy-gradient losses that several algorithms can share are registered by
name (in the manner of verl's ``trainer/ppo/core_algos.py``), so a new one is a function plus a
decorator line:

* `ADVANTAGE_ESTIMATORS`: ``gae`` (PPO), ``group`` (GRPO), ``leave_one_out`` (RLOO), ``step_mc``
  (VinePPO's step advantages from Monte-Carlo values). Their signatures differ with what they
  estimate from (values, group rewards, step values), so they are looked up by the algorithm that
  knows its inputs, or listed for documentation and tests.
* `POLICY_LOSSES`: per-token losses ``fn(logp, old_logp, advantages, clip_low, clip_high) ->
  (loss, ratio, clipped)``, all (B, T); `algos.actor.actor_update` calls the one named by
  ``ActorConfig.policy_loss``: ``clip`` (PPO's clipped surrogate; clip-higher with ``clip_high``)
  and ``unclipped`` (the importance-weighted policy gradient, REINFORCE when on-policy).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

AggregationMode = Literal["token_mean", "seq_mean_token_mean", "seq_sum_const", "seq_mean_token_sum"]

#: Advantage estimators by name (see the module docstring).
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., object]] = {}
#: Per-token policy-gradient losses by name, ``fn(logp, old_logp, advantages, clip_low, clip_high)
#: -> (loss, ratio, clipped)``.
POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, Tensor, Tensor]]] = {}


def register_advantage_estimator(name: str):
    """Decorator: register an advantage estimator under ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """
    def add(fn):
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered ({ADVANTAGE_ESTIMATORS[name]})")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn
    return add


def register_policy_loss(name: str):
    """Decorator: register a per-token policy-gradient loss under ``name`` (signature in the module
    docstring).

    Raises:
        ValueError: ``name`` is already registered.
    """
    def add(fn):
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered ({POLICY_LOSSES[name]})")
        POLICY_LOSSES[name] = fn
        return fn
    return add


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


@register_policy_loss("clip")
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


@register_policy_loss("unclipped")
def unclipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float = 0.2, clip_high: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The importance-weighted policy gradient without clipping: ``ℓ_t = −ρ_t A_t``, ``ρ_t =
    exp(logp − old_logp)``. On-policy (ρ ≡ 1, one pass) its gradient is REINFORCE's, ``−A_t ∇log
    π(y_t)`` (Williams 1992). ``clip_low``/``clip_high`` are accepted for a common signature and
    ignored; ``clipped`` is all zeros.

    Returns:
        (loss, ratio, clipped): (B, T) each.
    """
    ratio = torch.exp(logp - old_logp)
    return -ratio * advantages, ratio, torch.zeros_like(ratio)


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


def aggregate_sum(loss: Tensor, mask: Tensor, mode: AggregationMode, constant: float | None = None) -> Tensor:
    """The numerator of `aggregate` for a slice of a mini-batch, so that micro-batches can be
    accumulated: ``aggregate(loss, mask) == Σ_parts aggregate_sum(part) / aggregate_norm(whole)``.

    token_mean, seq_sum_const and seq_mean_token_sum sum masked tokens (per-sequence sums);
    seq_mean_token_mean sums each sequence's token mean.
    """
    if mode == "seq_mean_token_mean":
        return masked_mean(loss, mask, dim=1).sum()
    if mode in ("token_mean", "seq_sum_const", "seq_mean_token_sum"):
        return masked_sum(loss, mask)
    raise ValueError(f"mode: expected one of {AggregationMode.__args__}, got {mode!r}")


def aggregate_norm(mask: Tensor, mode: AggregationMode, constant: float | None = None) -> float:
    """The denominator of `aggregate` for a whole (mini-)batch with ``mask`` (B, T): the number of
    masked tokens (token_mean), B (seq_mean_*), or B · constant (seq_sum_const).

    Raises:
        ValueError: unknown mode, or seq_sum_const without a positive constant.
    """
    if mode == "token_mean":
        return max(float(mask.sum()), 1.0)
    if mode in ("seq_mean_token_mean", "seq_mean_token_sum"):
        return float(mask.shape[0])
    if mode == "seq_sum_const":
        if not constant or constant <= 0:
            raise ValueError(f"seq_sum_const needs a positive constant (L_max), got {constant}")
        return float(mask.shape[0] * constant)
    raise ValueError(f"mode: expected one of {AggregationMode.__args__}, got {mode!r}")


@register_advantage_estimator("gae")
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
    Using GAE", eq. 16) over right-padded token sequences.

    ``δ_t = r_t + γ V(s_{t+1}) − V(s_t)`` with ``V = 0`` after the last masked position, and
    ``A_t = Σ_l (γλ)^l δ_{t+l}``; value targets ``G_t = A_t + V(s_t)`` (before any whitening), as in
    McGill-NLP/VinePPO trainers/ppo_trainer.py. With γ = λ = 1 and a terminal-only reward R,
    ``A_t = R − V(s_t)`` and ``G_t = R``.

    Args:
        rewards: (B, T) per-token rewards (0 off the mask).
        values: (B, T) V(s_t), the value of the state before token t.
        mask: (B, T) 0/1, 1 on response tokens; each row's ones must be contiguous.
        lam: λ, a float or a (B,) tensor of one λ per sequence (VAPO's length-adaptive λ).
    Returns:
        (advantages, returns): (B, T) each, 0 off the mask.
    """
    rewards, values, mask = rewards.float() * mask, values.float() * mask, mask.float()
    if isinstance(lam, Tensor):
        lam = lam.float().to(rewards.device).reshape(-1)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in range(rewards.shape[1] - 1, -1, -1):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


@register_advantage_estimator("decoupled_gae")
def decoupled_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
                  lam_actor: float | Tensor = 0.95, lam_critic: float = 1.0) -> tuple[Tensor, Tensor]:
    """GAE with one λ for the policy's advantages and another for the critic's targets (VC-PPO,
    Yuan et al. 2025, arXiv 2503.01491 §4.2; VAPO, Yue et al. 2025, arXiv 2504.05118 §3.2): the
    critic learns unbiased Monte-Carlo-like targets with λ_critic = 1 while the policy gets the
    lower-variance λ_actor advantages.

    ``advantages = GAE(λ_actor).A``, ``returns = GAE(λ_critic).A + V``. With λ_actor = λ_critic it is
    `gae`.

    Args:
        rewards, values, mask: as `gae`, (B, T).
        lam_actor: a float, or (B,) per-sequence values (`length_adaptive_lambda`).
        lam_critic: λ of the value targets.
    Returns:
        (advantages, returns): (B, T) each, 0 off the mask.
    """
    advantages, _ = gae(rewards, values, mask, gamma, lam_actor)
    _, returns = gae(rewards, values, mask, gamma, lam_critic)
    return advantages, returns


def length_adaptive_lambda(lengths: Tensor, alpha: float = 0.05) -> Tensor:
    """VAPO's length-adaptive λ_actor = 1 − 1 / (α · l) per sequence of l response tokens (Yue et al.
    2025, arXiv 2504.05118, eq. 8; α = 0.05), clamped to [0, 1] (sequences shorter than 1/α get 0).

    Args:
        lengths: (B,) response lengths in tokens.
    Returns:
        (B,) float λ values.
    """
    lengths = lengths.float().clamp(min=1.0)
    return (1.0 - 1.0 / (alpha * lengths)).clamp(0.0, 1.0)


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float) -> Tensor:
    """PPO's clipped value loss per token: ``½ · max((V − G)², (clip(V, V_old ± c) − G)²)``
    (McGill-NLP/VinePPO trainers/ppo_trainer.py; OpenAI baselines ppo2). Shapes (B, T)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


@register_advantage_estimator("group")
def group_advantages(rewards: Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO's outcome advantage per sequence (Shao et al. 2024, DeepSeekMath §4.1.2):
    ``Â_i = (r_i − mean(r)) / (std(r) + eps)`` within each group, with the unbiased std (verl
    ``compute_grpo_outcome_advantage``, eps 1e-6). ``scale_by_std=False`` is Dr. GRPO's
    ``r_i − mean(r)`` (Liu et al. 2025, arXiv 2503.20783). A group with equal rewards gets 0.

    Args:
        rewards: (N, G) rewards of N groups of G samples.
    Returns:
        (N, G) advantages.
    """
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std or rewards.shape[1] < 2:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


@register_advantage_estimator("leave_one_out")
def leave_one_out_advantages(rewards: Tensor) -> Tensor:
    """RLOO's advantage (Ahmadian et al. 2024, "Back to Basics", eq. 6): each sample's reward minus
    the mean of the other k − 1 rewards of its group, ``A_i = R_i − (1/(k−1)) Σ_{j≠i} R_j
    = k/(k−1) · (R_i − R̄)``. Sums to 0 within a group.

    Args:
        rewards: (N, k) rewards, k >= 2.
    Raises:
        ValueError: if k < 2 (no baseline).
    """
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"leave-one-out needs at least 2 samples per group, got {k}")
    rewards = rewards.float()
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return rewards - baseline


def dpo_positive_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                      beta: float, lam: float) -> tuple[Tensor, Tensor]:
    """DPO-Positive loss per pair (Pal et al. 2024, "Smaug", arXiv 2402.13228, eq. 3):

        L = −log σ( β · [ Δ_w − Δ_l − λ · max(0, −Δ_w) ] ),   Δ = log π_θ(y|x) − log π_ref(y|x),

    λ inside the β bracket as in the paper and McGill-NLP/VinePPO trainers/dpo_positive_trainer.py.
    λ = 0 is DPO (Rafailov et al. 2023, eq. 7). At π_θ = π_ref the loss is log 2.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: (P,) sequence log-probs (sums over
            response tokens, nats) of the chosen (correct) and rejected responses.
    Returns:
        (loss, margin): (P,) per-pair loss and the bracketed logit β·[...].
    """
    delta_w = policy_chosen - ref_chosen
    delta_l = policy_rejected - ref_rejected
    margin = beta * (delta_w - delta_l - lam * torch.clamp(-delta_w, min=0.0))
    return -torch.nn.functional.logsigmoid(margin), margin


def permute_advantages(advantages: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The null control's advantages: the same values, reassigned at random, so an update of the same
    size carries no signal ("RL minus null" is the learning, "null minus start" the drift).

    When every row's advantage is constant over its response tokens (outcome advantages: GRPO, RLOO,
    REINFORCE), whole rows swap values (a random permutation of the sequences); otherwise (per-step or
    per-token advantages: VinePPO, PPO) the masked tokens' values are permuted across the batch.

    Args:
        advantages: (B, T) per-token advantages; mask: (B, T) 0/1 response-token mask.
        generator: the RNG of the permutation.
    Returns:
        (B, T) permuted advantages, 0 outside the mask.
    """
    keep = mask.bool()
    out = torch.zeros_like(advantages)
    rows = keep.any(dim=1)
    first = advantages.gather(1, keep.float().argmax(dim=1, keepdim=True)).squeeze(1)  # (B,) first response token
    constant = bool(((advantages - first[:, None]).abs() * keep).max() == 0) if keep.any() else True
    if constant:
        live = rows.nonzero().squeeze(1)
        shuffled = first[live][torch.randperm(live.numel(), generator=generator)]
        values = torch.zeros_like(first)
        values[live] = shuffled
        return torch.where(keep, values[:, None].expand_as(advantages), out)
    values = advantages[keep]
    out[keep] = values[torch.randperm(values.numel(), generator=generator)]
    return out


@register_advantage_estimator("step_mc")
def step_advantages(values: Sequence[float], reward: float) -> list[float]:
    """VinePPO's step advantages ``A_i = r_i + V(s_{i+1}) − V(s_i)`` for the n steps of one
    trajectory (γ = 1; Kazemnejad et al. 2024, arXiv 2410.01679, eq. 6 with V̂ the Monte-Carlo mean).

    Args:
        values: V(s_0) .. V(s_{n−1}), the values of the states where each step starts.
        reward: the outcome R, given at the last step (r_{n−1} = R, all other r_i = 0).
    Returns:
        n advantages; they telescope: Σ_i A_i = R − V(s_0).
    """
    n = len(values)
    nxt = list(values[1:]) + [0.0]
    return [(reward if i == n - 1 else 0.0) + nxt[i] - values[i] for i in range(n)]
