"""Prompt samplers: which training problems an iteration uses — a plug-in of the loop, the same for
every algorithm (``--prompt-sampler``).

* ``uniform`` (`UniformPrompts`): the train split reshuffled with (seed, iteration), the first
  ``count`` taken (VinePPO's ``dataset_sample_with_replacement``). A function of (seed, iteration),
  so a resumed run continues the same order.
* ``learnability`` (`LearnabilityPrompts`): sampling for learnability (Foster, Sims, Forkel, Fellows
  & Foerster 2025, "Learning to Reason at the Frontier of Learnability", arXiv 2502.12272, v6 "LILO"
  algorithm; ``shared/reference/algorithms.md`` §8). Each iteration draws a candidate pool of
  ``pool_factor × count`` problems uniformly, rolls out ``attempts`` responses to each with the
  current policy (the algorithm's sampling settings), estimates p̂ = mean reward, and keeps the
  ``count`` candidates with the largest learnability p̂(1 − p̂) — the reward variance, which the
  expected policy-gradient improvement scales with; ties keep the uniform order. As in the paper it
  is stateless (nothing to checkpoint; the pool and the rollouts are seeded by (seed, iteration)).
  Where this differs from the paper: the scoring rollouts are not reused for the update (the
  algorithm samples its own), and with several processes each rank scores its shard of the pool.

A sampler is called as ``select(problems, count, iteration) -> (chosen, metrics)``; metrics go into
the iteration's row (``prompts/*``, and ``tokens/prompt_selection`` counts into ``total/tokens``).
"""

from __future__ import annotations

import time
from typing import Protocol, Sequence

import numpy as np

from algos.rollout import collect_episodes
from algos.training.context import TrainContext


def uniform_order(n: int, seed: int, iteration: int) -> np.ndarray:
    """The uniform reshuffle of ``n`` problems for an iteration, seeded by (seed, iteration)."""
    return np.random.default_rng([seed, iteration]).permutation(n)


def select_prompts(problems: Sequence, count: int, seed: int, iteration: int) -> list:
    """``count`` distinct problems for an iteration: the train split reshuffled with (seed, iteration),
    first ``count`` taken (VinePPO's dataset_sample_with_replacement)."""
    return [problems[i] for i in uniform_order(len(problems), seed, iteration)[: min(count, len(problems))]]


def learnability(p: np.ndarray | float) -> np.ndarray | float:
    """p(1 − p): 0 at p ∈ {0, 1}, 0.25 at p = ½ (arXiv 2502.12272 §3)."""
    return p * (1.0 - p)


class PromptSampler(Protocol):
    name: str

    def select(self, problems: Sequence, count: int, iteration: int) -> tuple[list, dict[str, float]]: ...


class UniformPrompts:
    """The uniform reshuffle (`select_prompts`)."""

    name = "uniform"

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def select(self, problems: Sequence, count: int, iteration: int) -> tuple[list, dict[str, float]]:
        return select_prompts(problems, count, self.seed, iteration), {}


class LearnabilityPrompts:
    """Sampling for learnability (see the module docstring).

    Args:
        ctx: the run's context (env, sampler, seeds, data-parallel group); the scoring rollouts go
            through ``ctx.env`` and ``ctx.sampler`` with the current policy's weights.
        sampling: the algorithm's `algos.config.SamplingConfig` (temperature, top-p, budget).
        pool_factor: candidates per chosen problem (paper: 4; 8 late in training on GSM8K).
        attempts: rollouts per candidate (paper: 8).
    """

    name = "learnability"

    def __init__(self, ctx: TrainContext, sampling, pool_factor: int = 4, attempts: int = 8) -> None:
        if pool_factor < 1 or attempts < 2:
            raise ValueError(f"learnability prompts: need pool_factor >= 1 and attempts >= 2 (p̂ from one attempt "
                             f"is 0 or 1), got pool_factor={pool_factor}, attempts={attempts}")
        self.ctx, self.sampling, self.pool_factor, self.attempts = ctx, sampling, pool_factor, attempts

    def scores(self, pool: Sequence, iteration: int) -> tuple[np.ndarray, int]:
        """p̂ for each problem of ``pool`` (this rank scores its shard; the ranks' results are gathered
        in pool order) and the number of tokens sampled for it on this rank."""
        ctx = self.ctx
        dist = ctx.dist
        shard = list(range(dist.rank, len(pool), dist.world_size))
        params = self.sampling.params(self.attempts, ctx.task.stop_strings)
        episodes = collect_episodes(ctx.env, ctx.sampler, [pool[i] for i in shard], params,
                                    seed=ctx.seed_for(iteration, "learnability"))
        local = {i: float(np.mean([e.reward for e in episodes[k * self.attempts:(k + 1) * self.attempts]]))
                 for k, i in enumerate(shard)}
        tokens = sum(len(e.response_ids) for e in episodes)
        if dist.world_size > 1:
            merged: dict[int, float] = {}
            for part in dist.all_gather_object(local):
                merged.update(part)
            local = merged
        return np.array([local[i] for i in range(len(pool))]), tokens

    def select(self, problems: Sequence, count: int, iteration: int) -> tuple[list, dict[str, float]]:
        t0 = time.perf_counter()
        count = min(count, len(problems))
        order = uniform_order(len(problems), self.ctx.seed, iteration)
        pool = [problems[i] for i in order[: min(len(problems), self.pool_factor * count)]]
        p_hat, tokens = self.scores(pool, iteration)
        score = learnability(p_hat)
        ranked = sorted(range(len(pool)), key=lambda i: -score[i])  # stable: ties keep the uniform order
        chosen = ranked[:count]
        metrics = {
            "prompts/learnability_chosen": float(score[chosen].mean()),
            "prompts/learnability_pool": float(score.mean()),
            "prompts/p_chosen": float(p_hat[chosen].mean()),
            "prompts/pool_mixed": float(((p_hat > 0) & (p_hat < 1)).mean()),
            "tokens/prompt_selection": float(tokens),
            "time/prompt_selection": time.perf_counter() - t0,
        }
        return [pool[i] for i in chosen], metrics


#: The ``--prompt-sampler`` choices.
PROMPT_SAMPLERS = ("uniform", "learnability")


def make_prompt_sampler(kind: str, ctx: TrainContext, sampling, pool_factor: int = 4,
                        attempts: int = 8) -> PromptSampler:
    """The prompt sampler ``kind`` (one of `PROMPT_SAMPLERS`).

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind == "uniform":
        return UniformPrompts(ctx.seed)
    if kind == "learnability":
        return LearnabilityPrompts(ctx, sampling, pool_factor, attempts)
    raise ValueError(f"prompt_sampler: expected one of {PROMPT_SAMPLERS}, got {kind!r}")
