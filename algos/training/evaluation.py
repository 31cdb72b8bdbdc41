"""Evaluation on the test split: accuracy (greedy or sampled, with its standard error across
problems) and the KL of the policy to the reference on its own samples."""

from __future__ import annotations

import math
from typing import Sequence

from algos import core
from algos.actor import batch_logprobs
from algos.models.policy import batch_sequences
from algos.rollout import collect_episodes
from algos.samplers import Sampler, SamplingParams
from langenv.env import LanguageEnv


def accuracy_metrics(episodes: Sequence, problems: int, samples: int, prefix: str = "eval/accuracy") -> dict[str, float]:
    """Mean correct fraction over problems (``samples`` consecutive episodes each) and its standard
    error across problems."""
    per_problem = [sum(e.reward for e in episodes[i * samples:(i + 1) * samples]) / samples for i in range(problems)]
    n = len(per_problem)
    mean = sum(per_problem) / n
    var = sum((p - mean) ** 2 for p in per_problem) / max(n - 1, 1)
    return {prefix: mean, f"{prefix}_stderr": math.sqrt(var / n)}


def evaluate(env: LanguageEnv, sampler: Sampler, problems: Sequence, samples: int, temperature: float,
             top_p: float, max_new_tokens: int, seed: int) -> dict[str, float]:
    """Mean correct fraction over ``samples`` responses to each problem, with its standard error."""
    params = SamplingParams(temperature, top_p if temperature > 0 else 1.0, max_new_tokens, env.task.stop_strings, samples)
    episodes = collect_episodes(env, sampler, problems, params, seed=seed)
    return {
        **accuracy_metrics(episodes, len(problems), samples),
        "eval/truncated": sum(e.state.truncated for e in episodes) / len(episodes),
        "eval/response_tokens": sum(len(e.response_ids) for e in episodes) / len(episodes),
    }


def kl_to_reference(policy, reference, episodes: Sequence, temperature: float, pad_token_id: int,
                    micro: int = 32) -> float:
    """Mean per-token k3 estimate of KL(π_T‖π_ref,T) over the response tokens of ``episodes``, which
    must be samples of the policy at ``temperature`` (nats per token)."""
    if not episodes:
        return float("nan")
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], pad_token_id)
    mask = batch["response_mask"].float()
    logp = batch_logprobs(policy, batch, temperature, micro)
    ref = batch_logprobs(reference, batch, temperature, micro)
    return float(core.masked_mean(core.kl_estimate(logp, ref, "k3"), mask))
