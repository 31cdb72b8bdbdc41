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
  ranks, see `algos.actor`).

`TrainContext` is everything it gets from the loop: the task, the training environment, the sampler,
the policy and the frozen reference, the tokenizer, seeds and the data-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

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
    cache_dir: Path | None = None
    """The run's cache directory (`RunConfig.cache_dir`), for artefacts shared across runs such as
    VC-PPO's pretrained critic; None: nothing is cached."""
    advantage_observers: list[Callable[..., None]] = field(default_factory=list)
    """Plug-ins that look at the advantages an algorithm is about to train on (see
    `observe_advantages`; e.g. `algos.training.mc_diagnostics.MCDiagnostics`)."""

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def observe_advantages(self, iteration: int, episodes: Sequence, advantages: Sequence[Sequence[float]],
                           values: Sequence[Sequence[float]] | None = None) -> None:
        """Called by an algorithm just before its update with the episodes it trains on, one list of
        per-token advantages per episode (before whitening) and, with a critic, one list of per-token
        values V(s_t); hands them to the registered plug-ins (none by default: then a no-op)."""
        for observer in self.advantage_observers:
            observer(iteration, episodes, advantages, values)

    def seed_for(self, iteration: int, purpose: str) -> int:
        """A distinct, reproducible seed per (run seed, iteration, purpose), and per rank when
        several processes train together."""
        key = [self.seed, iteration, sum(map(ord, purpose))] + ([self.dist.rank] if self.dist.world_size > 1 else [])
        return int(np.random.SeedSequence(key).generate_state(1)[0])


class Algorithm(Protocol):
    """What the loop calls (see the module docstring for the optional hooks)."""

    name: str

    def iteration(self, problems: Sequence, iteration: int) -> dict[str, float]: ...
