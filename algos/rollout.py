"""Experience collection shared by every algorithm: sampler completions stepped through the env.

An `Episode` is one graded response to one prompt, ready to train on. Completions pass through
`LanguageEnv.step_states`, so rewards, truncation, stop strings and the EOS trick are the
environment's: an EOS is appended only to responses that finished (finish_reason "stop"); a response
stopped by a stop string is cut before it, then gets EOS (the stop string is never trained on); a
response cut by the length limit is truncated, scores 0 and gets no EOS (McGill-NLP/VinePPO,
episode_generators/episode_generator_with_reward_function.py).
"""

from __future__ import annotations

import inspect
import math
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Sequence

from algos.samplers.base import Completion, Sampler, SamplingParams
from langenv.env import LanguageEnv, StepResult
from langenv.grading import STATUSES, GradingError
from langenv.state import EnvState
from langenv.steps import step_char_offsets


@dataclass(frozen=True)
class Episode:
    """One finished episode.

    Attributes:
        state: the final `EnvState` (its ``response_ids`` are the trained tokens, EOS included when
            finished; a stop string is never among them).
        reward: graded reward (1.0 / 0.0).
        status: grading status, or "truncated".
        text: decoded response, cut before a stop string: the graded text.
    """

    state: EnvState
    reward: float
    status: str
    text: str

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.state.prompt_ids

    @property
    def response_ids(self) -> tuple[int, ...]:
        return self.state.response_ids


#: Share of graded results with status "error" above which a collection stops the run.
MAX_GRADING_ERROR_SHARE = 0.05


def check_grading_errors(results: Sequence[StepResult], max_share: float = MAX_GRADING_ERROR_SHARE) -> int:
    """Count the results the grader could not check (status "error", an infrastructure failure:
    their reward 0 is not a verdict) and stop when they are more than ``max_share`` of the graded
    ones, so an update never trains on rewards zeroed by a broken grader (the failure mode of verl
    PR #5635). Below the share they stay in the batch with reward 0 and are counted in
    ``grading/error``.

    Returns:
        The number of "error" results.
    Raises:
        langenv.grading.GradingError: naming the count, the share and the first cause.
    """
    graded = [r for r in results if r.status in STATUSES]
    errors = [r for r in graded if r.status == "error"]
    if errors and len(errors) > max_share * len(graded):
        cause = errors[0].info.get("grading_error", "unknown cause")
        raise GradingError(f"{len(errors)} of {len(graded)} graded responses ({len(errors) / len(graded):.0%}, more "
                           f"than {max_share:.0%}) could not be checked by the grader; stopping before an update. "
                           f"First cause: {cause}")
    return len(errors)


def completion_chunk(completion: Completion, eos_token_id: int) -> list[int]:
    """Token ids to step the env with: the completion, plus EOS when it finished without one (on a
    stop string the env then cuts the stop string and this EOS off and appends EOS after the cut)."""
    ids = list(completion.token_ids)
    if completion.finish_reason == "stop" and (not ids or ids[-1] != eos_token_id):
        ids.append(eos_token_id)
    return ids


def _takes_budgets(sampler: Sampler) -> bool:
    """Whether ``sampler.generate`` accepts per-prompt ``budgets`` (all our samplers do; so does a
    wrapper passing ``**kwargs`` on)."""
    try:
        parameters = inspect.signature(sampler.generate).parameters
    except (TypeError, ValueError):
        return False
    return "budgets" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def continue_states(
    env: LanguageEnv,
    sampler: Sampler,
    states: Sequence[EnvState],
    params: SamplingParams,
    seed: int | None = None,
    timings: dict[str, float] | None = None,
    max_error_share: float = MAX_GRADING_ERROR_SHARE,
) -> list[list[StepResult]]:
    """Sample ``params.n`` continuations of each live state and step them through the env.

    The response budget is each state's own (``max_new_tokens`` counts the whole response), so a
    continuation that runs past it is truncated and scores 0. The sampler is asked for no more than
    that: ``min(params.max_new_tokens, state.max_new_tokens − len(state.response_ids))`` new tokens
    per state (the room a prefix leaves, e.g. VinePPO's Monte-Carlo rollouts), through its
    ``budgets`` argument in one call (`algos.samplers.base.Sampler.generate`); a sampler whose
    ``generate`` takes no ``budgets`` gets one call with the largest room as ``max_new_tokens``.
    The env would cut the extra tokens anyway, so rewards are distributed exactly as with the full
    budget; only the wasted generation (and a context overflow) goes.

    Args:
        timings: if given, seconds spent are added under "generate" and "env" (stepping and grading).
        max_error_share: see `check_grading_errors`.
    Returns:
        For each state, ``params.n`` step results in sampling order.
    Raises:
        langenv.grading.GradingError: more than ``max_error_share`` of the graded continuations got
            status "error" (the grader could not check them), before anything is trained on them.
    """
    if not states:
        return []
    t0 = time.perf_counter()
    prompts = [list(s.token_ids) for s in states]
    rooms = [min(params.max_new_tokens, s.max_new_tokens - len(s.response_ids)) for s in states]
    if min(rooms) >= params.max_new_tokens:  # every state has the full budget (new episodes)
        completions = sampler.generate(prompts, params, seed=seed)
    elif _takes_budgets(sampler):
        completions = sampler.generate(prompts, params, seed=seed, budgets=rooms)
    else:
        completions = sampler.generate(prompts, replace(params, max_new_tokens=max(1, max(rooms))), seed=seed)
    t1 = time.perf_counter()
    flat_states, chunks = [], []
    for state, comps in zip(states, completions):
        for c in comps:
            flat_states.append(state)
            chunks.append(completion_chunk(c, state.eos_token_id))
    results = env.step_states(flat_states, chunks)
    check_grading_errors(results, max_error_share)
    if timings is not None:
        timings["generate"] = timings.get("generate", 0.0) + t1 - t0
        timings["env"] = timings.get("env", 0.0) + time.perf_counter() - t1
    n = params.n
    return [results[i * n:(i + 1) * n] for i in range(len(states))]


def collect_episodes(
    env: LanguageEnv,
    sampler: Sampler,
    problems: Sequence,
    params: SamplingParams,
    seed: int | None = None,
    timings: dict[str, float] | None = None,
) -> list[Episode]:
    """``params.n`` episodes per problem, grouped by problem (problem-major order)."""
    starts = [env.initial_state(p) for p in problems]
    groups = continue_states(env, sampler, starts, params, seed=seed, timings=timings)
    return [Episode(r.state, r.reward, r.status, r.text) for group in groups for r in group]


#: Every status an episode can end with: the grader's (`langenv.grading.STATUSES`) and "truncated".
GRADING_STATUSES = STATUSES + ("truncated",)


def group_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """How much signal a batch of groups carries for an on-policy method: episodes are grouped by
    problem; ``train/groups_mixed`` is the share of groups with both higher and lower rewards (the
    only ones a group baseline learns from), ``train/groups_all_correct`` / ``train/groups_all_wrong``
    the shares of groups whose rewards are all ≥ / all < 0.5, and ``train/pass_rate_std`` the standard
    deviation across groups of the per-problem pass rate (mean reward). Empty input gives {}."""
    groups: dict[str, list[float]] = {}
    for e in episodes:
        groups.setdefault(e.state.problem.id, []).append(e.reward)
    if not groups:
        return {}
    n = len(groups)
    rates = [sum(g) / len(g) for g in groups.values()]
    mean = sum(rates) / n
    return {
        "train/groups_mixed": sum(max(g) > min(g) for g in groups.values()) / n,
        "train/groups_all_correct": sum(min(g) >= 0.5 for g in groups.values()) / n,
        "train/groups_all_wrong": sum(max(g) < 0.5 for g in groups.values()) / n,
        "train/pass_rate_std": (sum((r - mean) ** 2 for r in rates) / n) ** 0.5,
    }


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """Metrics every algorithm logs about the episodes it trained on: mean reward, truncated
    fraction, mean response length (tokens), sampled tokens, a count per grading status, and the
    groups' pass-rate spread (`group_metrics`)."""
    n = max(len(episodes), 1)
    tokens = sum(len(e.response_ids) for e in episodes)
    metrics = {
        "train/reward": sum(e.reward for e in episodes) / n,
        "train/truncated": sum(e.state.truncated for e in episodes) / n,
        "train/response_tokens": tokens / n,
        "tokens/episodes": float(tokens),
    }
    for status in GRADING_STATUSES:
        metrics[f"grading/{status}"] = float(sum(e.status == status for e in episodes))
    metrics.update(group_metrics(episodes))
    return metrics


@dataclass(frozen=True)
class StepLayout:
    """How one episode's response splits into reasoning steps, in tokens.

    Attributes:
        boundaries: token index where each step starts, (n,), boundaries[0] == 0.
        token_steps: step index of every response token, (T,); a trailing EOS joins the last step.
    """

    boundaries: tuple[int, ...]
    token_steps: tuple[int, ...]


def step_layout(episode: Episode, tokenizer, split_steps) -> StepLayout:
    """Split a response into steps on its decoded text and map the steps to token offsets.

    Token t starts at character ``len(decode(ids[:t]))``; it belongs to the step containing that
    character, so a step starts at the first token whose start reaches the step's first character
    (found by binary search: O(steps · log T) decodes). A step in which no token starts merges
    into the step before it. A trailing EOS belongs to the last step.
    """
    ids = list(episode.response_ids)
    if not ids:
        return StepLayout((0,), ())
    text = tokenizer.decode(ids, skip_special_tokens=True)
    steps = [s for s in split_steps(text) if s] or [text]

    @lru_cache(maxsize=None)
    def token_start(t: int) -> int:
        return len(tokenizer.decode(ids[:t], skip_special_tokens=True))

    boundaries = [0]
    for char in step_char_offsets(steps)[1:]:
        t = bisect_left(range(len(ids)), char, key=token_start)
        if boundaries[-1] < t < len(ids):
            boundaries.append(t)
    token_steps = [bisect_right(boundaries, t) - 1 for t in range(len(ids))]
    return StepLayout(tuple(boundaries), tuple(token_steps))


def mc_values(env: LanguageEnv, sampler: Sampler, states: Sequence[EnvState], params: SamplingParams,
              seed: int | None = None, timings: dict[str, float] | None = None) -> tuple[dict[tuple[int, ...], float], int]:
    """Monte-Carlo values of restored states (VinePPO, arXiv 2410.01679 eq. 5): ``V̂(s)`` = the mean
    reward of ``params.n`` continuations of ``s``, sampled and graded through the env.

    Args:
        states: distinct states (by ``token_ids``); each continues within its own response budget.
    Returns:
        ({state.token_ids: V̂(s)}, tokens sampled for it).
    """
    results = continue_states(env, sampler, states, params, seed=seed, timings=timings)
    values = {s.token_ids: sum(r.reward for r in rs) / len(rs) for s, rs in zip(states, results)}
    tokens = sum(len(r.state.response_ids) - len(s.response_ids) for s, rs in zip(states, results) for r in rs)
    return values, tokens


def collect_mixed_groups(
    env: LanguageEnv,
    sampler: Sampler,
    problems: Sequence,
    params: SamplingParams,
    draw: Callable[[int, int], Sequence],
    seed_for: Callable[[int], int],
    max_rounds: int,
    dist=None,
    timings: dict[str, float] | None = None,
) -> tuple[list[Episode], dict[str, float]]:
    """DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476 §3.2, eq. 11's constraint
    0 < |{correct}| < G): sample ``params.n`` responses per problem, keep only the groups whose rewards
    are not all equal, and draw more problems (the missing count divided by the keep rate so far, at
    most 8x) until ``len(problems)`` groups are kept or ``max_rounds`` extra rounds are spent.

    Args:
        draw: ``draw(round, count)`` -> ``count`` new problems for extra round ``round`` (1, 2, ...).
        seed_for: ``seed_for(round)`` -> the sampler seed of round ``round`` (0 for ``problems``).
        dist: the data-parallel group (`algos.training.distributed.Dist`) or None; with several ranks
            every rank keeps the smallest number of groups any rank kept, so their batches match.
    Returns:
        (episodes of the kept groups, problem-major, G per group; metrics ``dynamic/rounds``,
        ``dynamic/groups_sampled``, ``dynamic/groups_kept``, ``dynamic/fill`` (kept / wanted),
        ``dynamic/reward_sampled`` (mean reward of everything sampled) and
        ``tokens/dynamic_discarded`` (tokens of the groups not kept)).
    """
    n, target = params.n, len(problems)
    kept: list[list[Episode]] = []
    sampled: list[Episode] = []
    batch, rounds = list(problems), 0
    while True:
        episodes = collect_episodes(env, sampler, batch, params, seed=seed_for(rounds), timings=timings)
        sampled += episodes
        for g in range(len(batch)):
            group = episodes[g * n:(g + 1) * n]
            if max(e.reward for e in group) > min(e.reward for e in group):
                kept.append(group)
        rounds += 1
        if len(kept) >= target or rounds > max_rounds:
            break
        # over-sample by the inverse keep rate so far (at most 8x), as DAPO samples until the batch is full
        need, rate = target - len(kept), len(kept) / max(len(sampled) // n, 1)
        batch = list(draw(rounds, min(math.ceil(need / max(rate, 1 / 8)), 8 * need)))
        if not batch:
            break
    count = min(len(kept), target)
    if dist is not None and dist.world_size > 1:
        count = min(dist.all_gather_object(count))
    chosen = [e for group in kept[:count] for e in group]
    chosen_ids = {id(e) for e in chosen}
    metrics = {
        "dynamic/rounds": float(rounds),
        "dynamic/groups_sampled": float(len(sampled) // n),
        "dynamic/groups_kept": float(count),
        "dynamic/fill": count / max(target, 1),
        "dynamic/reward_sampled": sum(e.reward for e in sampled) / max(len(sampled), 1),
        "tokens/dynamic_discarded": float(sum(len(e.response_ids) for e in sampled if id(e) not in chosen_ids)),
    }
    return chosen, metrics
