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
    train_problems: Sequence | None = None
    """The problems iterations draw from (the train split, or its first ``--train-problems``); None:
    ``env.problems``."""
    dynamic_sampling_rounds: int = 0
    """DAPO's dynamic sampling in `collect_groups`: at most this many extra rounds of sampling to
    fill the batch with groups of mixed rewards; 0: off."""
    advantage_observers: list[Callable[..., None]] = field(default_factory=list)
    """Plug-ins that look at the advantages an algorithm is about to train on (see
    `observe_advantages`; e.g. `algos.training.mc_diagnostics.MCDiagnostics`)."""
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

    def collect_groups(self, problems: Sequence, params, iteration: int,
                       timings: dict[str, float] | None = None) -> tuple[list, dict[str, float]]:
        """The iteration's episodes, ``params.n`` per problem, problem-major: `collect_episodes`, or
        with ``dynamic_sampling_rounds`` > 0 `collect_mixed_groups` (only groups with mixed rewards,
        topped up from the train problems; the batch may then hold fewer groups than ``problems``).
        Returns (episodes, metrics of the collection: {} without dynamic sampling)."""
        from algos.rollout import collect_episodes, collect_mixed_groups

        if not self.dynamic_sampling_rounds:
            return collect_episodes(self.env, self.sampler, problems, params, seed=self.seed_for(iteration, "episodes"),
                                    timings=timings), {}
        pool = self.train_problems if self.train_problems is not None else self.env.problems
        used = {p.id for p in problems}

        def draw(round_: int, count: int) -> list:
            rng = np.random.default_rng([self.seed, iteration, round_, self.dist.rank, 13])
            fresh = [pool[i] for i in rng.permutation(len(pool)) if pool[i].id not in used][:count]
            used.update(p.id for p in fresh)
            return fresh

        def seed_for(round_: int) -> int:
            return self.seed_for(iteration, "episodes" if round_ == 0 else f"dynamic-{round_}")

        return collect_mixed_groups(self.env, self.sampler, problems, params, draw, seed_for,
                                    self.dynamic_sampling_rounds, self.dist, timings)

    def observe_advantages(self, iteration: int, episodes: Sequence, advantages: Sequence[Sequence[float]],
                           values: Sequence[Sequence[float]] | None = None) -> None:
        """Called by an algorithm just before its update with the episodes it trains on, one list of
        per-token advantages per episode (before whitening) and, with a critic, one list of per-token
        values V(s_t); hands them to the registered plug-ins (none by default: then a no-op)."""
        for observer in self.advantage_observers:
            observer(iteration, episodes, advantages, values)

    def seed_for(self, iteration: int, purpose: str, per_rank: bool = True) -> int:
        """A distinct, reproducible seed per (run seed, iteration, purpose), and per rank when
        several processes train together and ``per_rank`` (False: the same seed on every rank, e.g.
        to initialise weights every rank must share): `derived_seed`."""
        ranked = per_rank and self.dist.world_size > 1
        return derived_seed(self.seed, iteration, purpose, self.dist.rank if ranked else None)


def derived_seed(seed: int, iteration: int, purpose: str, rank: int | None = None) -> int:
    """The sampler seed a run with seed ``seed`` uses at ``iteration`` for ``purpose`` ("episodes",
    "eval", "eval-sampled", ...), on ``rank`` when several processes train (None: one process)."""
    key = [seed, iteration, sum(map(ord, purpose))] + ([rank] if rank is not None else [])
    return int(np.random.SeedSequence(key).generate_state(1)[0])


class Algorithm(Protocol):
    """What the loop calls (see the module docstring for the optional hooks)."""

    name: str

    def iteration(self, problems: Sequence, iteration: int) -> dict[str, float]: ...
