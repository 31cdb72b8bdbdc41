"""The supervised control: spend an RL run's budget on more SFT instead.

A comparison of RL algorithms should show that they beat simply continuing the warm start. This
"algorithm" takes the same prompts per iteration as the others and fine-tunes on the task's
reference solutions of those problems (no sampling, no reward): ``steps_per_iteration`` AdamW steps
per iteration on the per-sequence token-mean NLL of the response tokens and EOS, averaged over the
batch (VinePPO's SFT loss, as `algos.models.sft.train_sft`). Tokenisation is the environment's: the prompt
ids of `LanguageEnv.initial_state` and ``tokenizer(target, add_special_tokens=False) + [EOS]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from algos import core
from algos.config import make_optimizer
from algos.models.policy import batch_sequences, response_logprobs
from algos.training.checks import (check_at_most, check_finite, check_fraction, check_non_negative, check_positive,
                                   check_top_p, check_types)
from algos.training.context import TrainContext


@dataclass
class SFTControlConfig:
    """Continued SFT on reference solutions, sized like an RL run (same prompts per iteration)."""

    prompts_per_iteration: int = 64
    """Problems whose reference solutions are trained on per iteration."""
    steps_per_iteration: int = 2
    """Optimiser steps per iteration (the problems are split into this many batches, cycled)."""
    learning_rate: float = 1e-5
    """AdamW learning rate (peak)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.03
    """Fraction of optimiser steps in linear warm-up, then linear decay to 0."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass."""
    max_new_tokens: int = 1024
    """Evaluation response budget in tokens (the trainer's evaluation uses it)."""
    temperature: float = 0.6
    """Temperature of the trainer's sampled evaluation (no effect on training)."""
    top_p: float = 0.9
    """Nucleus mass of the trainer's sampled evaluation."""

    def __post_init__(self) -> None:
        """Raises TypeError / ValueError naming ``SFTControlConfig.<field>`` (see `algos.training.checks`)."""
        check_types(self)
        check_finite(self)
        check_positive(self, ("prompts_per_iteration", "steps_per_iteration", "learning_rate", "grad_clip",
                              "micro_batch_size", "max_new_tokens", "temperature"))
        check_non_negative(self, ("weight_decay",))
        check_fraction(self, "warmup_ratio")
        check_top_p(self)
        # more steps than problems would leave empty batches while the LR schedule counts them
        check_at_most(self, "steps_per_iteration", "prompts_per_iteration")

    @classmethod
    def cpu_tiny(cls) -> "SFTControlConfig":
        return cls(prompts_per_iteration=8, steps_per_iteration=1, max_new_tokens=200)


class SFTControl:
    """Continued supervised fine-tuning on the reference solutions of each iteration's problems."""

    name = "sft"

    def __init__(self, config: SFTControlConfig, ctx: TrainContext, total_iterations: int) -> None:
        self.config = config
        self.ctx = ctx
        self.optimizer, self.scheduler = make_optimizer(
            ctx.policy, config.learning_rate, config.weight_decay, config.warmup_ratio,
            total_steps=config.steps_per_iteration * total_iterations,
        )

    def state_dict(self) -> dict:
        """What a resumable checkpoint needs besides the policy: optimiser and LR-schedule states."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def iteration(self, problems: Sequence, iteration: int) -> dict[str, float]:
        cfg, ctx = self.config, self.ctx
        t0 = time.perf_counter()
        tok = ctx.tokenizer
        prompts = [ctx.env.initial_state(p).prompt_ids for p in problems]
        responses = [tok(ctx.task.target(p), add_special_tokens=False).input_ids + [tok.eos_token_id] for p in problems]
        order = torch.randperm(len(problems), generator=ctx.generator).tolist()
        batches = [order[i::cfg.steps_per_iteration] for i in range(cfg.steps_per_iteration)]
        ctx.policy.train()
        losses, norms = [], []
        for rows in batches:
            if not rows:
                continue
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for m in range(0, len(rows), cfg.micro_batch_size):
                part = rows[m:m + cfg.micro_batch_size]
                batch = batch_sequences([prompts[i] for i in part], [responses[i] for i in part], ctx.pad_token_id)
                mask = batch["response_mask"].float()
                logp = response_logprobs(ctx.policy, batch, 1.0).float()
                loss = -core.masked_mean(logp, mask, dim=1).sum() / len(rows)
                loss.backward()
                loss_sum += loss.item()
            norms.append(float(torch.nn.utils.clip_grad_norm_(ctx.policy.parameters(), cfg.grad_clip)))
            self.optimizer.step()
            self.scheduler.step()
            losses.append(loss_sum)
        ctx.policy.eval()
        ctx.sampler.update_weights(ctx.policy)
        elapsed = time.perf_counter() - t0
        return {
            "update/loss": sum(losses) / max(len(losses), 1),
            "update/grad_norm": sum(norms) / max(len(norms), 1),
            "update/optimizer_steps": float(len(losses)),
            "update/lr": self.scheduler.get_last_lr()[0],
            "tokens/episodes": 0.0,
            "time/update": elapsed,
            "time/iteration": elapsed,
        }
