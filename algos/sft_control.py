"""The supervised control: spend an RL run's budget on more SFT instead.

A comparison of RL algorithms should show that they beat simply continuing the warm start. This
"algorithm" takes the same prompts per iteration as the others and fine-tunes on the task's
reference solutions of those problems (no sampling, no reward): ``epochs`` shuffled passes cut into
mini-batches of ``minibatch_size`` (`algos.config.OptimConfig`), one AdamW step each, on the
per-sequence token-mean NLL of the response tokens and EOS, averaged over the
batch (VinePPO's SFT loss, as `algos.models.sft.train_sft`). Tokenisation is the environment's: the prompt
ids of `LanguageEnv.initial_state` and ``tokenizer(target, add_special_tokens=False) + [EOS]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from algos import core
from algos.config import OptimConfig, SamplingConfig, load_optimizer_state, optimizer_state, with_fields
from algos.models.policy import batch_sequences, response_logprobs
from algos.training.checks import check_types
from algos.training.context import TrainContext


@dataclass
class SFTControlConfig:
    """Continued SFT on reference solutions, sized like an RL run: the same problems per iteration
    and the same optimiser settings (learning rate, schedule, mini-batch, epochs)."""

    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(samples_per_prompt=1))
    """prompts_per_iteration: problems whose reference solutions are trained on per iteration;
    samples_per_prompt: copies of each reference solution in the iteration's examples, so that with
    the RL run's G, --minibatch-size, --epochs and --learning-rate the control takes the same number
    of optimiser steps of the same size and learning rate (the fair control; 1 by default);
    temperature, top_p and max_new_tokens: the trainer's sampled evaluation (no effect on training)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=1e-5, epochs=1,
                                                                   minibatch_size=32, micro_batch_size=16))
    """AdamW and schedule; each epoch cuts the iteration's reference solutions, shuffled, into
    mini-batches of minibatch_size (one optimiser step each)."""

    def __post_init__(self) -> None:
        """Raises TypeError naming ``SFTControlConfig.<field>`` (see `algos.training.checks`)."""
        check_types(self)

    @classmethod
    def cpu_tiny(cls) -> "SFTControlConfig":
        return with_fields(cls(), prompts_per_iteration=8, minibatch_size=8, micro_batch_size=8, max_new_tokens=200)


class SFTControl:
    """Continued supervised fine-tuning on the reference solutions of each iteration's problems."""

    name = "sft"

    def __init__(self, config: SFTControlConfig, ctx: TrainContext, total_iterations: int) -> None:
        self.config = config
        self.ctx = ctx
        examples = config.sampling.prompts_per_iteration * config.sampling.samples_per_prompt
        self.optimizer, self.scheduler = config.optim.build(
            ctx.policy, config.optim.steps_per_iteration(examples) * total_iterations)

    def state_dict(self) -> dict:
        """What a resumable checkpoint needs besides the policy: optimiser and LR-schedule states."""
        return optimizer_state(self.optimizer, self.scheduler)

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(self.optimizer, self.scheduler, state)

    def iteration(self, problems: Sequence, iteration: int) -> dict[str, float]:
        cfg, ctx = self.config, self.ctx
        t0 = time.perf_counter()
        tok = ctx.tokenizer
        copies = cfg.sampling.samples_per_prompt  # each reference solution this many times, as G samples
        prompts = [ctx.env.initial_state(p).prompt_ids for p in problems for _ in range(copies)]
        responses = [tok(ctx.task.target(p), add_special_tokens=False).input_ids + [tok.eos_token_id]
                     for p in problems for _ in range(copies)]
        batches = []
        for _ in range(cfg.optim.epochs):  # each epoch: a fresh shuffle cut into mini-batches
            order = torch.randperm(len(prompts), generator=ctx.generator).tolist()
            batches += [order[i:i + cfg.optim.minibatch_size] for i in range(0, len(order), cfg.optim.minibatch_size)]
        ctx.policy.train()
        losses, norms = [], []
        for rows in batches:
            if not rows:
                continue
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for m in range(0, len(rows), cfg.optim.micro_batch_size):
                part = rows[m:m + cfg.optim.micro_batch_size]
                batch = batch_sequences([prompts[i] for i in part], [responses[i] for i in part], ctx.pad_token_id)
                mask = batch["response_mask"].float()
                logp = response_logprobs(ctx.policy, batch, 1.0).float()
                loss = -core.masked_mean(logp, mask, dim=1).sum() / len(rows)
                loss.backward()
                loss_sum += loss.item()
            norms.append(float(torch.nn.utils.clip_grad_norm_(ctx.policy.parameters(), cfg.optim.grad_clip)))
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
