"""Evaluation on the test split: accuracy (greedy or sampled, with its standard error across
problems) and the KL of the policy to the reference on its own samples."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

from algos import core
from algos.actor import batch_logprobs
from algos.models.policy import batch_sequences
from algos.rollout import collect_episodes
from algos.samplers import Sampler, SamplingParams
from langenv.env import LanguageEnv

if TYPE_CHECKING:
    from algos.config import SamplingConfig
    from algos.training.config import RunConfig
    from langenv.tasks.base import Task


def accuracy_metrics(episodes: Sequence, problems: int, samples: int, prefix: str = "eval/accuracy") -> dict[str, float]:
    """Mean correct fraction over problems (``samples`` consecutive episodes each) and its standard
    error across problems."""
    per_problem = [sum(e.reward for e in episodes[i * samples:(i + 1) * samples]) / samples for i in range(problems)]
    n = len(per_problem)
    mean = sum(per_problem) / n
    var = sum((p - mean) ** 2 for p in per_problem) / max(n - 1, 1)
    return {prefix: mean, f"{prefix}_stderr": math.sqrt(var / n)}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 − C(n−c, k) / C(n, k)``
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv 2107.03374, eq. 1).

    Raises:
        ValueError: ``k`` outside [1, n] or ``c`` outside [0, n].
    """
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def sampled_metrics(episodes: Sequence, problems: Sequence, samples: int,
                    prefix: str = "eval/accuracy_sampled") -> dict[str, float]:
    """Metrics of ``samples`` sampled responses per problem (consecutive episodes per problem):
    pass@1 (the mean correct fraction, ``prefix``) with its standard error across problems,
    ``eval/pass@k`` for k = 2, 4, 8, ... up to ``samples`` (`pass_at_k`), and, when problems carry a
    ``num_ops`` (or ``level``) meta field, pass@1 per value of it (``prefix/<field>=<value>``)."""
    out = accuracy_metrics(episodes, len(problems), samples, prefix)
    correct = correct_counts(episodes, len(problems), samples)
    k = 2
    while k <= samples:
        out[f"eval/pass@{k}"] = sum(pass_at_k(samples, c, k) for c in correct) / len(problems)
        k *= 2
    for field in ("num_ops", "level"):
        groups: dict[str, list[float]] = {}
        for i, p in enumerate(problems):
            value = dict(p.meta).get(field)
            if value is not None:
                groups.setdefault(value, []).append(correct[i] / samples)
        for value, rates in sorted(groups.items()):
            out[f"{prefix}/{field}={value}"] = sum(rates) / len(rates)
    return out


def correct_counts(episodes: Sequence, problems: int, samples: int) -> list[int]:
    """Per problem, how many of its ``samples`` consecutive episodes are correct (reward ≥ 0.5):
    the per-problem record that paired comparisons of two evaluations on the same problems need."""
    return [sum(e.reward >= 0.5 for e in episodes[i * samples:(i + 1) * samples]) for i in range(problems)]


def evaluation_episodes(env: LanguageEnv, sampler: Sampler, problems: Sequence, samples: int, temperature: float,
                        top_p: float, max_new_tokens: int, seed: int) -> list:
    """``samples`` responses to each problem (problem-major) at ``temperature`` (greedy at 0, where
    top-p is ignored)."""
    params = SamplingParams(temperature, top_p if temperature > 0 else 1.0, max_new_tokens, env.task.stop_strings, samples)
    return collect_episodes(env, sampler, problems, params, seed=seed)


def evaluation_metrics(episodes: Sequence, problems: int, samples: int) -> dict[str, float]:
    """`accuracy_metrics` of `evaluation_episodes`, plus the truncated share and the mean response length."""
    return {
        **accuracy_metrics(episodes, problems, samples),
        "eval/truncated": sum(e.state.truncated for e in episodes) / len(episodes),
        "eval/response_tokens": sum(len(e.response_ids) for e in episodes) / len(episodes),
    }


def evaluate(env: LanguageEnv, sampler: Sampler, problems: Sequence, samples: int, temperature: float,
             top_p: float, max_new_tokens: int, seed: int) -> dict[str, float]:
    """Mean correct fraction over ``samples`` responses to each problem, with its standard error."""
    episodes = evaluation_episodes(env, sampler, problems, samples, temperature, top_p, max_new_tokens, seed)
    return evaluation_metrics(episodes, len(problems), samples)


def run_evaluation(env: LanguageEnv, sampler: Sampler, problems: Sequence, iteration: int, seed_for: Callable[[str], int],
                   *, samples: int, temperature: float, top_p: float, sampled_samples: int, sampled_temperature: float,
                   sampled_top_p: float, max_new_tokens: int) -> tuple[dict[str, float], list | None, dict[str, Any]]:
    """One evaluation as the training loop makes it (and `experiments/backfill_evaluations.py` repeats
    it): ``samples`` responses per problem at ``temperature`` (0: greedy) and, when ``sampled_samples``
    > 0, that many at ``sampled_temperature`` / ``sampled_top_p``; the sampler seeds are
    ``seed_for("eval")`` and ``seed_for("eval-sampled")``.

    Returns (metrics: `evaluation_metrics` and `sampled_metrics`; the sampled episodes, None when
    off; the per-problem record written to ``evaluations.jsonl``: ``iteration``, ``problem_ids``,
    ``samples``, ``correct`` and, when sampled, ``sampled_samples``, ``sampled_correct``)."""
    greedy = evaluation_episodes(env, sampler, problems, samples, temperature, top_p, max_new_tokens,
                                 seed=seed_for("eval"))
    metrics = evaluation_metrics(greedy, len(problems), samples)
    record: dict[str, Any] = {"iteration": iteration, "problem_ids": [p.id for p in problems], "samples": samples,
                              "correct": correct_counts(greedy, len(problems), samples)}
    episodes = None
    if sampled_samples:
        params = SamplingParams(sampled_temperature, sampled_top_p, max_new_tokens, env.task.stop_strings,
                                sampled_samples)
        episodes = collect_episodes(env, sampler, problems, params, seed=seed_for("eval-sampled"))
        metrics.update(sampled_metrics(episodes, problems, sampled_samples))
        record.update(sampled_samples=sampled_samples,
                      sampled_correct=correct_counts(episodes, len(problems), sampled_samples))
    return metrics, episodes, record


def eval_environment(task: Task, tokenizer, run: RunConfig, max_new_tokens: int,
                     max_context: int | None) -> tuple[LanguageEnv, Sequence]:
    """The test-split environment of a run and the problems it evaluates (the first ``run.eval_problems``,
    all at 0)."""
    env = LanguageEnv(task, tokenizer, split="test", max_new_tokens=max_new_tokens, max_context=max_context)
    return env, env.problems[: run.eval_problems or None]


def evaluation_settings(run: RunConfig, sampling: SamplingConfig) -> dict[str, Any]:
    """`run_evaluation`'s keyword arguments for a run: greedy (``eval_temperature``) responses, and with
    ``eval_sampled`` samples at the training temperature (or ``eval_sampled_temperature``) and top-p."""
    sampled_t = sampling.temperature if run.eval_sampled_temperature is None else run.eval_sampled_temperature
    return {"samples": run.eval_samples, "temperature": run.eval_temperature, "top_p": run.eval_top_p,
            "sampled_samples": run.eval_sampled_samples if run.eval_sampled else 0,
            "sampled_temperature": sampled_t, "sampled_top_p": sampling.top_p,
            "max_new_tokens": sampling.max_new_tokens}


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
