"""Sharded models with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`): wrapping, gradient
reduction as a sum, the global gradient norm, and full weights gathered for samplers and saving.

With ``--sharding fsdp`` (`algos.training.config.RunConfig.sharding`) the trainer wraps the policy,
the frozen reference and PPO's critic with `shard_model`: every decoder layer (the classes the model
names in ``_no_split_modules``, e.g. ``LlamaDecoderLayer``) is one FSDP unit, then the root holds the
rest (embeddings, final norm, LM or value head). Each rank keeps ``1/world`` of every parameter as a
`torch.distributed.tensor.DTensor` shard; AdamW built over ``model.parameters()`` afterwards holds its
moments as shards too (ZeRO-3: parameters, gradients and optimiser states all sharded). Units are
all-gathered for their forward/backward and freed again after it.

Gradient reduction: FSDP2 reduce-scatters gradients in backward and by default *averages* them over
ranks. The updates here (`algos.actor.actor_update`, `algos.critic.critic_update`) give each rank's loss
its share of the *global* normaliser, so the gradients must be *summed*: `shard_model` sets every FSDP
unit's divide factor to 1 with sum-only collectives (``set_gradient_divide_factor(1.0)``,
``set_force_sum_reduction_for_comms(True)``, which also works with gloo, which has no PREMUL_SUM).
The callers then must not all-reduce again (`algos.training.distributed.Dist.all_reduce_grads` is a
no-op for sharded modules). `grad_norm_clip` returns the global norm: ``clip_grad_norm_`` over
DTensor gradients all-reduces the shards' squared norms and returns a replicated DTensor.

Every FSDP forward/backward is a collective: all ranks must run the same number of forward passes
on a sharded module, in the same order (equal episode shards, see `algos.training.distributed`).

Sources: PyTorch FSDP2 docs (``torch.distributed.fsdp.fully_shard``) and torchtitan
``torchtitan/models/llama3/infra/parallelize.py`` (per-block then root wrapping).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "copy_full_weights",
    "full_state_dict",
    "full_tensors",
    "grad_norm_clip",
    "is_sharded",
    "mixed_precision_policy",
    "shard_model",
]


def mixed_precision_policy(bf16: bool):
    """FSDP2's ``MixedPrecisionPolicy``: with ``bf16``, parameters all-gathered and computed in
    bfloat16 while the sharded master weights and the optimiser stay float32 and gradients are
    reduced in float32 (``param_dtype=bfloat16, reduce_dtype=float32``); without, the default
    (everything in the parameters' dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _block_classes(model: torch.nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard_model(model: torch.nn.Module, *, bf16: bool = False, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Wrap ``model`` in place with FSDP2: ``fully_shard`` on every transformer block, then the root.

    Args:
        model: a Hugging Face causal LM, a backbone, or `algos.critic.ValueModel`, on this rank's device,
            with the same weights on every rank (each rank keeps its slice of its own copy).
        bf16: `mixed_precision_policy` (bf16 compute, fp32 master weights and gradient reduction).
        reshard_after_forward: free the gathered parameters after each unit's forward (ZeRO-3);
            False keeps them until backward (ZeRO-2-like: more memory, one all-gather fewer).
    Returns:
        ``model`` itself, now an ``FSDPModule`` whose parameters are DTensor shards.
    Raises:
        RuntimeError: no default process group (launch with torchrun / accelerate).
        ValueError: the model names no block classes in ``_no_split_modules`` and has none of them.
    """
    import torch.distributed as td
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not (td.is_available() and td.is_initialized()):
        raise RuntimeError("sharding needs an initialised process group: launch with torchrun or accelerate launch")
    classes = _block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in classes and m is not model]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: found no transformer blocks to shard (looked for the classes in "
                         f"_no_split_modules: {sorted(classes) or 'none named'})")
    mp = mixed_precision_policy(bf16)
    for block in blocks:
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum, not mean: losses carry global normalisers
            module.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model: Any) -> bool:
    """True when any parameter of ``model`` is a DTensor (an FSDP2-wrapped module)."""
    from torch.distributed.tensor import DTensor

    params = getattr(model, "parameters", None)
    return params is not None and any(isinstance(p, DTensor) for p in params())


def full_tensors(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, full tensor)`` for every entry of ``model.state_dict()``, one at a time: a sharded
    entry is all-gathered (``DTensor.full_tensor()``, a collective: every rank must consume the
    iterator to the end in the same order), so at most one full parameter exists at a time besides
    the caller's own copy."""
    from torch.distributed.tensor import DTensor

    for name, tensor in model.state_dict().items():
        yield name, (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()


@torch.no_grad()
def copy_full_weights(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Copy ``source``'s weights (sharded or not) into the unsharded ``target`` of the same
    architecture, parameter by parameter (`full_tensors`; collective when ``source`` is sharded).

    Raises:
        KeyError: ``source`` has an entry ``target`` lacks (different architectures).
    """
    own = target.state_dict()
    for name, full in full_tensors(source):
        if name not in own:
            raise KeyError(f"copy_full_weights: {name!r} of {type(source).__name__} is not in {type(target).__name__}")
        own[name].copy_(full)


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """The consolidated state dict of a sharded ``model`` on rank 0, on the CPU (empty on the other
    ranks): `torch.distributed.checkpoint.state_dict.get_model_state_dict` with
    ``full_state_dict=True, cpu_offload=True``. Collective. For saving in Hugging Face format:
    ``model.save_pretrained(path, state_dict=full_state_dict(model))`` on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def grad_norm_clip(parameters, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` returning the total norm as a float: over all ranks for
    DTensor (sharded) gradients (the norm comes back as a replicated DTensor), local otherwise."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)
