"""Supervised fine-tuning on (prompt, response) pairs.

`train_sft` is the reusable step (the tiny model's warm start in `algos.models.warm_start`; RestEM's
"fine-tune the base model on the kept correct samples"). It follows VinePPO's SFT recipe
(reference/vineppo_reference.md §6; McGill-NLP/VinePPO ``configs/sft_*_for_gsm8k.jsonnet``):

- the prompt gets BOS (the tokenizer adds it), the response is followed by EOS;
- the loss is the token cross-entropy on the response tokens and the EOS only, averaged per instance
  over its response tokens, then over the instances of the batch;
- AdamW, linear warm-up then linear decay to zero, gradient-norm clipping.

Tokenisation is the one an RL environment uses, so the fine-tuned policy sees at train time exactly
the ids it will be prompted with::

    prompt_ids   = tokenizer(prompt).input_ids                                # <s> + prompt
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [eos_token_id]
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

#: Label value of positions that do not contribute to the loss (prompt tokens, padding).
IGNORE_INDEX = -100


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has fast bf16 kernels on this CPU (x86 with AVX512 / AVX512-BF16 / AMX, Arm
    with the BF16 extension; ``torch.ops.mkldnn._is_mkldnn_bf16_supported``). Where it has, bf16
    autocast made tiny-model SFT ~2x faster on the project's CPU; elsewhere (e.g. AVX2-only CPUs)
    bf16 falls back to slow reference kernels, so float32 is the better default."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class SFTConfig:
    """Hyper-parameters of `train_sft`.

    The defaults suit the offline ``tiny`` model trained from scratch on CPU (see
    `TINY_GSM8K_SFT` for the measured GSM8K warm start). For a pretrained hub model use VinePPO's
    values instead: ``learning_rate=1e-5`` (Rho-1B) or ``5e-5`` (DeepSeekMath-7B), ``batch_size=64``,
    ``epochs=2``, ``max_length=2048``.
    """

    learning_rate: float = 2e-3
    """Peak AdamW learning rate, reached after the warm-up (> 0)."""
    batch_size: int = 32
    """Instances per optimiser step (>= 1)."""
    epochs: float = 1.0
    """Passes over the examples (> 0, may be fractional); ignored when ``max_steps`` is set."""
    max_steps: int | None = None
    """Optimiser steps to run (>= 1); ``None`` derives them from ``epochs``."""
    warmup_ratio: float = 0.05
    """Fraction of the steps spent in linear warm-up from 0 to ``learning_rate`` (in [0, 1))."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (>= 0), applied to matrices only, not to norms/biases."""
    grad_clip: float = 1.0
    """Maximum global gradient L2 norm (> 0); ``math.inf`` disables clipping."""
    max_length: int = 512
    """Longest instance in tokens, BOS + prompt + response + EOS (>= 2); longer ones are skipped
    (a truncated target would teach the model never to stop)."""
    seed: int = 0
    """Seeds torch's global RNG and the data order (>= 0)."""
    bf16_autocast: bool = field(default_factory=cpu_has_fast_bf16)
    """Run forward/backward under ``torch.autocast(dtype=torch.bfloat16)`` (weights, optimiser and
    loss stay float32); the default is `cpu_has_fast_bf16()`. On the project's 2-core AVX512-BF16
    CPU it made a tiny-model SFT step 2.2x faster (549 vs 1203 ms, batch 32) with the same loss
    after 40 steps (4.17 vs 4.15); on a CPU without fast bf16 kernels it is slower."""
    micro_batch_size: int | None = None
    """Instances per forward/backward (gradient accumulation); ``None`` means ``batch_size``. Only
    memory changes: the loss is the same per-instance mean over the whole batch."""
    group_by_length: bool = True
    """Batch instances of similar length (shuffle, sort within windows of 50 batches, shuffle the
    batches) to cut padding; the data order stays random and seeded."""
    pad_to_multiple_of: int = 32
    """Pad each batch's length up to a multiple of this many tokens (>= 1). Few distinct shapes
    keep oneDNN's per-shape kernel cache small: with bf16 autocast on CPU and every batch a new
    length, process memory kept growing (1.4 -> 2.5 GB in 120 steps in our check; flat at
    1.1-1.3 GB with lengths rounded to 32 or 64). Costs ~16 padding tokens per instance on
    average."""

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ValueError(f"SFTConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)

        check("learning_rate", is_num(self.learning_rate) and 0 < self.learning_rate < math.inf,
              "a finite float > 0")
        check("batch_size", is_int(self.batch_size) and self.batch_size >= 1, "an int >= 1")
        check("epochs", is_num(self.epochs) and 0 < self.epochs < math.inf, "a finite float > 0")
        check("max_steps", self.max_steps is None or (is_int(self.max_steps) and self.max_steps >= 1),
              "None or an int >= 1")
        check("warmup_ratio", is_num(self.warmup_ratio) and 0 <= self.warmup_ratio < 1,
              "a float in [0, 1)")
        check("weight_decay", is_num(self.weight_decay) and 0 <= self.weight_decay < math.inf,
              "a finite float >= 0")
        check("grad_clip", is_num(self.grad_clip) and self.grad_clip > 0,
              "a float > 0 (math.inf: no clipping)")
        check("max_length", is_int(self.max_length) and self.max_length >= 2, "an int >= 2")
        check("seed", is_int(self.seed) and self.seed >= 0, "an int >= 0")
        check("bf16_autocast", isinstance(self.bf16_autocast, bool), "a bool")
        check("micro_batch_size",
              self.micro_batch_size is None
              or (is_int(self.micro_batch_size) and 1 <= self.micro_batch_size <= self.batch_size),
              f"None or an int in [1, batch_size={self.batch_size}]")
        check("group_by_length", isinstance(self.group_by_length, bool), "a bool")
        check("pad_to_multiple_of", is_int(self.pad_to_multiple_of) and self.pad_to_multiple_of >= 1,
              "an int >= 1")


@dataclass(frozen=True)
class _Tokenized:
    ids: list[int]
    n_prompt: int  # the first n_prompt ids are the prompt (BOS included); the rest is response + EOS


def tokenize_sft_examples(
    tokenizer: transformers.PreTrainedTokenizerBase, examples: Sequence[tuple[str, str]]
) -> list[_Tokenized]:
    """Token ids of each (prompt, response) pair, as an RL environment would build them.

    ``ids = tokenizer(prompt).input_ids + tokenizer(response, add_special_tokens=False).input_ids
    + [eos_token_id]``; ``n_prompt`` counts the prompt part.

    Raises:
        ValueError: if the tokenizer has no EOS token, or an example is not a pair of strings or has
            an empty response.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: expected a tokenizer with an EOS token, got eos_token_id=None")
    prompts, responses = [], []
    for i, ex in enumerate(examples):
        if not (isinstance(ex, (tuple, list)) and len(ex) == 2
                and isinstance(ex[0], str) and isinstance(ex[1], str)):
            raise ValueError(
                f"examples[{i}]: expected a (prompt: str, response: str) pair, got {ex!r:.80}"
            )
        if not ex[1]:
            raise ValueError(f"examples[{i}]: expected a non-empty response, got ''")
        prompts.append(ex[0])
        responses.append(ex[1])
    if not prompts:
        return []
    p_ids = tokenizer(prompts).input_ids
    r_ids = tokenizer(responses, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    return [_Tokenized(list(p) + list(r) + [eos], len(p)) for p, r in zip(p_ids, r_ids)]


def _batch_order(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator, group_by_length: bool
) -> list[list[int]]:
    """One epoch of batches (lists of instance indices): a seeded shuffle, optionally grouped by
    length in windows of 50 batches (the last batch may be smaller)."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        window = 50 * batch_size
        perm = [
            i
            for start in range(0, len(perm), window)
            for i in sorted(perm[start:start + window], key=lambda j: lengths[j], reverse=True)
        ]
    batches = [perm[s:s + batch_size] for s in range(0, len(perm), batch_size)]
    if group_by_length:
        order = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[k] for k in order]
    return batches


def sft_examples_to_batches(
    tokenized: Sequence[_Tokenized],
    indices: Sequence[int],
    pad_token_id: int,
    pad_to_multiple_of: int = 1,
) -> dict[str, torch.Tensor]:
    """Collate instances into one right-padded batch, ``seq`` = the longest instance rounded up to
    a multiple of ``pad_to_multiple_of``.

    Right padding keeps every instance's positions at 0..len-1 (Llama derives position ids from the
    sequence index, not from the attention mask), so no ``position_ids`` are needed.

    Returns:
        ``input_ids`` (batch, seq) int64, ``attention_mask`` (batch, seq) int64 (1 on real tokens),
        ``labels`` (batch, seq) int64: the token id on response and EOS positions,
        `IGNORE_INDEX` on prompt and padding positions (labels are not shifted: ``labels[:, t]`` is
        predicted from positions ``< t``).
    """
    items = [tokenized[i] for i in indices]
    width = max(len(it.ids) for it in items)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.ids)
        ids = torch.tensor(it.ids, dtype=torch.long)
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
        labels[row, it.n_prompt:n] = ids[it.n_prompt:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-instance mean next-token cross-entropy over the labelled positions.

    Args:
        logits: (batch, seq, vocab) scores; position ``t`` predicts token ``t + 1``.
        labels: (batch, seq) target ids, `IGNORE_INDEX` where no loss is taken.

    Returns:
        ``(per_instance, n_tokens)``: (batch,) mean loss in nats per labelled token (0 for an
        instance with none) and (batch,) the number of labelled tokens. VinePPO's SFT averages
        ``per_instance`` over the batch.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    # Only the labelled positions go through the (float32) softmax: about half the tokens of a
    # GSM8K instance are prompt, and a full (batch, seq, vocab) float copy is the largest tensor.
    rows = mask.nonzero(as_tuple=True)[0]
    token_loss = F.cross_entropy(logits[:, :-1][mask].float(), targets[mask], reduction="none")
    n_tokens = mask.sum(dim=1)
    summed = torch.zeros(labels.shape[0], dtype=token_loss.dtype, device=logits.device)
    summed = summed.index_add(0, rows, token_loss)
    per_instance = summed / n_tokens.clamp(min=1)
    return per_instance, n_tokens


def train_sft(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str]],
    config: SFTConfig,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place on (prompt, response) pairs; loss on response tokens + EOS only.

    The loss of a batch is the mean over its instances of each instance's mean cross-entropy over
    its response tokens and EOS (VinePPO SFT, reference/vineppo_reference.md §6). Optimiser: AdamW
    (betas 0.9/0.999, decay on >= 2-D weights only), linear warm-up over
    ``ceil(warmup_ratio * steps)`` steps then linear decay to 0
    (``transformers.get_linear_schedule_with_warmup``), global grad-norm clipping. Runs on the
    model's device; seeds torch's global RNG with ``config.seed``. Leaves the model in eval mode.

    Args:
        model: a causal LM returning ``.logits`` (batch, seq, vocab).
        tokenizer: its tokenizer; must have an EOS token; padding uses its pad token (EOS if none).
        examples: ``(prompt, response)`` pairs; the response text directly follows the prompt text
            (for VinePPO's GSM8K format it starts with ``"\\n"``).
        config: hyper-parameters.
        progress: show a tqdm bar.

    Returns:
        One dict per optimiser step: ``step`` (1-based), ``epoch`` (fraction of passes done),
        ``loss`` (nats per response token, batch mean of per-instance means), ``lr`` (the rate
        used for that step), ``grad_norm`` (before clipping), ``tokens`` (response + EOS tokens
        in the batch), ``tokens_total`` (non-pad tokens), ``seconds`` (wall time since start).

    Raises:
        ValueError: if no example fits in ``config.max_length`` tokens, or on bad examples (see
            `tokenize_sft_examples`).
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    tokenized_all = tokenize_sft_examples(tokenizer, examples)
    tokenized = [t for t in tokenized_all if len(t.ids) <= config.max_length]
    if not tokenized:
        raise ValueError(
            f"examples: expected at least one example of <= max_length={config.max_length} tokens, "
            f"got {len(tokenized_all)} examples, none short enough"
        )
    if len(tokenized) < len(tokenized_all):
        logger.warning("SFT: skipped %d of %d examples longer than max_length=%d tokens",
                       len(tokenized_all) - len(tokenized), len(tokenized_all), config.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lengths = [len(t.ids) for t in tokenized]
    batches_per_epoch = math.ceil(len(tokenized) / config.batch_size)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * batches_per_epoch))
    micro = config.micro_batch_size or config.batch_size

    device = next(model.parameters()).device
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(0.9, 0.999),
    )
    scheduler = transformers.get_linear_schedule_with_warmup(
        optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps
    )
    generator = torch.Generator().manual_seed(config.seed)
    model.train()

    metrics: list[dict[str, float]] = []
    epoch_batches: list[list[int]] = []
    bar = tqdm(total=total_steps, desc="SFT", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for step in range(1, total_steps + 1):
            if not epoch_batches:
                epoch_batches = _batch_order(
                    lengths, config.batch_size, generator, config.group_by_length
                )
            indices = epoch_batches.pop(0)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            loss_sum, n_resp, n_total = 0.0, 0, 0
            for m0 in range(0, len(indices), micro):
                batch = sft_examples_to_batches(
                    tokenized, indices[m0:m0 + micro], pad_id, config.pad_to_multiple_of
                )
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16_autocast):
                    logits = model(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).logits
                per_instance, n_tokens = sft_loss(logits, batch["labels"])
                # Sum over micro-batches of (sum of per-instance means) / batch size = batch mean.
                loss = per_instance.sum() / len(indices)
                loss.backward()
                loss_sum += float(loss.detach())
                n_resp += int(n_tokens.sum())
                n_total += int(batch["attention_mask"].sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            record = {
                "step": step,
                "epoch": step / batches_per_epoch,
                "loss": loss_sum,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": n_resp,
                "tokens_total": n_total,
                "seconds": time.perf_counter() - start,
            }
            metrics.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}")
    finally:
        bar.close()
    model.eval()
    return metrics

