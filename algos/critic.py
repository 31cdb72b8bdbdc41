"""The critic of PPO-style algorithms: a value network over a transformer backbone, its forward pass
in the update's batch layout, and its clipped-value update (McGill-NLP/VinePPO
``models/pretrained_with_value_head.py`` and ``trainers/ppo_trainer.py``). Used by `algos.ppo` and
`algos.value_pretraining` (VC-PPO).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoModel

from algos import core
from algos.models.sharding import copy_full_weights, grad_norm_clip, is_sharded

__all__ = ["CriticSettings", "ValueModel", "compute_values", "critic_update", "explained_variance", "terminal_rewards",
           "VALUE_HEAD_FILE"]

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueModel(torch.nn.Module):
    """The critic: a transformer backbone (no LM head) and a linear value head H → 1.

    Build it from a policy with `from_policy` (a deep copy of the policy's backbone, so it starts
    from the SFT weights), or reload one written by `save_pretrained` with `from_pretrained`.

    Attributes:
        backbone: the decoder stack (e.g. ``LlamaModel``) returning ``last_hidden_state``.
        head: ``Linear(hidden_size, 1)``.
    """

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear | None = None,
                 generator: torch.Generator | None = None) -> None:
        """Args:
            backbone: the transformer body; it must have ``config.hidden_size``.
            head: an existing head (e.g. loaded); None creates one with weight ~ N(0, 1/√(H+1))
                and bias 0, drawn from ``generator`` (torch's global RNG if None).
        """
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        param = next(backbone.parameters())
        new = head is None
        head = torch.nn.Linear(int(self.config.hidden_size), 1, bias=True) if new else head
        self.head = head.to(device=param.device, dtype=param.dtype)
        if new:
            self.reset_head(generator)

    def reset_head(self, generator: torch.Generator | None = None) -> None:
        """Re-draw the head: weight ~ N(0, 1/√(H+1)) drawn in float32 on the CPU from ``generator``
        (torch's global RNG if None), bias 0."""
        hidden = self.head.weight.shape[1]
        with torch.no_grad():
            self.head.weight.copy_(torch.empty(1, hidden).normal_(0.0, 1.0 / math.sqrt(hidden + 1), generator=generator))
            self.head.bias.zero_()

    @classmethod
    def from_policy(cls, policy, generator: torch.Generator | None = None) -> ValueModel:
        """A critic whose backbone is a deep copy of ``policy``'s (``get_decoder()``, e.g. the
        ``LlamaModel`` of a ``LlamaForCausalLM``), on the policy's device and dtype, trainable. From
        an FSDP2-sharded policy the backbone is built from its config and the full weights are
        gathered into it (a collective: every rank calls this); the critic is unsharded either way."""
        decoder = policy.get_decoder() if hasattr(policy, "get_decoder") else policy.base_model
        if decoder is policy:
            raise ValueError(f"could not find the backbone of {type(policy).__name__}: get_decoder() returned the model")
        if is_sharded(policy):  # FSDP2 shards: a fresh unsharded backbone, filled with the gathered weights
            param = next(decoder.parameters())
            backbone = AutoModel.from_config(decoder.config, dtype=param.dtype).to(param.device)
            copy_full_weights(backbone, decoder)  # collective
        else:
            backbone = copy.deepcopy(decoder)
        critic = cls(backbone, generator=generator)
        critic.requires_grad_(True)
        critic.train(policy.training)
        return critic

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The head's output at every position: ``values[b, p]`` is the value of the state made of
        tokens ``0..p`` (it has read token p).

        Args:
            input_ids, attention_mask: (B, T), left or right padded (positions follow the mask).
        Returns:
            (B, T) float32; padding positions hold meaningless numbers (mask them).
        """
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def response_values(self, batch: dict[str, Tensor]) -> Tensor:
        """V(s_t) for every response token t of a `batch_sequences` batch: the value of the state
        *before* token t, read at position t − 1 (the same alignment as `response_logprobs`, whose
        log-prob at position t is predicted from position t − 1).

        Returns:
            (B, L) float32 on the critic's device, 0 outside ``response_mask``.
        """
        values = self(batch["input_ids"], batch["attention_mask"])
        shifted = torch.cat([values.new_zeros(values.shape[0], 1), values[:, :-1]], dim=1)
        return shifted * batch["response_mask"].to(shifted.device)

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write the backbone in Hugging Face format (``config.json`` + weights) and the head as
        ``value_head.safetensors`` into the directory ``path``.

        ``state_dict``: the critic's full weights (``backbone.*`` and ``head.*`` names), e.g. the
        `algos.models.sharding.full_state_dict` of a sharded critic; default: its own."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            self.backbone.save_pretrained(path)
            head = self.head.state_dict()
        else:
            self.backbone.save_pretrained(path, state_dict={k[len("backbone."):]: v for k, v in state_dict.items()
                                                            if k.startswith("backbone.")})
            head = {k[len("head."):]: v for k, v in state_dict.items() if k.startswith("head.")}
        save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, str(path / VALUE_HEAD_FILE))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | str = "auto",
                        device: str | torch.device = "cpu") -> ValueModel:
        """Load a critic written by `save_pretrained` (local directory only, no hub lookup).

        Raises:
            FileNotFoundError: ``path`` has no ``value_head.safetensors``.
        """
        path = Path(path)
        head_file = path / VALUE_HEAD_FILE
        if not head_file.is_file():
            raise FileNotFoundError(f"no {VALUE_HEAD_FILE} in {path}; expected a directory written by ValueModel.save_pretrained")
        backbone = AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=True).to(device)
        state = load_file(str(head_file))
        head = torch.nn.Linear(state["weight"].shape[1], 1, bias=True)
        head.load_state_dict(state)
        return cls(backbone, head=head)


def terminal_rewards(batch: dict[str, Tensor], rewards: Sequence[float]) -> Tensor:
    """Per-token rewards: 0 everywhere except each response's last token, which gets its R.

    Args:
        batch: a right-padded `batch_sequences` batch of B episodes.
        rewards: B outcome rewards.
    Returns:
        (B, L) float32; an empty response gets no reward (it has no token).
    """
    mask = batch["response_mask"]
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for i, r in enumerate(rewards):
        n = int(batch["response_lengths"][i])
        if n > 0:
            out[i, int(batch["prompt_lengths"][i]) + n - 1] = float(r)
    return out


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 − Var(G − V) / Var(G)`` over the masked tokens (1 is perfect, 0 no better than a
    constant, < 0 worse). Returns 0.0 when Var(G) = 0 (e.g. every reward equal), where it is
    undefined."""
    m = mask.bool()
    g, v = returns[m].double(), values[m].double()
    if g.numel() < 2:
        return 0.0
    var_g = float(g.var())
    if var_g <= 1e-12:
        return 0.0
    return 1.0 - float((g - v).var()) / var_g


@dataclass(frozen=True)
class CriticSettings:
    """Settings of the critic update (from `PPOConfig`)."""

    epochs: int
    minibatch_size: int
    micro_batch_size: int
    value_clip: float
    grad_clip: float
    bf16_autocast: bool = False  # critic forward passes under bf16 autocast (weights and loss stay float32)


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def _rows(batch: dict[str, Tensor], rows: list[int]) -> dict[str, Tensor]:
    """Rows of a right-padded batch, trimmed to the longest selected sequence."""
    sub = {k: v[rows] for k, v in batch.items() if v.dim() == 2}
    width = max(int(sub["attention_mask"].sum(1).max()), 1)
    return {k: v[:, :width] for k, v in sub.items()}


@torch.no_grad()
def compute_values(critic: ValueModel, batch: dict[str, Tensor], micro_batch_size: int,
                   bf16_autocast: bool = False) -> Tensor:
    """V(s_t) for every response token of a right-padded batch, without gradient, in micro-batches of
    ``micro_batch_size`` length-sorted rows (`algos.actor.micro_batch_rows`), each trimmed to its
    longest row.

    Returns:
        (B, L) float32 on the CPU, 0 outside ``response_mask``, in the input's row order.
    """
    from algos.actor import _precision, micro_batch_rows

    was_training = critic.training
    critic.eval()
    out = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
    for part in micro_batch_rows(batch["attention_mask"], micro_batch_size):
        sub = _rows(batch, part)
        with _precision(critic.device, bf16_autocast):
            values = critic.response_values(sub)
        out[part, : sub["input_ids"].shape[1]] = values.float().cpu()
    critic.train(was_training)
    return out


def critic_update(
    critic: ValueModel,
    optimizer: torch.optim.Optimizer,
    scheduler,
    batch: dict[str, Tensor],
    old_values: Tensor,
    returns: Tensor,
    settings: CriticSettings,
    generator: torch.Generator,
    *,
    dist=None,
) -> dict[str, float]:
    """Fit the critic to the returns: ``epochs`` passes of shuffled mini-batches, each one optimiser
    step on ``½ · token_mean(max((V − G)², (clip(V, V_old ± c) − G)²))``.

    Micro-batches are length-sorted and trimmed (`algos.actor.micro_batch_rows`); each adds its
    masked sum over the mini-batch's token count, so the gradient does not depend on the split.

    Args:
        batch: a right-padded `batch_sequences` batch of the N episodes (this rank's shard).
        old_values, returns: (N, L) V_old(s_t) and G_t on the response tokens (0 elsewhere).
        generator: RNG for the mini-batch shuffle (one ``randperm(N)`` per epoch, as `actor_update`).
        dist: an `algos.training.distributed.Dist`; None (or world size 1) is a single process. As in
            `algos.actor.actor_update`: ``minibatch_size`` is global (``minibatch_size // world``
            episodes per rank and step), the token count of the mini-batch and the logged sums are
            reduced over ranks and gradients summed before clipping, so the update equals a
            single-process one on the concatenated batch up to float summation order.
    Returns:
        Means over optimiser steps of loss, clip_frac (fraction of tokens where the clipped term is
        the larger) and grad_norm; the number of optimiser steps, of mini-batches skipped for a
        non-finite loss or gradient norm, and of those in a row at the end (``nonfinite_trailing``).
    Raises:
        ValueError: ranks whose episode counts give different numbers of mini-batches, or a global
            mini-batch size not divisible by the world size (`algos.actor.check_step_counts`).
    """
    from algos.actor import _precision, check_step_counts, micro_batch_rows

    multi = dist is not None and dist.world_size > 1
    n = batch["input_ids"].shape[0]
    local_mb = check_step_counts(n, settings.minibatch_size, dist)
    data = dict(batch)
    data["old_values"], data["returns"] = old_values.float(), returns.float()
    stats: dict[str, list[float]] = {"loss": [], "clip_frac": [], "grad_norm": []}
    nonfinite = trailing = 0
    device = critic.device
    critic.train()
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator).tolist()
        for mb_rows in _chunks(order, local_mb):
            mb = _rows(data, mb_rows)
            n_tok = torch.tensor([float(mb["response_mask"].sum())], dtype=torch.float64)
            n_tokens = max(float(dist.all_reduce_sum(n_tok)[0] if multi else n_tok[0]), 1.0)
            optimizer.zero_grad(set_to_none=True)
            acc = torch.zeros(2, dtype=torch.float64, device=device)  # Σ loss share, Σ clipped tokens
            for part in micro_batch_rows(mb["attention_mask"], settings.micro_batch_size):
                sub = {k: v.to(device) for k, v in _rows(mb, part).items()}
                mask = sub["response_mask"].float()
                with _precision(critic.device, settings.bf16_autocast):
                    values = critic.response_values(sub).float()
                old, ret = sub["old_values"], sub["returns"]
                per_token = core.clipped_value_loss(values, old, ret, settings.value_clip)
                loss = core.masked_sum(per_token, mask) / n_tokens
                loss.backward()
                with torch.no_grad():
                    clipped = old + torch.clamp(values - old, -settings.value_clip, settings.value_clip)
                    frac = ((clipped - ret) ** 2 > (values - ret) ** 2).float()
                    acc += torch.stack([loss.detach(), core.masked_sum(frac, mask)]).double()
            if multi:
                acc = dist.all_reduce_sum(acc)
            loss_sum, clip_count = acc.tolist()
            if multi:
                dist.all_reduce_grads(critic)
            grad_norm = grad_norm_clip(critic.parameters(), settings.grad_clip)  # global when sharded
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                nonfinite += 1
                trailing += 1
                continue
            optimizer.step()
            scheduler.step()
            trailing = 0
            stats["loss"].append(loss_sum)
            stats["clip_frac"].append(clip_count / n_tokens)
            stats["grad_norm"].append(grad_norm)
    critic.eval()
    out = {k: (sum(v) / len(v) if v else float("nan")) for k, v in stats.items()}
    out["optimizer_steps"] = float(len(stats["loss"]))
    out["nonfinite_minibatches"] = float(nonfinite)
    out["nonfinite_trailing"] = float(trailing)
    return out
