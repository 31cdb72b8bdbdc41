"""DPO-Positive (DPO+; Pal et al., "Smaug: Fixing Failure Modes of Preference Optimisation with
DPO-Positive", arXiv 2402.13228) as the VinePPO paper's baseline.

Loss per pair (chosen ``y_w`` correct, rejected ``y_l`` incorrect), on sequence log-probs summed
over the response tokens (EOS included when the response finished)::

    Δ_w = log π_θ(y_w|x) − log π_ref(y_w|x),   Δ_l likewise,
    L   = −log σ( β · [ Δ_w − Δ_l − λ · max(0, −Δ_w) ] )          (`algos.core.dpo_positive_loss`)

The λ term penalises the chosen response's likelihood falling below the reference's (DPO's failure
mode when the two responses differ in a few tokens). λ = 0 is DPO.

As in the VinePPO code (McGill-NLP/VinePPO ``episode_generators/math_dpo_positive_episode_generator.py``,
``trainers/dpo_positive_trainer.py``, ``configs/polIter_*_dpo_positive_*.jsonnet``):

- 64 solutions per training problem sampled from the **SFT (reference) model** at T 0.6, top_p 0.9;
- a response is correct if its reward is ≥ 0.5; problems with no correct or no incorrect response
  are skipped; every correct×incorrect pair is a candidate and at most 64 per problem are drawn at
  random without replacement;
- 3 epochs over the pairs, 64 pairs per optimiser step, AdamW lr 1e-6, 3% linear warm-up then
  linear decay to 0, grad clip 1; training log-probs use logits / 0.6 (the sampling temperature),
  for π_θ and π_ref alike; β = 0.3 (GSM8K) or 0.1 (MATH), λ = 50; label smoothing 0 (not offered).

**Mapping onto the trainer's per-iteration interface.** The paper's DPO+ is one offline round:
sample the whole train set once from the SFT model, then train 3 epochs on all pairs. Here the
trainer hands each iteration ``prompts_per_iteration`` problems (the train split reshuffled per
iteration). With the default ``sample_from="reference"``, every iteration samples *its* problems
from the frozen reference (SFT) model through a second `HFSampler` over ``ctx.reference``, builds
the pairs and trains ``epochs`` passes over them; the data distribution is therefore exactly the
paper's (SFT samples), only cut into per-iteration chunks. To reproduce the paper's single round
literally, run one iteration with ``prompts_per_iteration`` ≥ the train-split size. The learning
rate follows one warm-up/decay schedule over the whole run: optimiser step k of S in iteration i
of I is step ``i·S + k`` of ``I·S`` of the shared warm-up/decay schedule (`warmup_decay_lr`, the
same as `algos.config.make_optimizer`'s); with one iteration this is exactly the paper's per-step
schedule (with a non-zero first step), and it needs no advance knowledge of how many pairs later
iterations will yield.

``sample_from="policy"`` makes it iterative/online DPO+: each iteration's pairs are sampled from
the current policy (``ctx.sampler``); ``refresh_reference=True`` additionally resets π_ref to the
current policy at the start of each iteration (each round is then DPO+ against the previous
round's model). The number of rounds is the run's ``iterations``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from algos import core
from algos.config import OptimConfig, SamplingConfig, warmup_decay_factor, with_fields
from algos.models.policy import batch_sequences, response_logprobs
from algos.rollout import Episode, collect_episodes, episode_metrics
from algos.samplers.base import Sampler
from algos.samplers.hf import HFSampler
from algos.training.checks import (check_at_least, check_finite, check_interval, check_non_negative, check_positive,
                                   check_types)
from algos.training.context import TrainContext


@dataclass
class DPOPlusConfig:
    """DPO+ hyperparameters. Defaults are the VinePPO paper's (McGill-NLP/VinePPO configs
    ``polIter_*_dpo_positive_GSM8K``); `cpu_tiny` is a small CPU setting for the offline tiny model."""

    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(samples_per_prompt=64))
    """Problems per iteration (the paper samples the whole train set in one round: set
    prompts_per_iteration to at least the train-split size and run one iteration to reproduce that
    literally) and solutions per problem (paper: 64)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=3, minibatch_size=64))
    """AdamW and schedule over each iteration's pairs (minibatch_size: pairs per optimiser step)."""
    beta: float = 0.3
    """β of the DPO+ loss: 0.3 for GSM8K, 0.1 for MATH in the paper's configs."""
    lam: float = 50.0
    """λ of the DPO+ positive penalty, inside the β bracket (0 gives plain DPO)."""
    reward_threshold: float = 0.5
    """A response with reward ≥ this is correct (chosen); below it, incorrect (rejected)."""
    max_pairs_per_problem: int | None = 64
    """Most (correct, incorrect) pairs per problem, drawn at random without replacement from all
    of them; None keeps every pair."""
    sample_from: Literal["reference", "policy"] = "reference"
    """'reference': pairs are sampled from the frozen starting (SFT) model, offline as in the
    paper; 'policy': from the current policy each iteration (iterative/online DPO+)."""
    refresh_reference: bool = False
    """With sample_from='policy': set π_ref to the current policy at the start of each iteration."""

    def __post_init__(self) -> None:
        """Raises TypeError / ValueError naming ``DPOPlusConfig.<field>`` (see `algos.training.checks`)."""
        check_types(self)
        check_finite(self)
        check_positive(self, ("beta",))
        check_non_negative(self, ("lam",))
        # rewards are graded 0/1: a threshold <= 0 calls every response correct, > 1 none (no pairs either way)
        check_interval(self, "reward_threshold", 0, 1, low_open=True)
        check_at_least(self, "max_pairs_per_problem", 1)
        if self.refresh_reference and self.sample_from != "policy":
            raise ValueError("DPOPlusConfig.refresh_reference: expected False unless sample_from='policy' (only then "
                             f"is there a policy to refresh π_ref from), got True with sample_from={self.sample_from!r}")

    @classmethod
    def cpu_tiny(cls) -> "DPOPlusConfig":
        """Small setting for the offline tiny model on a 2-core CPU (not the paper's)."""
        return with_fields(cls(), prompts_per_iteration=8, samples_per_prompt=8, max_new_tokens=200,
                           max_pairs_per_problem=16, minibatch_size=16, micro_batch_size=8, learning_rate=1e-5)


def build_pairs(episodes: Sequence[Episode], reward_threshold: float, max_pairs_per_problem: int | None,
                seed: int) -> list[tuple[int, int]]:
    """Preference pairs ``(chosen, rejected)`` as indices into ``episodes``.

    Episodes are grouped by problem id (in order of first appearance). Within a problem, every
    response with reward ≥ ``reward_threshold`` is paired with every response below it; when there
    are more than ``max_pairs_per_problem`` such pairs, that many are drawn uniformly without
    replacement (one numpy generator seeded with ``seed``, used problem by problem; the drawn pairs
    are kept in candidate order). Problems with no correct or no incorrect response, and empty
    responses, contribute nothing (McGill-NLP/VinePPO math_dpo_positive_episode_generator.py).
    """
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(episodes):
        if len(e.response_ids) > 0:
            groups.setdefault(e.state.problem.id, []).append(i)
    rng = np.random.default_rng(seed)
    pairs: list[tuple[int, int]] = []
    for members in groups.values():
        correct = [i for i in members if episodes[i].reward >= reward_threshold]
        wrong = [i for i in members if episodes[i].reward < reward_threshold]
        candidates = [(c, w) for c in correct for w in wrong]
        if max_pairs_per_problem is not None and len(candidates) > max_pairs_per_problem:
            keep = np.sort(rng.choice(len(candidates), size=max_pairs_per_problem, replace=False))
            candidates = [candidates[k] for k in keep]
        pairs.extend(candidates)
    return pairs


def warmup_decay_lr(peak: float, warmup_ratio: float, step: int, total_steps: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total_steps``: ``peak`` times
    `algos.config.warmup_decay_factor` with ``ceil(warmup_ratio · total_steps)`` warm-up steps, i.e.
    exactly the schedule `algos.config.make_optimizer` gives the other algorithms (the first step is
    at a non-zero rate; 0 after the last)."""
    total = max(int(total_steps), 1)
    return peak * warmup_decay_factor(step, math.ceil(warmup_ratio * total), total)


def sequence_logprobs(model, episodes: Sequence[Episode], temperature: float, pad_token_id: int) -> torch.Tensor:
    """(B,) log π(response | prompt) of each episode: the sum of its response tokens' log-probs
    (EOS included when present) under softmax(logits / temperature). Differentiable."""
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], pad_token_id)
    return response_logprobs(model, batch, temperature).float().sum(dim=-1)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class DPOPlus:
    """DPO+ on correct/incorrect pairs of sampled solutions (see the module docstring).

    Args:
        config: hyperparameters.
        ctx: the trainer's context; ``ctx.policy`` is trained, ``ctx.reference`` is π_ref.
        total_iterations: iterations in the run (for the learning-rate schedule).
        reference_sampler: sampler over ``ctx.reference`` used when ``sample_from='reference'``;
            default: an `HFSampler` over ``ctx.reference`` with ``ctx.sampler``'s batch size and
            context limit (as the trainer builds its own sampler).
    """

    name = "dpo_plus"

    def __init__(self, config: DPOPlusConfig, ctx: TrainContext, total_iterations: int,
                 reference_sampler: Sampler | None = None) -> None:
        self.config = config
        self.ctx = ctx
        self.total_iterations = max(int(total_iterations), 1)
        self.optimizer = torch.optim.AdamW(ctx.policy.parameters(), lr=config.optim.learning_rate, betas=(0.9, 0.999),
                                           eps=1e-8, weight_decay=config.optim.weight_decay)
        self._reference_sampler = reference_sampler

    def state_dict(self) -> dict:
        """What a resumable checkpoint needs besides the policy: the optimiser state (its learning
        rate is recomputed from the iteration), and π_ref when it is refreshed from the policy."""
        state = {"optimizer": self.optimizer.state_dict()}
        if self.config.refresh_reference:
            state["reference"] = self.ctx.reference.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if "reference" in state:
            self.ctx.reference.load_state_dict(state["reference"])

    @property
    def reference_sampler(self) -> Sampler:
        """The sampler over the frozen reference (built on first use): the same class as the
        trainer's sampler when that is an in-process one (fast or HF), else an `HFSampler`."""
        if self._reference_sampler is None:
            from algos.samplers.prefix_sharing import PrefixSharingSampler

            ctx = self.ctx
            cls = type(ctx.sampler) if isinstance(ctx.sampler, (HFSampler, PrefixSharingSampler)) else HFSampler
            self._reference_sampler = cls(
                ctx.reference, ctx.tokenizer, max_batch_size=getattr(ctx.sampler, "max_batch_size", 64),
                max_context=getattr(ctx.sampler, "max_context", None),
            )
        return self._reference_sampler

    def iteration(self, problems: Sequence, iteration: int) -> dict[str, float]:
        cfg, ctx = self.config, self.ctx
        t0 = time.perf_counter()
        if cfg.refresh_reference:
            ctx.reference.load_state_dict(ctx.policy.state_dict())
        sampler = self.reference_sampler if cfg.sample_from == "reference" else ctx.sampler
        timings: dict[str, float] = {}
        episodes = collect_episodes(ctx.env, sampler, problems, cfg.sampling.params(cfg.sampling.samples_per_prompt, ctx.task.stop_strings),
                                    seed=ctx.seed_for(iteration, "episodes"), timings=timings)
        pairs = build_pairs(episodes, cfg.reward_threshold, cfg.max_pairs_per_problem,
                            seed=ctx.seed_for(iteration, "pairs"))
        t1 = time.perf_counter()
        ref_seq = self._reference_logprobs(episodes, pairs)
        t2 = time.perf_counter()
        update = self._update(episodes, pairs, ref_seq, iteration)
        if update["optimizer_steps"] > 0:
            ctx.sampler.update_weights(ctx.policy)
        t3 = time.perf_counter()

        metrics = episode_metrics(episodes)
        metrics.update({
            "dpo/pairs": float(len(pairs)),
            "dpo/problems_with_pairs": float(len({episodes[c].state.problem.id for c, _ in pairs})),
            "time/sampling": timings.get("generate", 0.0),
            "time/grading": timings.get("env", 0.0),
            "time/reference_logprobs": t2 - t1,
            "time/update": t3 - t2,
            "time/iteration": t3 - t0,
        })
        for key in ("reward_accuracy", "margin", "chosen_logratio", "rejected_logratio", "positive_penalty",
                    "penalty_active"):
            metrics[f"dpo/{key}"] = update.pop(key)
        metrics.update({f"update/{k}": v for k, v in update.items()})
        return metrics

    @torch.no_grad()
    def _reference_logprobs(self, episodes: Sequence[Episode], pairs: list[tuple[int, int]]) -> dict[int, float]:
        """log π_ref(response) of every episode used by a pair, computed once per iteration."""
        cfg, ctx = self.config, self.ctx
        used = sorted({i for pair in pairs for i in pair})
        out: dict[int, float] = {}
        for part in _chunks(used, 2 * cfg.optim.micro_batch_size):
            values = sequence_logprobs(ctx.reference, [episodes[i] for i in part], cfg.sampling.temperature, ctx.pad_token_id)
            out.update(zip(part, values.tolist()))
        return out

    def _update(self, episodes: Sequence[Episode], pairs: list[tuple[int, int]], ref_seq: dict[int, float],
                iteration: int) -> dict[str, float]:
        """``epochs`` shuffled passes over the pairs, one optimiser step per ``minibatch_size`` pairs.

        Returns means over every pair visit (measured in the forward pass before that step's
        update) of the loss and the DPO statistics, the mean pre-clip gradient norm, the number of
        optimiser steps and of batches skipped for a non-finite loss or gradient, and the last
        learning rate used.
        """
        cfg, ctx = self.config, self.ctx
        policy = ctx.policy
        nan = float("nan")
        stats = {k: 0.0 for k in ("loss", "reward_accuracy", "margin", "chosen_logratio", "rejected_logratio",
                                  "positive_penalty", "penalty_active")}
        visits, grad_norms, nonfinite = 0, [], 0
        steps_per_epoch = -(-len(pairs) // cfg.optim.minibatch_size)
        total = cfg.optim.epochs * steps_per_epoch
        # the run's schedule as if every iteration took this one's number of steps (see the module docstring)
        run_steps = max(total, 1) * self.total_iterations
        lr = warmup_decay_lr(cfg.optim.learning_rate, cfg.optim.warmup_ratio, iteration * max(total, 1), run_steps)
        step = 0
        if pairs:
            policy.train()
            for _ in range(cfg.optim.epochs):
                order = torch.randperm(len(pairs), generator=ctx.generator).tolist()
                for batch_rows in _chunks(order, cfg.optim.minibatch_size):
                    lr = warmup_decay_lr(cfg.optim.learning_rate, cfg.optim.warmup_ratio,
                                         iteration * total + step, run_steps)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    step += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    sums = {k: 0.0 for k in stats}
                    for micro in _chunks(batch_rows, cfg.optim.micro_batch_size):
                        micro_pairs = [pairs[r] for r in micro]
                        unique = sorted({i for pair in micro_pairs for i in pair})
                        where = {i: j for j, i in enumerate(unique)}
                        seq = sequence_logprobs(policy, [episodes[i] for i in unique], cfg.sampling.temperature,
                                                ctx.pad_token_id)
                        chosen = seq[[where[c] for c, _ in micro_pairs]]
                        rejected = seq[[where[r] for _, r in micro_pairs]]
                        ref_c = chosen.new_tensor([ref_seq[c] for c, _ in micro_pairs])
                        ref_r = chosen.new_tensor([ref_seq[r] for _, r in micro_pairs])
                        loss, margin = core.dpo_positive_loss(chosen, rejected, ref_c, ref_r, cfg.beta, cfg.lam)
                        (loss.sum() / len(batch_rows)).backward()
                        with torch.no_grad():
                            delta_w, delta_l = chosen - ref_c, rejected - ref_r
                            sums["loss"] += loss.sum().item()
                            sums["reward_accuracy"] += (margin > 0).float().sum().item()
                            sums["margin"] += margin.sum().item()
                            sums["chosen_logratio"] += delta_w.sum().item()
                            sums["rejected_logratio"] += delta_l.sum().item()
                            sums["positive_penalty"] += torch.clamp(-delta_w, min=0).sum().item()
                            sums["penalty_active"] += (delta_w < 0).float().sum().item()
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.grad_clip))
                    if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
                        self.optimizer.zero_grad(set_to_none=True)
                        nonfinite += 1
                        continue
                    self.optimizer.step()
                    grad_norms.append(grad_norm)
                    visits += len(batch_rows)
                    for k, v in sums.items():
                        stats[k] += v
            self.optimizer.zero_grad(set_to_none=True)
            policy.eval()
        out = {k: (v / visits if visits else nan) for k, v in stats.items()}
        out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else nan
        out["optimizer_steps"] = float(len(grad_norms))
        out["nonfinite_minibatches"] = float(nonfinite)
        out["lr"] = lr
        return out
