"""What the algorithms' Configs share, written once and embedded by each Config.

* `SamplingConfig` (every algorithm): how many problems and samples an iteration draws and how
  (temperature, top-p, response budget). The trainer's sampled evaluation uses it too.
* `OptimConfig` (every algorithm): AdamW, its warm-up/decay schedule, gradient clipping, and how an
  iteration's examples are cut into optimiser steps (epochs, mini-batches, micro-batches).
* `ActorConfig` (the PPO family: VinePPO, PPO, GRPO, RLOO, and the REINFORCE example): the
  policy-gradient loss (a name in `algos.core.POLICY_LOSSES`), its clip range, the KL to the
  reference, advantage whitening, loss aggregation, bf16 autocast and the shared-prompt forward.

Each algorithm's Config holds them as fields ``sampling``, ``optim`` and (PPO family) ``actor``,
with the algorithm's own defaults, plus the fields that are the algorithm's own idea. On the command
line the nesting does not show: ``--learning-rate``, ``--samples-per-prompt``, ``--clip-eps`` (tyro
with ``OmitArgPrefixes``). `with_fields` does the same for Python callers: flat names in, each routed
to the sub-config that owns it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch

from algos.core import POLICY_LOSSES, AggregationMode
from algos.samplers.base import SamplingParams
from algos.training.checks import (
    check_at_most,
    check_finite,
    check_fraction,
    check_non_negative,
    check_positive,
    check_top_p,
    check_types,
)

C = TypeVar("C")


@dataclass
class SamplingConfig:
    """What each iteration samples (VinePPO's defaults: 64 problems x 8 samples at T 0.6, top-p 0.9,
    1,024 new tokens)."""

    prompts_per_iteration: int = 64
    """Distinct problems per iteration (groups, for the group-based algorithms)."""
    samples_per_prompt: int = 8
    """Responses sampled per problem (G, the group size)."""
    temperature: float = 0.6
    """Sampling temperature (> 0); the training log-probs use it too, and so does the trainer's
    sampled evaluation."""
    top_p: float = 0.9
    """Nucleus sampling mass, in (0, 1]."""
    max_new_tokens: int = 1024
    """Response budget in tokens; longer responses are truncated and score 0."""

    def __post_init__(self) -> None:
        """Raises TypeError / ValueError naming ``SamplingConfig.<field>`` (see `algos.training.checks`)."""
        check_types(self)
        check_finite(self)
        check_positive(self, ("prompts_per_iteration", "samples_per_prompt", "max_new_tokens", "temperature"))
        check_top_p(self)

    def params(self, n: int, stop_strings: tuple[str, ...]) -> SamplingParams:
        """The sampler's settings with ``n`` samples per prompt."""
        return SamplingParams(self.temperature, self.top_p, self.max_new_tokens, stop_strings, n)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then linear decay to 0 (DeepSpeed WarmupDecayLR, as the VinePPO
    configs), gradient-norm clipping, and the cut of an iteration's examples into optimiser steps."""

    learning_rate: float = 1e-6
    """Peak AdamW learning rate (after warm-up)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.03
    """Fraction of all optimiser steps spent in linear warm-up, in [0, 1); then linear decay to 0."""
    grad_clip: float = 1.0
    """Gradient-norm clip (> 0)."""
    epochs: int = 1
    """Passes over each iteration's examples."""
    minibatch_size: int = 64
    """Examples (episodes, pairs or sequences) per optimiser step."""
    micro_batch_size: int = 8
    """Examples per forward/backward pass (gradient accumulation within a mini-batch)."""

    def __post_init__(self) -> None:
        """Raises TypeError / ValueError naming ``OptimConfig.<field>`` (see `algos.training.checks`)."""
        check_types(self)
        check_finite(self)
        check_positive(self, ("learning_rate", "grad_clip", "epochs", "minibatch_size", "micro_batch_size"))
        check_non_negative(self, ("weight_decay",))
        check_fraction(self, "warmup_ratio")
        check_at_most(self, "micro_batch_size", "minibatch_size")

    def steps_per_iteration(self, examples: int) -> int:
        """Optimiser steps for ``examples`` examples: ``epochs * ceil(examples / minibatch_size)``."""
        return self.epochs * -(-examples // self.minibatch_size)

    def build(self, model: torch.nn.Module, total_steps: int):
        """AdamW over ``model``'s parameters and its schedule (`make_optimizer`): warm-up over
        ``ceil(warmup_ratio * total_steps)`` steps, the first of them already at a non-zero rate, then
        linear decay to 0 at ``total_steps``. Returns (optimizer, scheduler)."""
        return make_optimizer(model, self.learning_rate, self.weight_decay, self.warmup_ratio, total_steps)


@dataclass
class ActorConfig:
    """The PPO family's policy loss (`algos.actor.actor_update`): the clipped surrogate
    ``min(ρ Â, clip(ρ, 1 − ε, 1 + ε_hi) Â)`` (Schulman et al. 2017, eq. 7; ε_hi from DAPO, arXiv
    2503.14476), a KL to the frozen reference, advantage whitening and loss aggregation."""

    policy_loss: str = "clip"
    """Per-token policy-gradient loss, a name in `algos.core.POLICY_LOSSES`: ``clip`` (PPO's
    clipped surrogate) or ``unclipped`` (−ρ·Â; REINFORCE when on-policy)."""
    clip_eps: float = 0.2
    """PPO clip range ε (ε_lo with clip-higher)."""
    clip_eps_high: float | None = None
    """ε_hi for DAPO's clip-higher (0.28); None uses clip_eps."""
    kl_coef: float = 1e-4
    """β of the KL to the reference (VinePPO, PPO, GRPO: a k3 term in the loss; RLOO: a k1 penalty
    folded into the sequence reward; 0 drops the reference forward pass)."""
    whiten_advantages: bool = True
    """Whiten advantages over each mini-batch's response tokens."""
    aggregation: AggregationMode = "token_mean"
    """How the policy-gradient term is normalised (`algos.core.aggregate`); GRPO applies it to its KL
    term too (VinePPO and PPO keep the paper code's per-sequence token sum for the KL)."""
    permute_advantages: bool = False
    """The null control: permute the advantages within each mini-batch before the update
    (`algos.core.permute_advantages`): the same update size without the signal, so a run with it
    measures drift, and the same run without it minus this one measures learning."""
    bf16_autocast: bool = False
    """Run the policy/reference (and critic) forward passes of the update under bf16 autocast
    (weights, optimiser and loss stay float32). ``cpu_tiny`` turns it on where the CPU has fast bf16
    kernels: 2-3x faster updates on the 2-core AVX512-BF16 machine (experiments/bench/update.py)."""
    share_prompt_forward: bool = True
    """Run each distinct prompt of a micro-batch once, its KV cache shared by the responses to it (a
    group of G samples), in the update's training and π_old / π_ref passes; micro-batches keep a
    prompt's rows together (`algos.models.policy.shared_prompt_logprobs`). Same log-probs and
    gradient up to float rounding; off under ``--sharding fsdp``. ``--no-share-prompt-forward`` runs
    every row's prompt + response in one forward pass, as before."""

    def __post_init__(self) -> None:
        """Raises TypeError / ValueError naming ``ActorConfig.<field>``; ``aggregation`` must be one
        of `algos.core.AggregationMode` (checked with the types)."""
        check_types(self)
        check_finite(self)
        check_positive(self, ("clip_eps",))
        if self.clip_eps_high is not None:
            check_positive(self, ("clip_eps_high",))
        check_non_negative(self, ("kl_coef",))
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"ActorConfig.policy_loss: expected one of {', '.join(map(repr, sorted(POLICY_LOSSES)))}, "
                             f"got {self.policy_loss!r}")


def warmup_decay_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier of optimiser step ``step`` (0-based: the rate the ``step + 1``-th
    update uses) under linear warm-up then linear decay to 0:

        f(s) = (s + 1) / (W + 1)                 for s < W    (warm-up; the first update is not at 0)
        f(s) = max(0, (N − s) / max(1, N − W))   for s >= W   (peak at s = W, 0 at s = N)

    with W = ``warmup_steps`` and N = ``total_steps``. The decay is transformers'
    ``get_linear_schedule_with_warmup``; its warm-up ``s / W`` (and DeepSpeed ``WarmupDecayLR``'s,
    ``log(s + 1) / log(W)`` or ``s / W``, deepspeed/runtime/lr_schedules.py) gives the first update a
    rate of exactly 0, a wasted step; ``(s + 1) / (W + 1)`` is that ramp shifted by one step, so
    step ``W`` still reaches the peak. The last update (s = N − 1) runs at ``1 / (N − W)`` of the
    peak and the rate after it is 0.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def make_optimizer(model, learning_rate: float, weight_decay: float, warmup_ratio: float, total_steps: int,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
    """AdamW with linear warm-up over ``ceil(warmup_ratio * total_steps)`` steps then linear decay
    to 0 at ``total_steps`` (the shape of DeepSpeed WarmupDecayLR, as in the VinePPO configs, but
    with a non-zero first step: `warmup_decay_factor`), as a ``torch.optim.lr_scheduler.LambdaLR``
    stepped once per optimiser step. Returns (optimizer, scheduler)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay)
    total = max(total_steps, 1)
    factor = partial(warmup_decay_factor, warmup_steps=math.ceil(warmup_ratio * total), total_steps=total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler


def optimizer_state(optimizer, scheduler, sharded: bool = False) -> dict:
    """What a resumable checkpoint needs of an optimiser and its LR schedule (``algorithm.pt``); with
    ``--sharding fsdp`` the optimiser's state is in the checkpoint's ``sharded/`` instead (`trainables`)."""
    state = {"scheduler": scheduler.state_dict()}
    if not sharded:
        state["optimizer"] = optimizer.state_dict()
    return state


def load_optimizer_state(optimizer, scheduler, state: dict) -> None:
    """Restore what `optimizer_state` saved (the optimiser only when it was saved there)."""
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def advance_schedule(scheduler, steps: int) -> None:
    """Step ``scheduler`` ``steps`` more times without an optimiser step, for optimiser steps that
    were planned but not taken (e.g. GRPO's dropped groups), so that the schedule still reaches its
    end (lr 0) when the run does. A no-op for ``steps <= 0``. PyTorch's warning about a scheduler
    step before any optimiser step is silenced here: skipping is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        for _ in range(max(0, int(steps))):
            scheduler.step()


def with_fields(config: C, **fields: Any) -> C:
    """A copy of the algorithm Config ``config`` with fields replaced by their flat names, as the
    command line spells them: ``with_fields(GRPOConfig(), learning_rate=3e-5, samples_per_prompt=16,
    kl_coef=0)`` sets ``optim.learning_rate``, ``sampling.samples_per_prompt`` and
    ``actor.kl_coef``. Each sub-config is rebuilt once, so its checks see all the new values together.

    Raises:
        TypeError: a name that neither the Config nor any of its sub-configs has (the message lists
            the valid names).
        ValueError / TypeError: from the rebuilt configs' checks, naming the field by its path:
            ``VinePPOConfig.optim.learning_rate: expected a value > 0, got -1e-06``.
    """
    own = {f.name for f in dataclasses.fields(config)}
    subs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if dataclasses.is_dataclass(getattr(config, f.name))}
    owner = {f.name: sub for sub, value in subs.items() for f in dataclasses.fields(value)}
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, value in fields.items():
        if name in own and name not in subs:
            top[name] = value
        elif name in owner:
            nested.setdefault(owner[name], {})[name] = value
        else:
            valid = sorted((own - set(subs)) | set(owner))
            raise TypeError(f"{type(config).__name__}: unknown field {name!r}; valid: {', '.join(valid)}")
    for sub, values in nested.items():
        try:
            top[sub] = dataclasses.replace(subs[sub], **values)
        except (TypeError, ValueError) as e:  # name the field as the Config holds it
            inner = type(subs[sub]).__name__
            raise type(e)(str(e).replace(f"{inner}.", f"{type(config).__name__}.{sub}.", 1)) from None
    return dataclasses.replace(config, **top)
