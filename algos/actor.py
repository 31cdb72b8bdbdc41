"""The PPO-style actor update shared by VinePPO, PPO, GRPO and RLOO.

Given episodes and per-token advantages, run ``epochs`` passes of shuffled mini-batches with the
clipped surrogate, a KL penalty to the frozen reference in the loss, optional per-mini-batch
advantage whitening, gradient clipping and one optimiser step per mini-batch. The defaults follow
the trainer the VinePPO paper used for both VinePPO and PPO (McGill-NLP/VinePPO,
trainers/ppo_trainer.py): ``L = token_mean(ℓ_t) + β · mean_seqs(Σ_t clamp(k3_t, 0, 10))``; a
mini-batch whose mean ratio exceeds 10 is skipped. GRPO sets both aggregations to its mode
(``seq_mean_token_mean`` originally: ``(1/G) Σ_i (1/|o_i|) Σ_t {ℓ + β k3}``, DeepSeekMath eq. 3).

A mini-batch whose loss or gradient norm is NaN or infinite is skipped (no optimiser step) and
counted in ``nonfinite_minibatches``; ``nonfinite_trailing`` counts those at the end of the update.

Data parallelism (``dist``, `algos.training.distributed.Dist`): each rank passes its own shard of the
iteration's episodes; ``minibatch_size`` is the global mini-batch, so a rank trains on
``minibatch_size // world_size`` of its episodes per optimiser step. Loss normalisers (token and
sequence counts), whitening statistics, the max-ratio and non-finite decisions and the logged
statistics are reduced over ranks, and gradients are summed before clipping: each rank's loss is
its share of the *global* aggregate, so one update equals a single-process update on the
concatenated batch up to float summation order (when the mini-batches hold the same episodes).
With an FSDP2-sharded policy (``--sharding fsdp``, `algos.models.sharding`) FSDP sums the gradients
in its reduce-scatter instead (``Dist.all_reduce_grads`` is then a no-op) and the clipping norm is the
global one over the DTensor shards; every rank must then run the same number of forward passes
(equal episode shards), since each one is a collective. The shared-prompt forward (below) is
therefore off for a sharded model: its number of forward passes (two per micro-batch that repeats a
prompt, one otherwise) depends on each rank's data.

Efficiency: within a mini-batch, micro-batches are formed from rows sorted by prompt+response
length and each is trimmed to its own longest row, so little compute goes to padding; the
gradient is unchanged because every micro-batch's loss is a partial sum over the mini-batch's
global normaliser (`core.aggregate_sum` / `core.aggregate_norm`). ``π_old`` and ``π_ref``
log-probs are computed once per update (one no-grad pass each, also length-sorted), not per epoch;
a caller that already has π_old's log-probs passes them (``old_logprobs``). When the update is a
single optimiser step on the batch (one epoch, one mini-batch: GRPO's on-policy default), π_old *is*
the policy at that step, so the π_old pass is skipped and the training pass's own log-probs,
detached, serve as π_old (ρ = 1 in value, gradient that of the surrogate at ρ = 1; identical to a
separate pass in exact arithmetic when the forward pass has no dropout, as here; TRL's GRPOTrainer
does the same). Measured with experiments/bench/trl_step.py: 0.05–0.06 s of a 0.37–0.50 s GRPO step
of the tiny arithmetic model (1 x 8 completions).

Shared-prompt forward (``ActorSettings.share_prompt_forward``, on by default): the G rows of a group
(GRPO, RLOO, VinePPO) repeat one prompt, often most of the positions of the forward pass. When
prompts repeat, the rows of a mini-batch are ordered so that each prompt's rows are adjacent (groups
longest first, `micro_batch_rows` with ``groups``) before micro-batches are cut (the same number of
micro-batches; the mini-batches, and so the episodes of every optimiser step, are unchanged), and
within a micro-batch each distinct prompt is run once with gradient, its KV cache expanded to its
rows, and the responses run after it (`algos.models.policy.shared_prompt_logprobs`): ``U · P + B · R``
positions instead of ``B · (P + R)``. Autograd sums the rows' gradients into the shared prompt, so
loss and gradient are those of the plain path up to float rounding
(tests/test_shared_prompt_update.py). The π_old / π_ref passes use it too. Per-micro-batch
statistics stay on the device and are read once per mini-batch (no ``.item()`` per micro-batch).
Measured (experiments/bench/results/update.json): length-sorted micro-batches cut padding from 38%
to 22% of the positions on GSM8K-length episodes and made a float32 update 1.47x faster (1.22x on
the shorter, more uniform arithmetic episodes); ``ActorSettings.bf16_autocast`` adds ~2x on a CPU
with bf16 kernels.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from algos import core
from algos.models.policy import batch_sequences, prompt_groups, response_logprobs
from algos.models.sharding import grad_norm_clip, is_sharded
from algos.rollout import Episode

if TYPE_CHECKING:
    from algos.config import ActorConfig, OptimConfig
    from algos.training.distributed import Dist


@dataclass(frozen=True)
class ActorSettings:
    """Settings of the actor update (each algorithm's Config provides them).

    ``bf16_autocast`` runs the π_old, π_ref and training forward passes under
    ``torch.autocast(device, bfloat16)``; weights, optimiser state, gradients and the loss maths stay
    float32 (log-probs are computed from float32 logits). Off by default. Measured with
    experiments/bench/update.py (2-core AMD EPYC with AVX512-BF16, 1 thread, torch 2.13, the 4-5M
    parameter tiny models, 64 episodes, mini-batch 32, micro-batch 8, median of 3): 2.0x
    (arithmetic) and 2.2x (GSM8K) faster per update than float32 with unsorted micro-batches, 2.75x
    and 3.1x with length-sorted ones, with the start-of-update ratio within 1e-4 of 1. On CPUs
    without fast bf16 kernels (`algos.models.sft.cpu_has_fast_bf16` False) it is slower; on GPUs it is the
    usual mixed precision.

    ``share_prompt_forward`` runs each distinct prompt of a micro-batch once and lets the rows that
    share it (a GRPO / RLOO / VinePPO group) attend to its KV cache
    (`algos.models.policy.shared_prompt_logprobs`), in the training pass and in the π_old / π_ref
    passes; micro-batches are then cut so that a prompt's rows land together (`micro_batch_rows`).
    Same log-probs and gradient up to float rounding. Off under ``--sharding fsdp`` (see the module
    docstring).
    """

    epochs: int
    minibatch_size: int  # episodes per optimiser step, over all ranks
    micro_batch_size: int  # episodes per forward/backward pass on one rank (gradient accumulation)
    clip_eps: float
    kl_coef: float
    temperature: float
    grad_clip: float
    whiten_advantages: bool = True
    max_ratio: float = 10.0
    kl_clamp: float = 10.0
    clip_eps_high: float | None = None  # ε_hi (DAPO clip-higher); None = clip_eps
    policy_loss: str = "clip"  # a name in `algos.core.POLICY_LOSSES`
    permute_advantages: bool = False  # the null control: advantages permuted within each mini-batch
    pg_aggregation: core.AggregationMode = "token_mean"
    kl_aggregation: core.AggregationMode = "seq_mean_token_sum"
    kl_estimator: str = "k3"
    aggregation_constant: float | None = None  # L_max for seq_sum_const (Dr. GRPO)
    sort_micro_batches: bool = True  # micro-batches of length-sorted rows (same gradient, less padding)
    bf16_autocast: bool = False  # policy/reference forward passes under bf16 autocast (see below)
    share_prompt_forward: bool = True  # one prompt forward per distinct prompt of a micro-batch (see below)

    @classmethod
    def from_configs(cls, optim: OptimConfig, actor: ActorConfig, temperature: float, **overrides) -> "ActorSettings":
        """The settings of an algorithm whose Config embeds ``optim`` and ``actor``; ``temperature``
        is the sampling temperature (the training log-probs use it); ``overrides`` set the fields
        that are the algorithm's own choice (``kl_aggregation``, ``aggregation_constant``, ``kl_coef=0``
        when the KL is not in the loss, ...)."""
        fields = dict(
            epochs=optim.epochs, minibatch_size=optim.minibatch_size, micro_batch_size=optim.micro_batch_size,
            grad_clip=optim.grad_clip, temperature=temperature, clip_eps=actor.clip_eps,
            clip_eps_high=actor.clip_eps_high, policy_loss=actor.policy_loss,
            permute_advantages=actor.permute_advantages, kl_coef=actor.kl_coef,
            whiten_advantages=actor.whiten_advantages,
            pg_aggregation=actor.aggregation, bf16_autocast=actor.bf16_autocast,
            share_prompt_forward=actor.share_prompt_forward,
        )
        return cls(**{**fields, **overrides})


#: With ``bf16_autocast``, micro-batch widths are rounded up to a multiple of this many tokens: on
#: CPU every new shape adds to oneDNN's kernel cache (see `algos.models.sft.SFTConfig.pad_to_multiple_of`).
AUTOCAST_WIDTH_MULTIPLE = 32


def place_per_token(batch: dict[str, torch.Tensor], values: Sequence[Sequence[float]]) -> torch.Tensor:
    """Scatter per-response-token values into a (B, L) tensor aligned with ``batch['response_mask']``.

    Raises:
        ValueError: if an episode's values do not have its response length.
    """
    mask = batch["response_mask"]
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for i, vals in enumerate(values):
        positions = mask[i].nonzero().flatten()
        if len(vals) != len(positions):
            raise ValueError(f"episode {i}: {len(vals)} values for {len(positions)} response tokens")
        out[i, positions] = torch.as_tensor(list(vals), dtype=torch.float32)
    return out


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def _select(batch: dict[str, torch.Tensor], rows: list[int], multiple: int = 1) -> dict[str, torch.Tensor]:
    """Rows of a right-padded batch (its 2-D tensors), trimmed to the longest selected sequence
    rounded up to a multiple of ``multiple`` (at most the batch's width)."""
    sub = {k: v[rows] for k, v in batch.items() if v.dim() == 2}
    width = max(int(sub["attention_mask"].sum(1).max()), 1)
    width = min(-(-width // multiple) * multiple, sub["attention_mask"].shape[1])
    return {k: v[:, :width] for k, v in sub.items()}


def _precision(device: torch.device, bf16: bool):
    """``torch.autocast(device, bfloat16)`` when ``bf16``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def micro_batch_rows(attention_mask: Tensor, size: int, sort: bool = True,
                     groups: Sequence[int] | None = None) -> list[list[int]]:
    """Row indices of the micro-batches of a right-padded (B, L) batch, ``size`` rows each.

    With ``sort``, rows are ordered by sequence length (prompt + response tokens, from the
    attention mask) longest first, ties by index, so each micro-batch holds rows of similar length
    and, trimmed to its longest row, carries little padding; the first micro-batch is the largest,
    so an out-of-memory error shows at once. Without ``sort``, rows keep their order.

    ``groups`` (B prompt-group ids, `algos.models.policy.prompt_groups`), when some group has more
    than one row, keeps each group's rows next to each other so they share micro-batches (and one
    prompt forward pass each, `algos.models.policy.shared_prompt_logprobs`): groups in order of their
    longest row (longest first with ``sort``, else of first appearance), rows within a group
    longest first (with ``sort``). The number of micro-batches, ``ceil(B / size)``, is unchanged.

    Raises:
        ValueError: size < 1, or ``groups`` not of length B.
    """
    if size < 1:
        raise ValueError(f"micro-batch size: expected an int >= 1, got {size}")
    n = attention_mask.shape[0]
    rows = list(range(n))
    lengths = attention_mask.sum(1).tolist()
    if sort:
        rows.sort(key=lambda i: (-lengths[i], i))
    if groups is not None:
        if len(groups) != n:
            raise ValueError(f"groups: expected {n} group ids, got {len(groups)}")
        if len(set(groups)) < n:
            rank = {}  # group -> position of its first row in `rows` (its longest row when sorted)
            for pos, i in enumerate(rows):
                rank.setdefault(groups[i], pos)
            rows.sort(key=lambda i: rank[groups[i]])  # stable: the length order is kept within a group
    return _chunks(rows, size)


def sharing_prompts(model, enabled: bool) -> bool:
    """Whether passes of ``model`` use the shared-prompt forward: ``enabled`` and ``model`` not
    FSDP-sharded (each forward of a sharded model is a collective and the shared path's number of
    forward passes depends on the data, so it is off there)."""
    return enabled and not is_sharded(model)


@torch.no_grad()
def batch_logprobs(model, batch, temperature: float, micro: int, sort: bool = True,
                   bf16_autocast: bool = False, share_prompt: bool = False) -> torch.Tensor:
    """Tempered log-probs of every response token of a padded batch, (B, L) float32 on the CPU,
    computed without gradient in micro-batches of ``micro`` rows (0 off the response mask).
    Rows are grouped by length (``sort``, see `micro_batch_rows`); the result is in the input's
    row order either way. ``bf16_autocast`` runs the forward passes under bf16 autocast.
    ``share_prompt`` keeps rows of one prompt together and runs the prompt once per micro-batch
    (`algos.models.policy.shared_prompt_logprobs`; ignored for an FSDP-sharded ``model``)."""
    out = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
    device = next(model.parameters()).device
    multiple = AUTOCAST_WIDTH_MULTIPLE if bf16_autocast else 1
    share = sharing_prompts(model, share_prompt)
    groups = prompt_groups(batch) if share else None
    for part in micro_batch_rows(batch["attention_mask"], micro, sort, groups):
        sub = _select(batch, part, multiple)
        with _precision(device, bf16_autocast):
            logp = response_logprobs(model, sub, temperature, share_prompt=share, width_multiple=multiple)
        out[part, : sub["input_ids"].shape[1]] = logp.float().cpu()
    return out


def _aggregation_norm(mode: core.AggregationMode, n_tokens: float, n_seqs: float, constant: float | None) -> float:
    """`core.aggregate_norm` from counts (so they can be global): masked tokens (token_mean,
    at least 1), sequences (seq_mean_*), or sequences · constant (seq_sum_const).

    Raises:
        ValueError: unknown mode, or seq_sum_const without a positive constant.
    """
    if mode == "token_mean":
        return max(n_tokens, 1.0)
    if mode in ("seq_mean_token_mean", "seq_mean_token_sum"):
        return n_seqs
    if mode == "seq_sum_const":
        if not constant or constant <= 0:
            raise ValueError(f"seq_sum_const needs a positive constant (L_max), got {constant}")
        return n_seqs * constant
    raise ValueError(f"mode: expected one of {core.AggregationMode.__args__}, got {mode!r}")


def _is_multi(dist: Dist | None) -> bool:
    return dist is not None and dist.world_size > 1


def _reduce(values: Tensor, dist: Dist | None) -> Tensor:
    """Sum over ranks (identity in a single process)."""
    return dist.all_reduce_sum(values) if _is_multi(dist) else values


def whiten_global(x: Tensor, mask: Tensor, dist: Dist | None, eps: float = 1e-8) -> Tensor:
    """`core.masked_whiten` with statistics over the masked tokens of every rank.

    ``mean = Σ x / n``, ``var = Σ (x − mean)² / (n − 1)`` (unbiased, two passes: two all-reduces,
    each of one or two float64 scalars), ``(x − mean) / √(var + eps)``; with n < 2 only centred.
    In a single process it is `core.masked_whiten` itself.

    Args:
        x, mask: (B, T) this rank's values and 0/1 mask (float).
    Returns:
        (B, T) float32, 0 off the mask.
    """
    if not _is_multi(dist):
        return core.masked_whiten(x, mask, eps)
    x64, m64 = x.double(), mask.double()
    first = _reduce(torch.stack([m64.sum(), core.masked_sum(x64, m64)]), dist)
    n, total = float(first[0]), float(first[1])
    mean = total / max(n, 1.0)
    if n < 2:
        return (x - mean) * mask
    sq = float(_reduce(core.masked_sum((x64 - mean) ** 2, m64).reshape(1), dist)[0])
    var = sq / (n - 1)
    return ((x - mean) * (1.0 / math.sqrt(var + eps))).float() * mask


def check_step_counts(n_local: int, minibatch_size: int, dist: Dist | None) -> int:
    """This rank's mini-batch size, ``minibatch_size // world_size``, after checking that every
    rank will take the same number of optimiser steps per epoch, ``ceil(n_local / local)``.
    Collective (one all-gather of ``n_local``) when ``dist`` has more than one rank.

    Raises:
        ValueError: minibatch_size < 1 or not divisible by the world size, or ranks whose episode
            counts give different numbers of mini-batches (the same error on every rank).
    """
    if minibatch_size < 1:
        raise ValueError(f"minibatch_size: expected an int >= 1, got {minibatch_size}")
    if not _is_multi(dist):
        return minibatch_size
    world = dist.world_size
    if minibatch_size % world:
        raise ValueError(f"minibatch_size {minibatch_size} (global, over all ranks) is not divisible by "
                         f"world_size {world}")
    local = minibatch_size // world
    counts = [int(c) for c in dist.all_gather_object(int(n_local))]
    steps = [-(-c // local) for c in counts]
    if len(set(steps)) != 1 or 0 in counts:
        raise ValueError(f"ranks hold {counts} episodes: with {local} per rank and mini-batch they would take "
                         f"{steps} optimiser steps per epoch; every rank needs the same number (shard episodes "
                         f"evenly, e.g. with Dist.shard)")
    return local


def single_step(n_local: int, local_minibatch: int, epochs: int) -> bool:
    """Whether an update of ``n_local`` episodes (this rank's) in mini-batches of ``local_minibatch``
    over ``epochs`` epochs is a single optimiser step, the case where π_old equals the policy being
    trained at its only step (`actor_update` then skips the π_old pass). The same answer on every
    rank once `check_step_counts` has passed (every rank takes the same number of steps)."""
    return epochs == 1 and n_local <= local_minibatch


def actor_update(
    policy,
    reference,
    optimizer: torch.optim.Optimizer,
    scheduler,
    episodes: Sequence[Episode],
    advantages: Sequence[Sequence[float]],
    settings: ActorSettings,
    pad_token_id: int,
    generator: torch.Generator,
    *,
    dist: Dist | None = None,
    old_logprobs: Tensor | None = None,
) -> dict[str, float]:
    """Run the PPO actor update on one iteration's episodes (this rank's shard of them).

    Args:
        episodes: N episodes; their response tokens are trained on.
        advantages: N lists, one advantage per response token (before whitening).
        generator: RNG for mini-batch shuffling (one ``randperm(N)`` per epoch, per rank).
        dist: the data-parallel group; None (or world size 1) is a single process. Every rank must
            call this with episode counts giving the same number of mini-batches per epoch.
        old_logprobs: optional (N, L) float32 π_old log-probs of the
            ``batch_sequences(prompts, responses)`` layout of ``episodes`` (`batch_logprobs` at
            ``settings.temperature``), when the caller has them already; else computed here, or,
            when the update is one optimiser step (``epochs == 1`` and all N episodes in one
            mini-batch, see `single_step`), taken from the training pass itself (detached).
    Returns:
        Means over optimiser steps of: loss, pg_loss, kl (the estimator's per-token mean, nats;
        only when kl_coef > 0), clip_frac, ratio, grad_norm — all over the global mini-batch; plus
        seconds spent on the π_old / π_ref log-prob passes (``time_logprobs``), the number of
        optimiser steps, of mini-batches skipped for a mean ratio above
        ``max_ratio``, of non-finite ones (``nonfinite_minibatches``) and of non-finite ones in a
        row at the end of the update (``nonfinite_trailing``; a ratio skip or a step resets it).
    Raises:
        ValueError: mismatched advantages, invalid aggregation settings, or uneven ranks (see
            `check_step_counts`).
    """
    local_mb = check_step_counts(len(episodes), settings.minibatch_size, dist)
    if settings.policy_loss not in core.POLICY_LOSSES:
        raise ValueError(f"ActorSettings.policy_loss: expected one of {sorted(core.POLICY_LOSSES)}, "
                         f"got {settings.policy_loss!r}")
    for mode in (settings.pg_aggregation, settings.kl_aggregation):
        _aggregation_norm(mode, 1.0, 1.0, settings.aggregation_constant)  # validate before any work
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], pad_token_id)
    batch["advantages"] = place_per_token(batch, advantages)
    micro, sort, bf16 = settings.micro_batch_size, settings.sort_micro_batches, settings.bf16_autocast
    multiple = AUTOCAST_WIDTH_MULTIPLE if bf16 else 1
    share = sharing_prompts(policy, settings.share_prompt_forward)
    policy.eval()
    t_logprobs = time.perf_counter()
    # one optimiser step on this batch: π_old is the policy as it is now (module docstring)
    reuse_policy = old_logprobs is None and single_step(len(episodes), local_mb, settings.epochs)
    if old_logprobs is None and not reuse_policy:
        batch["old_logp"] = batch_logprobs(policy, batch, settings.temperature, micro, sort, bf16, share)
    elif old_logprobs is not None:
        if tuple(old_logprobs.shape) != tuple(batch["input_ids"].shape):
            raise ValueError(f"old_logprobs: expected shape {tuple(batch['input_ids'].shape)} (the batch_sequences "
                             f"layout of the episodes), got {tuple(old_logprobs.shape)}")
        batch["old_logp"] = old_logprobs.detach().float().cpu() * batch["response_mask"]
    if settings.kl_coef > 0:
        batch["ref_logp"] = batch_logprobs(reference, batch, settings.temperature, micro, sort, bf16,
                                           settings.share_prompt_forward)
    t_logprobs = time.perf_counter() - t_logprobs
    policy.train()
    device = next(policy.parameters()).device
    stats: dict[str, list[float]] = {k: [] for k in ("loss", "pg_loss", "kl", "clip_frac", "ratio", "grad_norm")}
    skipped = nonfinite = trailing = 0
    n = len(episodes)
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator).tolist()
        for mb_rows in _chunks(order, local_mb):
            mb = _select(batch, mb_rows)
            mask = mb["response_mask"].float()
            counts = _reduce(torch.tensor([float(mask.sum()), float(len(mb_rows))], dtype=torch.float64), dist)
            n_tok, n_seq = float(counts[0]), float(counts[1])
            if settings.permute_advantages:  # the null control (before whitening: the values are kept)
                mb["advantages"] = core.permute_advantages(mb["advantages"], mask, generator)
            if settings.whiten_advantages:
                mb["advantages"] = whiten_global(mb["advantages"], mask, dist)
            n_tokens = max(n_tok, 1.0)
            pg_norm = _aggregation_norm(settings.pg_aggregation, n_tok, n_seq, settings.aggregation_constant)
            kl_norm = _aggregation_norm(settings.kl_aggregation, n_tok, n_seq, settings.aggregation_constant)
            optimizer.zero_grad(set_to_none=True)
            # this rank's sums of: loss, pg_loss, Σ kl, Σ clipped, Σ ratio (reduced once per mini-batch)
            acc = torch.zeros(5, dtype=torch.float64, device=device)
            for part in micro_batch_rows(mb["attention_mask"], micro, sort, prompt_groups(mb) if share else None):
                sub = {k: v.to(device) for k, v in _select(mb, part, multiple).items()}
                sub_mask = sub["response_mask"].float()
                with _precision(device, bf16):
                    logp = response_logprobs(policy, sub, settings.temperature, share_prompt=share,
                                             width_multiple=multiple)
                logp = logp.float()
                old_logp = logp.detach() if reuse_policy else sub["old_logp"]
                pg, ratio, clipped = core.POLICY_LOSSES[settings.policy_loss](
                    logp, old_logp, sub["advantages"], settings.clip_eps, settings.clip_eps_high)
                pg_term = core.aggregate_sum(pg, sub_mask, settings.pg_aggregation) / pg_norm
                loss = pg_term
                kl_sum = torch.zeros((), device=device)
                if settings.kl_coef > 0:
                    kl = core.kl_estimate(logp, sub["ref_logp"], settings.kl_estimator).clamp(
                        -settings.kl_clamp, settings.kl_clamp)
                    loss = loss + settings.kl_coef * core.aggregate_sum(kl, sub_mask, settings.kl_aggregation) / kl_norm
                    kl_sum = core.masked_sum(kl.detach(), sub_mask)
                loss.backward()
                acc += torch.stack([loss.detach(), pg_term.detach(), kl_sum, core.masked_sum(clipped, sub_mask),
                                    core.masked_sum(ratio.detach(), sub_mask)]).double()
            loss_g, pg_g, kl_g, clip_g, ratio_g = _reduce(acc, dist).tolist()
            sums = {"loss": loss_g, "pg_loss": pg_g, "kl": kl_g / n_tokens, "clip_frac": clip_g / n_tokens,
                    "ratio": ratio_g / n_tokens}
            if sums["ratio"] > settings.max_ratio:
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                trailing = 0
                continue
            if _is_multi(dist):
                dist.all_reduce_grads(policy)
            grad_norm = grad_norm_clip(policy.parameters(), settings.grad_clip)  # global when sharded
            if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                nonfinite += 1
                trailing += 1
                continue
            optimizer.step()
            scheduler.step()
            trailing = 0
            for name, value in sums.items():
                stats[name].append(value)
            stats["grad_norm"].append(grad_norm)
    policy.eval()
    out = {k: (sum(v) / len(v) if v else float("nan")) for k, v in stats.items()}
    out["optimizer_steps"] = float(len(stats["loss"]))
    out["skipped_minibatches"] = float(skipped)
    out["nonfinite_minibatches"] = float(nonfinite)
    out["nonfinite_trailing"] = float(trailing)
    out["time_logprobs"] = t_logprobs
    if settings.kl_coef == 0:
        del out["kl"]
    return out
