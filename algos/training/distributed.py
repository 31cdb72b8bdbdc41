"""Multi-process data parallelism at the update level: a thin layer over accelerate and torch.distributed.

Every rank holds a full copy of the policy (and critic, reference) and its own shard of each
iteration's episodes; the updates (`algos.actor.actor_update`, `algos.critic.critic_update`) sum
gradients and loss normalisers across ranks so that one data-parallel update equals a
single-process update on the concatenated global batch, up to float summation order.

    from algos.training.distributed import current
    dist = current()                       # world 1 unless launched with accelerate / torchrun
    mine = dist.shard(episodes)            # contiguous equal shards by rank
    actor_update(..., dist=dist)

With ``--sharding fsdp`` the weights are not replicated: the policy, reference and critic are
FSDP2-sharded (`algos.models.sharding`), FSDP reduces the gradients itself, and everything else here
(sharding the episodes, the reduced normalisers and statistics) is unchanged.

Launching: ``accelerate launch --cpu --num_processes 2 experiments/run.py ...`` or ``torchrun
--nproc_per_node 2 ...``; `current` reads the launcher's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) through `accelerate.PartialState`, which
initialises the process group (gloo on CPU, nccl on CUDA).

The collectives call `torch.distributed` on its default group directly, so a `Dist` also works
when the caller initialised the group itself (``torch.distributed.init_process_group``) and built
``Dist(rank, world_size)``. Every collective must be called by all ranks in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Dist", "current"]

#: Gradient buckets of `Dist.all_reduce_grads` hold at most this many bytes (one all-reduce each).
GRAD_BUCKET_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Dist:
    """This process's place in the data-parallel group.

    Attributes:
        rank: 0-based index of this process, ``0 <= rank < world_size``.
        world_size: number of processes (1 = single process: every collective is a local no-op).
        is_main: True on rank 0 (the one that logs, evaluates and writes checkpoints). Derived from
            ``rank`` when not given.

    Raises:
        ValueError: world_size < 1, rank outside ``[0, world_size)``, or ``is_main`` inconsistent with ``rank``.
    """

    rank: int = 0
    world_size: int = 1
    is_main: bool = field(default=None)  # type: ignore[assignment]  # set in __post_init__

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size: expected an int >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size = {self.world_size}, got {self.rank}")
        if self.is_main is None:
            object.__setattr__(self, "is_main", self.rank == 0)
        elif bool(self.is_main) != (self.rank == 0):
            raise ValueError(f"is_main must be True exactly on rank 0, got is_main={self.is_main} on rank {self.rank}")

    # ------------------------------------------------------------------ data

    def shard(self, seq: Sequence) -> list:
        """This rank's contiguous share of ``seq``: items ``[rank·n/W, (rank+1)·n/W)``.

        Raises:
            ValueError: ``len(seq)`` is not divisible by ``world_size`` (unequal shards would make
                ranks take different numbers of optimiser steps).
        """
        items = list(seq)
        n = len(items)
        if n % self.world_size:
            raise ValueError(f"cannot shard {n} items evenly over world_size {self.world_size}: "
                             f"{n} is not divisible by {self.world_size}")
        per = n // self.world_size
        return items[self.rank * per:(self.rank + 1) * per]

    # ------------------------------------------------------------------ collectives

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Elementwise sum of ``t`` over ranks, as a new tensor on ``t``'s device and dtype
        (``t`` itself is not modified; a detached copy at world size 1)."""
        if self.world_size == 1:
            return t.detach().clone()
        import torch.distributed as td

        comm = _comm_device(t.device)
        out = t.detach().to(comm, copy=True).contiguous()
        td.all_reduce(out, op=td.ReduceOp.SUM)
        return out.to(t.device)

    def all_reduce_grads(self, model: torch.nn.Module, bucket_bytes: int = GRAD_BUCKET_BYTES) -> None:
        """Replace ``p.grad`` of every parameter of ``model`` by its sum over ranks, in place.

        Gradients are flattened into buckets of at most ``bucket_bytes`` per (device, dtype), one
        all-reduce per bucket (the coalescing of DDP's reducer, without hooks). A parameter whose
        gradient is None on some ranks but not others gets zeros there first (one extra all-reduce
        of a presence flag per parameter); one with no gradient anywhere stays None, so the
        optimiser skips it as in a single process. No-op at world size 1, and for a model sharded
        with FSDP2 (`algos.models.sharding.shard_model`: its DTensor gradients were already summed by
        FSDP's reduce-scatter in backward; summing again would double them).
        """
        if self.world_size == 1:
            return
        from algos.models.sharding import is_sharded

        if is_sharded(model):
            return
        import torch.distributed as td
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        present = self.all_reduce_sum(present)
        grads: list[Tensor] = []
        for p, anywhere in zip(params, present.tolist()):
            if anywhere == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        groups: dict[tuple, list[Tensor]] = {}
        for g in grads:
            groups.setdefault((g.device, g.dtype), []).append(g)
        for (device, _), members in groups.items():
            bucket: list[Tensor] = []
            size = 0
            for g in members + [None]:
                if g is not None and (not bucket or size + g.numel() * g.element_size() <= bucket_bytes):
                    bucket.append(g)
                    size += g.numel() * g.element_size()
                    continue
                flat = _flatten_dense_tensors(bucket).to(_comm_device(device))
                td.all_reduce(flat, op=td.ReduceOp.SUM)
                for g_old, g_new in zip(bucket, _unflatten_dense_tensors(flat.to(device), bucket)):
                    g_old.copy_(g_new)
                if g is not None:
                    bucket, size = [g], g.numel() * g.element_size()

    def barrier(self) -> None:
        """Block until every rank reaches this call (no-op at world size 1)."""
        if self.world_size > 1:
            import torch.distributed as td

            td.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable), returned on every rank; other ranks' ``obj`` is ignored."""
        if self.world_size == 1:
            return obj
        import torch.distributed as td

        box = [obj if self.rank == 0 else None]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list:
        """Every rank's ``obj`` (picklable), as a list indexed by rank, on every rank."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as td

        out: list = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out


def _comm_device(device: torch.device) -> torch.device:
    """Where a tensor must be for the default group's backend: CUDA for nccl, else ``device``."""
    import torch.distributed as td

    if "nccl" in str(td.get_backend()) and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _launched_world_size() -> int:
    """The world size a launcher announced in the environment (1 when none did)."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError as exc:
                raise ValueError(f"environment variable {name}={value!r} is not an integer world size") from exc
    return 1


def current() -> Dist:
    """The data-parallel group of this process.

    World size 1 (``Dist(0, 1, True)``, no process group) unless a launcher set ``WORLD_SIZE`` (or
    its MPI equivalents) above 1 or a process group is already initialised; then rank and world
    size come from `accelerate.PartialState`, which initialises the group on first use: gloo with
    ``cpu=True`` when CUDA is unavailable or ``ACCELERATE_USE_CPU`` is set (``accelerate launch
    --cpu``), nccl otherwise.
    """
    import torch.distributed as td

    initialised = td.is_available() and td.is_initialized()
    if _launched_world_size() <= 1 and not initialised:
        return Dist(0, 1, True)
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    state = PartialState(cpu=cpu)
    return Dist(int(state.process_index), int(state.num_processes), bool(state.is_main_process))
