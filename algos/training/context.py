"""The contract between the training loop and an algorithm.

An algorithm is a class built as ``Algo(config, ctx, total_iterations)``. Its ``config`` is a
dataclass whose ``sampling`` field is an `algos.config.SamplingConfig` (the loop reads
``prompts_per_iteration`` from it, and the sampled evaluation its temperature, top-p and budget).
The class provides:

* ``iteration(problems, iteration) -> dict[str, float]`` does one iteration's collection and update
  on this process's shard of the iteration's problems and returns its metrics (``update/*``,
  ``time/*``, ``tokens/*`` summed over processes, ``grading/*`` counts, ...);
* optional ``state_dict()`` / ``load_state_dict(state)`` carry what a resumed run needs besides the
  policy (optimiser, LR schedule, critic, ...); optional ``save(path)`` writes extra Hugging Face
  artefacts next to the final policy (PPO's critic);
* ``supports_distributed = True`` allows several processes (the update must then be exact across
  ranks, see `algos.actor`);
* ``trainables() -> {name: (module, optimizer)}`` (needed with ``--sharding fsdp``): the modules the
  algorithm trains and their optimisers. A sharded run saves and restores them with
  ``torch.distributed.checkpoint`` (`algos.training.checkpoint.save_sharded`); its ``state_dict()``
  then leaves them out (``ctx.sharded``) and keeps the rest (LR schedules, baselines). A module the
  algorithm builds itself (PPO's critic) goes through ``ctx.shard(module)`` before its optimiser is
  made.

`TrainContext` is everything it gets from the loop: the task, the training environment, the sampler,
the policy and the frozen reference, the tokenizer, seeds and the data-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from algos.samplers import Sampler
from algos.training.distributed import Dist
from langenv.env import LanguageEnv
from langenv.tasks.base import Task


@dataclass
class TrainContext:
    """What an algorithm gets from the trainer."""

    task: Task
    env: LanguageEnv
    sampler: Sampler
    policy: Any
    reference: Any
    tokenizer: Any
    seed: int
    generator: torch.Generator = field(default_factory=torch.Generator)
    dist: Dist = field(default_factory=Dist)
    """This process's data-parallel group (world size 1 unless launched with accelerate/torchrun)."""
    sharding: str = "none"
    """``"fsdp"`` when the policy and the reference are FSDP2-sharded (``--sharding fsdp``,
    `algos.models.sharding`); ``"none"``: every rank holds whole models."""
    sharding_bf16: bool = False
    """With ``sharding="fsdp"``: FSDP2 mixed precision (bf16 compute, fp32 master weights and
    gradient reduction) for the modules `shard` wraps."""

    @property
    def sharded(self) -> bool:
        """True when the trained modules are FSDP2-sharded."""
        return self.sharding != "none"

    def shard(self, module):
        """``module`` wrapped like the policy (`algos.models.sharding.shard_model`, in place) when the
        run is sharded; ``module`` unchanged otherwise. Collective when sharded."""
        if not self.sharded:
            return module
        from algos.models.sharding import shard_model

        return shard_model(module, bf16=self.sharding_bf16)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def seed_for(self, iteration: int, purpose: str, per_rank: bool = True) -> int:
        """A distinct, reproducible seed per (run seed, iteration, purpose), and per rank when
        several processes train together and ``per_rank`` (False: the same seed on every rank, e.g.
        to initialise weights every rank must share)."""
        ranked = per_rank and self.dist.world_size > 1
        key = [self.seed, iteration, sum(map(ord, purpose))] + ([self.dist.rank] if ranked else [])
        return int(np.random.SeedSequence(key).generate_state(1)[0])


class Algorithm(Protocol):
    """What the loop calls (see the module docstring for the optional hooks)."""

    name: str

    def iteration(self, problems: Sequence, iteration: int) -> dict[str, float]: ...
