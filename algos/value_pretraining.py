"""Value pretraining: VC-PPO's fix for the critic's initialisation bias (Yuan et al. 2025, "What's
Behind PPO's Collapse in Long-CoT? Value Optimization Holds the Secret", arXiv 2503.01491 §4.1).

Before PPO's first policy update the critic is trained alone on responses sampled from the frozen
initial policy, with Monte-Carlo targets (GAE with λ = 1: ``G_t = Σ_{l≥0} γ^l r_{t+l}``, which with
γ = 1 and the terminal-only outcome reward is ``G_t = R`` on every response token), so that PPO
starts with a critic whose values are those of the initial policy instead of a random head on the
SFT backbone. The paper trains "until the value loss and explained variance converge"; the exact
step count was not recovered (shared/reference/algorithms.md §7, §11.7).

The procedure (`pretrain_critic`):

1. **Held-out set.** The training problems (``ctx.env.problems``) are shuffled with the fixed
   pretraining seed; the first ``value_pretrain_heldout_prompts`` are held out and sampled once
   (``samples_per_prompt`` each). The rest is the pool the rounds draw from, so the held-out
   episodes are of problems the critic never trains on.
2. **Rounds.** Each round draws ``prompts_per_iteration`` problems from the pool, samples
   ``samples_per_prompt`` responses each with PPO's sampling settings, and runs one PPO critic
   update (`algos.critic.critic_update`: the clipped value loss, PPO's epochs and mini-batches) on
   them, with a fresh AdamW of its own (learning rate ``value_pretrain_learning_rate``, PPO's
   warm-up ratio and linear decay over the step budget), so PPO's own critic schedule is untouched.
   The policy is never updated.
3. **Stopping** (checked after each round, on the held-out episodes): the explained variance
   reaches ``value_pretrain_target_ev``; or the held-out loss (``½ · token_mean((V − G)²)``) has not
   fallen below ``(1 − PLATEAU_TOLERANCE) ×`` its best value for ``value_pretrain_patience`` rounds
   in a row (a plateau; the paper warns that longer pretraining overfits); or the optimiser steps
   reach ``value_pretrain_steps``. The budget is checked between rounds, so the total is the budget
   rounded up to whole rounds.

**Independent of the run seed.** The head is re-drawn from the pretraining seed and every round's
sampling seed derives from it, so runs with different ``--seed`` get the same pretrained critic,
which is **cached** under ``<cache_dir>/value-pretrain/<task>-<hash>/`` (`ValueModel.save_pretrained`,
written to a temporary directory and renamed, as the warm start). The hash covers the policy's
weights fingerprint (`algos.training.checkpoint.state_fingerprint`), the task, the sampler, the
sampling settings, the critic's update settings and the pretraining settings (`cache_key`).

Under several processes every rank runs the same pretraining on the same data (it is not sharded),
so their critics agree; only the main rank writes the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from algos import core
from algos.config import make_optimizer
from algos.models.policy import batch_sequences
from algos.rollout import Episode, collect_episodes
from algos.training.checks import check_fraction, check_non_negative, check_positive, check_types

if TYPE_CHECKING:  # algos.ppo imports this module for its config
    from algos.critic import CriticSettings, ValueModel
    from algos.ppo import PPOConfig
    from algos.training.context import TrainContext

__all__ = [
    "PLATEAU_TOLERANCE",
    "ValuePretrainConfig",
    "cache_key",
    "evaluate_critic",
    "heldout_split",
    "monte_carlo_returns",
    "pretrain_critic",
    "stop_reason",
    "value_loss",
]

#: Relative improvement of the held-out loss that counts as progress for the plateau rule.
PLATEAU_TOLERANCE = 0.01
#: Bumped when the procedure or the cached format changes (invalidates cached critics).
_FORMAT = 1
#: File written last into a finished cache directory.
MARKER = "value_pretrain.json"


@dataclass
class ValuePretrainConfig:
    """VC-PPO's value pretraining (`pretrain_critic`); off unless ``value_pretrain_steps`` > 0."""

    value_pretrain_steps: int = 0
    """Budget of critic optimiser steps before the first policy update (0: no pretraining)."""
    value_pretrain_target_ev: float = 0.9
    """Stop once the explained variance on the held-out episodes reaches this."""
    value_pretrain_patience: int = 2
    """Stop after this many rounds in a row without a 1% lower held-out loss (0: no plateau rule)."""
    value_pretrain_heldout_prompts: int = 8
    """Training problems held out (samples_per_prompt responses each) to measure the critic."""
    value_pretrain_learning_rate: float | None = None
    """Peak AdamW learning rate of the pretraining; None: the critic's learning rate."""
    value_pretrain_seed: int = 0
    """Seed of the held-out split, the head and the sampling (not the run's --seed: every seed shares
    one pretrained critic)."""
    value_pretrain_cache: bool = True
    """Reuse / store the pretrained critic under the run's cache directory."""

    def __post_init__(self) -> None:
        """Raises TypeError / ValueError naming ``ValuePretrainConfig.<field>``."""
        check_types(self)
        check_non_negative(self, ("value_pretrain_steps", "value_pretrain_patience", "value_pretrain_seed"))
        check_positive(self, ("value_pretrain_heldout_prompts",))
        check_fraction(self, "value_pretrain_target_ev", high_open=False)
        if self.value_pretrain_learning_rate is not None:
            check_positive(self, ("value_pretrain_learning_rate",))

    @property
    def enabled(self) -> bool:
        return self.value_pretrain_steps > 0


def _seed(base: int, purpose: str, index: int = 0) -> int:
    return int(np.random.SeedSequence([base, sum(map(ord, purpose)), index]).generate_state(1)[0])


def cache_key(ctx: TrainContext, config: PPOConfig, settings: CriticSettings, critic: ValueModel) -> dict[str, Any]:
    """Everything the pretrained critic depends on, as a JSON-serialisable dict (its sha256 names the
    cache directory): the policy's weights fingerprint, the task, the sampler class, the sampling
    settings, the critic's update settings and learning rate, γ, the device type and the pretraining
    settings (``value_pretrain_cache`` aside). Not the run seed."""
    from algos.training.checkpoint import state_fingerprint

    pre = dataclasses.asdict(config.value_pretrain)
    pre.pop("value_pretrain_cache")
    return {
        "format": _FORMAT,
        "policy": state_fingerprint(ctx.policy),
        "task": ctx.task.name,
        "sampler": type(ctx.sampler).__name__,
        "sampling": dataclasses.asdict(config.sampling),
        "critic": dataclasses.asdict(settings),
        "learning_rate": _learning_rate(config),
        "warmup_ratio": config.optim.warmup_ratio,
        "weight_decay": config.optim.weight_decay,
        "gamma": config.gamma,
        "device": critic.device.type,
        "pretrain": pre,
    }


def _learning_rate(config: PPOConfig) -> float:
    lr = config.value_pretrain.value_pretrain_learning_rate
    return config.critic_learning_rate if lr is None else lr


def heldout_split(problems: Sequence, n_heldout: int, seed: int) -> tuple[list, list]:
    """Shuffle ``problems`` with ``seed`` and split off the first ``n_heldout``.

    Returns:
        (held-out problems, the pool the training rounds draw from).
    Raises:
        ValueError: fewer than ``n_heldout + 1`` problems (no pool left to train on).
    """
    if len(problems) <= n_heldout:
        raise ValueError(f"value pretraining: value_pretrain_heldout_prompts is {n_heldout} but the train split has "
                         f"only {len(problems)} problems; expected at most {len(problems) - 1}")
    order = np.random.default_rng(seed).permutation(len(problems)).tolist()
    return [problems[i] for i in order[:n_heldout]], [problems[i] for i in order[n_heldout:]]


def monte_carlo_returns(batch: dict[str, Tensor], rewards: Sequence[float], gamma: float = 1.0) -> Tensor:
    """λ = 1 targets: the discounted reward-to-go ``G_t = Σ_{l≥0} γ^l r_{t+l}`` (GAE with λ = 1,
    Schulman et al. 2016 eq. 18, which does not depend on V; VC-PPO §4.1), with the outcome reward
    on the last response token (`algos.critic.terminal_rewards`). With γ = 1: ``G_t = R`` on every
    response token.

    Args:
        batch: a right-padded `batch_sequences` batch of B episodes, width L.
        rewards: B outcome rewards.
    Returns:
        (B, L) float32, 0 outside ``response_mask``.
    """
    from algos.critic import terminal_rewards

    mask = batch["response_mask"].float()
    per_token = terminal_rewards(batch, rewards)
    return core.gae(per_token, torch.zeros_like(per_token), mask, gamma, 1.0)[1]


def value_loss(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """The unclipped critic loss ``½ · token_mean((V − G)²)`` over the masked tokens (all (B, L))."""
    return 0.5 * float(core.masked_mean((values.float() - returns.float()) ** 2, mask.float()))


def evaluate_critic(critic: ValueModel, batch: dict[str, Tensor], returns: Tensor, micro_batch_size: int,
                    bf16_autocast: bool = False) -> tuple[float, float]:
    """The critic's `value_loss` and explained variance (`algos.critic.explained_variance`) on a batch.

    Args:
        batch: a right-padded `batch_sequences` batch; returns: (B, L) targets.
    Returns:
        (loss, explained variance).
    """
    from algos.critic import compute_values, explained_variance

    values = compute_values(critic, batch, micro_batch_size, bf16_autocast)
    mask = batch["response_mask"]
    return value_loss(values, returns, mask), explained_variance(values, returns, mask)


def stop_reason(ev: float, stale: int, steps: int, round_steps: int, pre: ValuePretrainConfig) -> str | None:
    """The stopping rule, checked after each round: why to stop, or None to run another round.

    Args:
        ev: the held-out explained variance after the round.
        stale: rounds in a row whose held-out loss was not below ``(1 − PLATEAU_TOLERANCE) ×`` the
            best loss before them.
        steps: critic optimiser steps so far; round_steps: those of this round (0: every mini-batch
            was skipped as non-finite, so training cannot continue).
    Returns:
        ``"no finite update"``, ``"target explained variance"``, ``"plateau"``, ``"budget"`` (in this
        order of precedence) or None.
    """
    if round_steps == 0:
        return "no finite update"
    if ev >= pre.value_pretrain_target_ev:
        return "target explained variance"
    if pre.value_pretrain_patience and stale >= pre.value_pretrain_patience:
        return "plateau"
    if steps >= pre.value_pretrain_steps:
        return "budget"
    return None


def _sample(ctx: TrainContext, problems: Sequence, config: PPOConfig, seed: int) -> tuple[list[Episode], dict, Tensor]:
    params = config.sampling.params(config.sampling.samples_per_prompt, ctx.task.stop_strings)
    episodes = collect_episodes(ctx.env, ctx.sampler, problems, params, seed=seed)
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], ctx.pad_token_id)
    return episodes, batch, monte_carlo_returns(batch, [e.reward for e in episodes], config.gamma)


def pretrain_critic(critic: ValueModel, ctx: TrainContext, config: PPOConfig, settings: CriticSettings,
                    cache_dir: Path | None = None) -> dict[str, float]:
    """VC-PPO's value pretraining of ``critic`` in place (procedure, stopping rule and cache in the
    module docstring); the policy is not changed.

    Call it before the critic's first update: the critic must still be the policy's backbone plus a
    new head (`ValueModel.from_policy`); its head is re-drawn from the pretraining seed.

    Args:
        critic: PPO's critic.
        ctx: the trainer's context (policy, sampler, env, task).
        config: the `algos.ppo.PPOConfig` (``value_pretrain``, ``sampling``, ``optim``,
            ``critic_learning_rate``, ``gamma``).
        settings: the critic update's settings (`algos.critic.CriticSettings`).
        cache_dir: the run's cache directory; None (or ``value_pretrain_cache=False``) neither reads
            nor writes a cache.
    Returns:
        Metrics: ``value_pretrain/explained_variance_before`` / ``_after`` and ``loss_before`` /
        ``_after`` (held-out, see `evaluate_critic`), ``steps`` (critic optimiser steps), ``rounds``,
        ``cached`` (1 when loaded from the cache, then nothing was sampled or trained),
        ``heldout_episodes``; ``tokens/value_pretrain`` (sampled response tokens) and
        ``time/value_pretrain`` (seconds). With ``value_pretrain_steps`` 0: {} and the critic is untouched.
    Raises:
        ValueError: too few train problems (`heldout_split`).
        langenv.grading.GradingError: from the episode collection (`algos.rollout.check_grading_errors`).
    """
    from algos.critic import ValueModel, compute_values, critic_update

    pre = config.value_pretrain
    if not pre.enabled:
        return {}
    t0 = time.perf_counter()
    target = None
    if cache_dir is not None and pre.value_pretrain_cache:
        key = cache_key(ctx, config, settings, critic)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        target = Path(cache_dir) / "value-pretrain" / f"{ctx.task.name}-{digest}"
        if (target / MARKER).is_file():
            loaded = ValueModel.from_pretrained(target, dtype=critic.dtype, device=critic.device)
            critic.load_state_dict(loaded.state_dict())
            info = json.loads((target / MARKER).read_text())["metrics"]
            print(f"[langenv] value pretraining: loaded the cached critic {target}", file=sys.stderr)
            return {**info, "value_pretrain/cached": 1.0, "tokens/value_pretrain": 0.0,
                    "time/value_pretrain": time.perf_counter() - t0}

    seed = pre.value_pretrain_seed
    critic.reset_head(torch.Generator().manual_seed(_seed(seed, "head")))
    heldout, pool = heldout_split(ctx.env.problems, pre.value_pretrain_heldout_prompts, seed)
    held_episodes, held_batch, held_returns = _sample(ctx, heldout, config, _seed(seed, "heldout"))
    tokens = sum(len(e.response_ids) for e in held_episodes)
    loss_before, ev_before = evaluate_critic(critic, held_batch, held_returns, settings.micro_batch_size,
                                             settings.bf16_autocast)
    optimizer, scheduler = make_optimizer(critic, _learning_rate(config), config.optim.weight_decay,
                                          config.optim.warmup_ratio, pre.value_pretrain_steps)
    draw = np.random.default_rng(_seed(seed, "problems"))
    shuffle = torch.Generator().manual_seed(_seed(seed, "shuffle"))
    n_prompts = min(config.sampling.prompts_per_iteration, len(pool))
    steps = rounds = stale = 0
    loss, ev, best, reason = loss_before, ev_before, loss_before, None
    while reason is None:
        problems = [pool[i] for i in draw.choice(len(pool), size=n_prompts, replace=False)]
        episodes, batch, returns = _sample(ctx, problems, config, _seed(seed, "round", rounds))
        tokens += sum(len(e.response_ids) for e in episodes)
        old_values = compute_values(critic, batch, settings.micro_batch_size, settings.bf16_autocast)
        stats = critic_update(critic, optimizer, scheduler, batch, old_values, returns, settings, shuffle)
        rounds += 1
        steps += int(stats["optimizer_steps"])
        loss, ev = evaluate_critic(critic, held_batch, held_returns, settings.micro_batch_size, settings.bf16_autocast)
        if loss < best * (1 - PLATEAU_TOLERANCE):  # best moves only on a real improvement (as Keras EarlyStopping)
            best, stale = loss, 0
        else:
            stale += 1
        reason = stop_reason(ev, stale, steps, int(stats["optimizer_steps"]), pre)
    metrics = {
        "value_pretrain/explained_variance_before": ev_before, "value_pretrain/explained_variance_after": ev,
        "value_pretrain/loss_before": loss_before, "value_pretrain/loss_after": loss,
        "value_pretrain/steps": float(steps), "value_pretrain/rounds": float(rounds),
        "value_pretrain/heldout_episodes": float(len(held_episodes)),
    }
    print(f"[langenv] value pretraining: {steps} critic steps in {rounds} rounds (stopped: {reason}); held-out "
          f"loss {loss_before:.4f} -> {loss:.4f}, explained variance {ev_before:.3f} -> {ev:.3f}", file=sys.stderr)
    if target is not None and ctx.dist.is_main:
        _save(critic, target, {"key": key, "metrics": metrics, "stopped": reason})
    return {**metrics, "value_pretrain/cached": 0.0, "tokens/value_pretrain": float(tokens),
            "time/value_pretrain": time.perf_counter() - t0}


def _save(critic: ValueModel, target: Path, marker: dict[str, Any]) -> None:
    """Write the critic and the marker (last) into a temporary sibling of ``target``, then rename it
    into place; a concurrent writer that finished first wins."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        critic.save_pretrained(tmp)
        with open(tmp / MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if target.exists() and not (target / MARKER).is_file():  # a leftover without a marker
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
