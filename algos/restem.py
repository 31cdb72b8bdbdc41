"""ReST-EM (Singh et al., "Beyond Human Data: Scaling Self-Training for Problem-Solving with
Language Models", arXiv 2312.06585) as the VinePPO paper's baseline.

One round (one trainer iteration):

1. **E-step**: sample N solutions per problem from the current policy π_{i−1} (π_0 = the SFT model).
2. **Filter**: keep the solutions with reward ≥ 1.0, at most M per problem (the first M in sampling
   order, as the VinePPO code keeps them).
3. **M-step**: fine-tune **from the base (reference) weights**, with a fresh optimiser, on this
   round's kept solutions only: per-sequence token-mean NLL of the response tokens (EOS included),
   averaged over the batch; AdamW, linear warm-up then linear decay to 0 over
   ``epochs · ceil(kept / minibatch_size)`` steps, grad clip.
4. **Checkpoint selection**: the checkpoints at step 0, every ``eval_every_steps`` steps and at the
   end are evaluated on validation problems, in order; the walk stops at the first checkpoint that
   does not improve on the previous one (`select_checkpoint`, the code's
   ``early_stop_method='restem_paper_original'``). Training stops there too (later checkpoints can
   never be chosen), and the chosen checkpoint becomes the policy that samples the next round.

As in McGill-NLP/VinePPO (``trainers/restem_trainer.py``, ``episode_generators/math_restem_episode_generator.py``,
``configs/polIter_*_restem_*.jsonnet``): N = 8 at T 0.6 / top_p 0.9, M = 10 (never binding with
N = 8), 8 epochs at lr 1e-6, batch 64, 3% warm-up; validation with 16 samples at T 0.35; the NLL's
log-probs divide the logits by the sampling temperature (the code's ``_forward_pass_actor``); the
start checkpoint (the base model) counts in the walk, so a round whose first checkpoint is no
better than the base keeps the base model.

Choices of this implementation:

- The M-step trains on the **exact sampled token ids** (prompt ids + response ids, EOS appended
  only to finished responses, by the environment), not on re-tokenised text, so what is imitated
  is exactly what was sampled and graded.
- Validation uses the first ``validation_problems`` problems of the task's ``validation`` split
  (GSM8K: the 373 held out by VinePPO; MATH: 500) with one fixed seed for every checkpoint of every
  round (common random numbers, like the code's fixed seed). The base model's accuracy is measured
  once per run and reused.
- ``update/optimizer_steps`` counts the optimiser steps actually run in the round (up to the first
  non-improving checkpoint, or all of them); ``restem/selected_step`` is the step of the chosen
  checkpoint.
- A round with no kept solution fine-tunes on nothing: the policy becomes the base model.
- ``prompts_per_iteration`` defaults to more problems than any task's train split has, so that
  (through the trainer's ``min(count, split size)``) every round samples the whole train split, as
  the paper does; one trainer iteration is one round (the paper runs 10).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from algos.config import OptimConfig, SamplingConfig, with_fields
from algos.models.policy import batch_sequences, response_logprobs
from algos.rollout import Episode, collect_episodes, episode_metrics
from algos.training.checks import (check_at_least, check_finite, check_interval, check_non_negative, check_positive,
                                   check_top_p, check_types)
from algos.training.context import TrainContext
from algos.training.evaluation import evaluate
from langenv.env import LanguageEnv

EarlyStopMethod = Literal["restem_paper_original", "choose_best", "last"]


@dataclass
class RestEMConfig:
    """ReST-EM hyperparameters. Defaults are the VinePPO paper's (McGill-NLP/VinePPO configs
    ``polIter_*_restem_*``); `cpu_tiny` is a small CPU setting for the offline tiny model."""

    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(prompts_per_iteration=100_000))
    """The E-step: problems per round (the trainer takes min(this, train-split size), so the default
    samples the whole train split every round, as the paper does) and N solutions per problem;
    max_new_tokens also bounds validation responses."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=8, minibatch_size=64))
    """The M-step: a fresh AdamW every round; epochs is the most passes over the kept solutions
    (training stops earlier at the first non-improving checkpoint); warmup_ratio is a fraction of an
    M-step's planned steps."""
    reward_threshold: float = 1.0
    """Keep a solution if its reward is ≥ this."""
    max_per_problem: int | None = 10
    """M: most kept solutions per problem (the first M in sampling order); None: no cap."""
    eval_every_steps: int = 500
    """Evaluate a checkpoint every this many optimiser steps (also at step 0 and at the end)."""
    validation_problems: int = 500
    """First this many problems of the validation split (0: all of it)."""
    validation_samples: int = 16
    """Samples per validation problem; accuracy is the mean correct fraction."""
    validation_temperature: float = 0.35
    """Validation sampling temperature (0: greedy)."""
    validation_top_p: float = 0.9
    """Validation nucleus mass."""
    early_stop_method: EarlyStopMethod = "restem_paper_original"
    """'restem_paper_original': walk the checkpoints in order, stop at the first that does not
    improve; 'choose_best': the first checkpoint with the highest accuracy (all are evaluated); 'last': the final checkpoint, no selection."""

    def __post_init__(self) -> None:
        """Raises TypeError / ValueError naming ``RestEMConfig.<field>`` (see `algos.training.checks`);
        ``early_stop_method`` must be one of `EarlyStopMethod` (checked with the types)."""
        check_types(self)
        check_finite(self)
        check_positive(self, ("eval_every_steps", "validation_samples"))
        check_top_p(self, ("validation_top_p",))
        check_non_negative(self, ("validation_temperature", "validation_problems"))
        # rewards are graded 0/1: a threshold <= 0 would keep wrong solutions, > 1 would keep none
        check_interval(self, "reward_threshold", 0, 1, low_open=True)
        check_at_least(self, "max_per_problem", 1)

    @classmethod
    def cpu_tiny(cls) -> "RestEMConfig":
        """Small setting for the offline tiny model on a 2-core CPU (not the paper's)."""
        return with_fields(cls(), prompts_per_iteration=8, samples_per_prompt=8, max_new_tokens=200, epochs=8,
                           minibatch_size=8, micro_batch_size=8, learning_rate=1e-5, eval_every_steps=4,
                           validation_problems=32, validation_samples=1, validation_temperature=0.0)


def filter_kept(episodes: Sequence[Episode], reward_threshold: float, max_per_problem: int | None) -> list[Episode]:
    """The E-step's kept solutions: reward ≥ ``reward_threshold``, at most ``max_per_problem`` per
    problem (the first ones in sampling order), in sampling order."""
    counts: dict[str, int] = {}
    kept = []
    for e in episodes:
        if e.reward < reward_threshold or len(e.response_ids) == 0:
            continue
        pid = e.state.problem.id
        if max_per_problem is not None and counts.get(pid, 0) >= max_per_problem:
            continue
        counts[pid] = counts.get(pid, 0) + 1
        kept.append(e)
    return kept


def select_checkpoint(accuracies: Sequence[float], method: EarlyStopMethod = "restem_paper_original") -> int:
    """Index of the chosen checkpoint given the validation accuracies of the checkpoints in order.

    'restem_paper_original' walks forward while each accuracy is strictly higher than the previous
    one and returns the last checkpoint before the first drop (or tie): [0.2, 0.3, 0.25, 0.4] → 1,
    an increasing list → its last index. 'choose_best' returns the first index of the maximum.
    'last' always returns the final checkpoint (no selection).
    (McGill-NLP/VinePPO trainers/restem_trainer.py ``evaluate_checkpoints``.)

    Raises:
        ValueError: on an empty list or an unknown method.
    """
    if not accuracies:
        raise ValueError("accuracies: expected at least one checkpoint, got none")
    if method == "restem_paper_original":
        chosen = 0
        for i in range(1, len(accuracies)):
            if accuracies[i] > accuracies[i - 1]:
                chosen = i
            else:
                break
        return chosen
    if method == "choose_best":
        best = 0
        for i in range(1, len(accuracies)):
            if accuracies[i] > accuracies[best]:
                best = i
        return best
    if method == "last":
        return len(accuracies) - 1
    raise ValueError(f"method: expected 'restem_paper_original', 'choose_best' or 'last', got {method!r}")


def nll_loss(model, episodes: Sequence[Episode], temperature: float, pad_token_id: int) -> torch.Tensor:
    """(B,) per-sequence token-mean negative log-likelihood of each episode's response tokens (EOS
    included when present) under softmax(logits / temperature). Differentiable."""
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], pad_token_id)
    logp = response_logprobs(model, batch, temperature).float()
    lengths = batch["response_lengths"].to(logp.device).clamp(min=1)
    return -logp.sum(dim=-1) / lengths


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class RestEM:
    """ReST-EM rounds (see the module docstring).

    Args:
        config: hyperparameters.
        ctx: the trainer's context; ``ctx.policy`` is overwritten each round (reset to
            ``ctx.reference``, then fine-tuned); ``ctx.reference`` holds the base weights.
        total_iterations: unused (each M-step has its own schedule); part of the interface.
        validation_env: environment over the validation problems; default: the task's
            ``validation`` split with the training environment's context limit.
    """

    name = "restem"

    def __init__(self, config: RestEMConfig, ctx: TrainContext, total_iterations: int,
                 validation_env: LanguageEnv | None = None) -> None:
        self.config = config
        self.ctx = ctx
        self.total_iterations = total_iterations
        self._validation_env = validation_env
        self._base_validation: dict[str, float] | None = None

    def state_dict(self) -> dict:
        """What a resumable checkpoint needs besides the policy (each M-step builds a fresh
        optimiser from the base weights): the cached validation result of the base model."""
        return {"base_validation": self._base_validation}

    def load_state_dict(self, state: dict) -> None:
        self._base_validation = state["base_validation"]

    @property
    def validation_env(self) -> LanguageEnv:
        if self._validation_env is None:
            ctx = self.ctx
            self._validation_env = LanguageEnv(ctx.task, ctx.tokenizer, split="validation",
                                               max_new_tokens=self.config.sampling.max_new_tokens,
                                               max_context=getattr(ctx.env, "max_context", None))
        return self._validation_env

    def validate(self) -> dict[str, float]:
        """Validation accuracy of ``ctx.policy`` (through ``ctx.sampler``, whose weights must be
        current) and the number of tokens sampled: ``{"accuracy", "tokens"}``."""
        cfg, ctx = self.config, self.ctx
        env = self.validation_env
        problems = env.problems[: cfg.validation_problems or None]
        res = evaluate(env, ctx.sampler, problems, cfg.validation_samples, cfg.validation_temperature,
                       cfg.validation_top_p, cfg.sampling.max_new_tokens, seed=ctx.seed_for(0, "restem-validation"))
        tokens = res["eval/response_tokens"] * len(problems) * cfg.validation_samples
        return {"accuracy": res["eval/accuracy"], "tokens": float(tokens)}

    def iteration(self, problems: Sequence, iteration: int) -> dict[str, float]:
        cfg, ctx = self.config, self.ctx
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        episodes = collect_episodes(ctx.env, ctx.sampler, problems, cfg.sampling.params(cfg.sampling.samples_per_prompt, ctx.task.stop_strings),
                                    seed=ctx.seed_for(iteration, "episodes"), timings=timings)
        kept = filter_kept(episodes, cfg.reward_threshold, cfg.max_per_problem)
        t1 = time.perf_counter()
        m = self.m_step(kept)
        t2 = time.perf_counter()
        metrics = episode_metrics(episodes)
        metrics.update({
            "restem/kept": float(len(kept)),
            "restem/problems_with_kept": float(len({e.state.problem.id for e in kept})),
            "restem/selected_step": m["selected_step"],
            "restem/validation_accuracy": m["validation_accuracy"],
            "restem/validation_accuracy_start": m["validation_accuracy_start"],
            "restem/validation_accuracy_last": m["validation_accuracy_last"],
            "restem/validation_step_last": m["validation_step_last"],
            "restem/checkpoints_evaluated": m["checkpoints_evaluated"],
            "tokens/validation": m["validation_tokens"],
            "update/optimizer_steps": m["optimizer_steps"],
            "update/planned_steps": m["planned_steps"],
            "update/loss": m["loss"],
            "update/grad_norm": m["grad_norm"],
            "update/lr": m["lr"],
            "update/nonfinite_minibatches": m["nonfinite"],
            "time/sampling": timings.get("generate", 0.0),
            "time/grading": timings.get("env", 0.0),
            "time/validation": m["validation_time"],
            "time/update": (t2 - t1) - m["validation_time"],
            "time/iteration": t2 - t0,
        })
        return metrics

    def _checkpoint_accuracy(self, step: int, stats: dict[str, float]) -> float:
        """Validation accuracy of the current policy at ``step`` (the base model's is cached)."""
        t = time.perf_counter()
        if step == 0 and self._base_validation is not None:
            return self._base_validation["accuracy"]
        self.ctx.sampler.update_weights(self.ctx.policy)
        res = self.validate()
        if step == 0:
            self._base_validation = res
        stats["validation_tokens"] += res["tokens"]
        stats["validation_time"] += time.perf_counter() - t
        stats["checkpoints_evaluated"] += 1
        return res["accuracy"]

    def m_step(self, kept: Sequence[Episode]) -> dict[str, float]:
        """Fine-tune from the base weights on ``kept`` with checkpoint selection; leaves the chosen
        checkpoint in ``ctx.policy`` (and the sampler)."""
        cfg, ctx = self.config, self.ctx
        policy = ctx.policy
        policy.load_state_dict(ctx.reference.state_dict())  # the M-step starts from the base weights
        stats = {"validation_tokens": 0.0, "validation_time": 0.0, "checkpoints_evaluated": 0.0}
        accuracies = [self._checkpoint_accuracy(0, stats)]
        steps = [0]
        chosen_state: dict[str, torch.Tensor] | None = None  # None: the base weights
        planned = cfg.optim.epochs * -(-len(kept) // cfg.optim.minibatch_size)
        losses, grad_norms, nonfinite, step, lr = [], [], 0, 0, 0.0
        if kept:
            optimizer, scheduler = cfg.optim.build(policy, total_steps=planned)
            stop = False
            policy.train()
            for _ in range(cfg.optim.epochs):
                order = torch.randperm(len(kept), generator=ctx.generator).tolist()
                for batch_rows in _chunks(order, cfg.optim.minibatch_size):
                    lr = scheduler.get_last_lr()[0]
                    optimizer.zero_grad(set_to_none=True)
                    loss_sum = 0.0
                    for micro in _chunks(batch_rows, cfg.optim.micro_batch_size):
                        per_seq = nll_loss(policy, [kept[i] for i in micro], cfg.sampling.temperature, ctx.pad_token_id)
                        loss = per_seq.sum() / len(batch_rows)
                        loss.backward()
                        loss_sum += loss.item()
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.grad_clip))
                    step += 1
                    if math.isfinite(loss_sum) and math.isfinite(grad_norm):
                        optimizer.step()
                        losses.append(loss_sum)
                        grad_norms.append(grad_norm)
                    else:
                        nonfinite += 1
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    if step % cfg.eval_every_steps == 0 or step == planned:
                        policy.eval()
                        accuracies.append(self._checkpoint_accuracy(step, stats))
                        steps.append(step)
                        policy.train()
                        chosen = select_checkpoint(accuracies, cfg.early_stop_method)
                        if chosen == len(accuracies) - 1:
                            chosen_state = _snapshot(policy)
                        elif cfg.early_stop_method == "restem_paper_original":
                            stop = True  # later checkpoints can never be chosen
                            break
                if stop:
                    break
            policy.eval()
            del optimizer, scheduler
        chosen = select_checkpoint(accuracies, cfg.early_stop_method)
        policy.load_state_dict(chosen_state if chosen_state is not None else ctx.reference.state_dict())
        ctx.sampler.update_weights(policy)
        nan = float("nan")
        return {
            "selected_step": float(steps[chosen]),
            "validation_accuracy": accuracies[chosen],
            "validation_accuracy_start": accuracies[0],
            # the last checkpoint evaluated: with the paper's walk, the one that ended it
            "validation_accuracy_last": accuracies[-1],
            "validation_step_last": float(steps[-1]),
            "optimizer_steps": float(len(losses)),
            "planned_steps": float(planned),
            "loss": sum(losses) / len(losses) if losses else nan,
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else nan,
            "lr": lr,
            "nonfinite": float(nonfinite),
            **stats,
        }
