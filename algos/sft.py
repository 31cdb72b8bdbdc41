"""Supervised fine-tuning on (prompt, response) pairs, and the cached warm start of the offline
``tiny`` model.

`train_sft` is the reusable step (the tiny model's warm start here; RestEM's "fine-tune the base
model on the kept correct samples" later). It follows VinePPO's SFT recipe
(reference/vineppo_reference.md §6; McGill-NLP/VinePPO ``configs/sft_*_for_gsm8k.jsonnet``):

- the prompt gets BOS (the tokenizer adds it), the response is followed by EOS;
- the loss is the token cross-entropy on the response tokens and the EOS only, averaged per instance
  over its response tokens, then over the instances of the batch;
- AdamW, linear warm-up then linear decay to zero, gradient-norm clipping.

Tokenisation is the one an RL environment uses, so the fine-tuned policy sees at train time exactly
the ids it will be prompted with::

    prompt_ids   = tokenizer(prompt).input_ids                                # <s> + prompt
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [eos_token_id]

`warm_start` builds the tokenizer and the tiny model, runs `train_sft`, and saves both in Hugging
Face format under ``cache_dir/<name>-<hash>``; a later call with the same inputs reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm

from algos.tiny import (
    DEFAULT_VOCAB_SIZE,
    build_char_tokenizer,
    build_tiny_model,
    build_tokenizer,
    count_parameters,
)

logger = logging.getLogger(__name__)

#: Label value of positions that do not contribute to the loss (prompt tokens, padding).
IGNORE_INDEX = -100

#: Name of the file `warm_start` writes last into a finished cache directory.
WARM_START_MARKER = "warm_start.json"
#: Per-step SFT metrics saved next to the warm-started model (one JSON object per line).
WARM_START_METRICS = "sft_metrics.jsonl"
#: Tokenizer kinds of `warm_start`: byte-level BPE (`algos.tiny.build_tokenizer`) or one token per
#: character (`algos.tiny.build_char_tokenizer`).
TOKENIZER_KINDS = ("bpe", "char")
#: Bumped when the cached artefact's format or the warm-start procedure changes (invalidates caches).
_WARM_START_FORMAT = 1


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


#: Model overrides of the tiny GSM8K warm start (`algos.tiny.tiny_config` arguments):
#: hidden 256, 4 layers, 4 heads, MLP 1024, vocab 2048 -> 4.7M parameters.
TINY_GSM8K_MODEL: dict[str, Any] = {"hidden_size": 256, "num_layers": 4, "num_heads": 4}

#: The tiny model's GSM8K warm start, measured on the project's 2-core CPU (AVX512-BF16, torch 2.13)
#: with the 7,473 GSM8K train pairs: 400 steps of 32 (1.7 epochs; 0.7-0.8 s/step with bf16
#: autocast) -> 4.5-5.5 min wall including the tokenizer (325 s measured); response loss
#: 7.6 -> ~2.5 nats/token (held-out 2.55); greedy answers end in "#### N" ~half the time.
#: At this budget lr 2e-3 beat 1e-3 and 3e-3 (held-out loss 2.55 / 2.65 / 3.13); 350 steps
#: (265 s) gave held-out 2.72 and 41% "#### N", 450 steps (310-330 s) 2.45 and 64%.
TINY_GSM8K_SFT = SFTConfig(
    learning_rate=2e-3,
    batch_size=32,
    max_steps=400,
    warmup_ratio=0.05,
    weight_decay=0.0,
    grad_clip=1.0,
    max_length=1024,
    seed=0,
    bf16_autocast=cpu_has_fast_bf16(),
)

#: Model overrides of the tiny arithmetic warm start: hidden 256, 4 layers, 4 heads, MLP 1024, a
#: character vocabulary of ~50 tokens -> ~4.2M parameters.
TINY_ARITHMETIC_MODEL: dict[str, Any] = {"hidden_size": 256, "num_layers": 4, "num_heads": 4}

#: The tiny model's warm start on the synthetic ``arithmetic`` task (defaults: 2-4 operations,
#: operands 1-9, 20,000 train problems), character tokenizer (54 tokens, 4.21M parameters): 800 steps
#: of 64 (2.6 epochs). Measured on the project's 2-core CPU (AVX512-BF16, torch 2.13, bf16 autocast):
#: 781 s wall (~1 s/step; more when the CPU is shared); response loss 4.03 -> 0.105 (last 50 steps),
#: validation 0.109; greedy accuracy on the first 1000 test problems 33% (2 ops 50%, 3 ops 31%,
#: 4 ops 18%; 92% of the first errors are arithmetic slips, the rest misread operations), sampled
#: (T 0.6, top-p 0.9) 28%, a third of 4-sample groups mixed: room to learn and signal for RL.
#: lr 2e-3 failed here (loss stuck at 0.63, 8% greedy: the model never learned to copy numbers).
TINY_ARITHMETIC_SFT = SFTConfig(
    learning_rate=1e-3,
    batch_size=64,
    max_steps=800,
    warmup_ratio=0.05,
    weight_decay=0.0,
    grad_clip=1.0,
    max_length=256,
    seed=0,
    bf16_autocast=cpu_has_fast_bf16(),
)


@dataclass(frozen=True)
class TinySetup:
    """How the offline ``tiny`` model is built and warm-started for one task (see `tiny_setup`).

    Attributes:
        tokenizer: tokenizer kind for `warm_start` (one of `TOKENIZER_KINDS`).
        vocab_size: BPE vocabulary size; None for ``"char"`` (the vocabulary is the alphabet).
        model_overrides: `algos.tiny.tiny_config` arguments.
        sft_config: SFT hyper-parameters of the warm start.
    """

    tokenizer: str
    vocab_size: int | None
    model_overrides: dict[str, Any]
    sft_config: SFTConfig


def tiny_setup(task_name: str) -> TinySetup:
    """The tiny-model setup of a task: the character-level arithmetic setup
    (`TINY_ARITHMETIC_MODEL`, `TINY_ARITHMETIC_SFT`) for ``"arithmetic"``, the GSM8K one
    (byte-level BPE of `DEFAULT_VOCAB_SIZE`, `TINY_GSM8K_MODEL`, `TINY_GSM8K_SFT`) for any other
    task. Use it as::

        setup = tiny_setup(task.name)
        warm_start(name, examples, texts, cache_dir, setup.model_overrides, setup.sft_config,
                   progress=progress, vocab_size=setup.vocab_size, tokenizer=setup.tokenizer)
    """
    if task_name == "arithmetic":
        return TinySetup("char", None, dict(TINY_ARITHMETIC_MODEL), TINY_ARITHMETIC_SFT)
    return TinySetup("bpe", DEFAULT_VOCAB_SIZE, dict(TINY_GSM8K_MODEL), TINY_GSM8K_SFT)


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


def _fingerprint(items: Iterable[Any]) -> str:
    """sha256 of a sequence of strings / string tuples, length-prefixed so boundaries count."""
    h = hashlib.sha256()
    for item in items:
        parts = item if isinstance(item, (tuple, list)) else (item,)
        h.update(b"%d:" % len(parts))
        for part in parts:
            data = str(part).encode("utf-8", "surrogatepass")
            h.update(b"%d:" % len(data))
            h.update(data)
    return h.hexdigest()


def warm_start_key(
    name: str,
    examples: Sequence[tuple[str, str]],
    tokenizer_texts: Sequence[str],
    model_overrides: dict[str, Any],
    sft_config: SFTConfig,
    vocab_size: int | None = DEFAULT_VOCAB_SIZE,
    tokenizer: str = "bpe",
) -> dict[str, Any]:
    """Everything the warm-started model depends on, as a JSON-serialisable dict (hashed into the
    cache directory name).

    For ``tokenizer="bpe"`` the dict is the one of the original format (no ``tokenizer`` field), so
    existing BPE caches stay valid. For ``"char"`` it adds ``"tokenizer": "char"`` and records
    ``vocab_size`` as None: the vocabulary is the corpus alphabet, whatever ``vocab_size`` says."""
    try:
        overrides = json.loads(json.dumps(model_overrides, sort_keys=True))
    except TypeError as e:
        raise ValueError(
            f"model_overrides: expected JSON-serialisable values, got {model_overrides!r}"
        ) from e
    key: dict[str, Any] = {
        "format": _WARM_START_FORMAT,
        "name": name,
        "vocab_size": vocab_size if tokenizer == "bpe" else None,
        "model_overrides": overrides,
        "sft_config": asdict(sft_config),
        "examples": _fingerprint(examples),
        "n_examples": len(examples),
        "tokenizer_texts": _fingerprint(tokenizer_texts),
    }
    if tokenizer != "bpe":
        key["tokenizer"] = tokenizer
    return key


def warm_start(
    name: str,
    examples: Sequence[tuple[str, str]],
    tokenizer_texts: Iterable[str],
    cache_dir: Path | str,
    model_overrides: dict[str, Any] | None = None,
    sft_config: SFTConfig | None = None,
    progress: bool = True,
    *,
    vocab_size: int | None = DEFAULT_VOCAB_SIZE,
    tokenizer: str = "bpe",
) -> Path:
    """Build (or reuse) a tokenizer + tiny model warm-started by SFT, saved in Hugging Face format.

    On a cache miss: build the tokenizer from ``tokenizer_texts`` (`algos.tiny.build_tokenizer`, or
    `algos.tiny.build_char_tokenizer` for ``tokenizer="char"``),
    seed torch with ``sft_config.seed``, build the model (`algos.tiny.build_tiny_model` with
    ``model_overrides``), run `train_sft`, and save model, tokenizer, ``sft_metrics.jsonl`` and
    finally the marker ``warm_start.json`` into a temporary sibling directory that is then renamed
    to ``cache_dir/<name>-<hash>`` (atomic: a killed run leaves only a ``.tmp-*`` directory, never a
    half-written one that would be reused). On a hit (the directory and its marker exist) nothing is
    trained. The hash covers ``name``, the tokenizer kind, ``vocab_size`` (BPE only),
    ``model_overrides``, ``sft_config`` and fingerprints of ``examples`` and ``tokenizer_texts``
    (see `warm_start_key`).

    Args:
        name: cache name, ``[A-Za-z0-9._-]+`` (e.g. ``"tiny-gsm8k"``).
        examples: SFT ``(prompt, response)`` pairs (see `train_sft`).
        tokenizer_texts: the tokenizer's training corpus.
        cache_dir: parent directory of the cached models (created if missing).
        model_overrides: `algos.tiny.tiny_config` arguments (JSON-serialisable); ``None``: defaults.
        sft_config: SFT hyper-parameters; ``None``: `TINY_GSM8K_SFT`.
        progress: show the SFT progress bar.
        vocab_size: BPE vocabulary size of the tokenizer; ``None`` means `DEFAULT_VOCAB_SIZE`.
            Ignored for ``tokenizer="char"``.
        tokenizer: tokenizer kind, ``"bpe"`` (byte-level BPE, the default) or ``"char"`` (one token
            per character of the corpus alphabet).

    Returns:
        The model directory, loadable by ``AutoModelForCausalLM.from_pretrained(path)`` and
        ``AutoTokenizer.from_pretrained(path)``.

    Raises:
        ValueError: on a bad ``name``, ``tokenizer`` kind, non-serialisable ``model_overrides``, or
            bad examples.
    """
    if tokenizer not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer: expected one of {', '.join(map(repr, TOKENIZER_KINDS))}, got {tokenizer!r}")
    if tokenizer == "bpe" and vocab_size is None:
        vocab_size = DEFAULT_VOCAB_SIZE
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"name: expected letters, digits, '.', '_' or '-' (not leading), got {name!r}")
    model_overrides = dict(model_overrides or {})
    sft_config = sft_config if sft_config is not None else TINY_GSM8K_SFT
    examples = list(examples)
    texts = list(tokenizer_texts)
    key = warm_start_key(name, examples, texts, model_overrides, sft_config, vocab_size, tokenizer)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    final = cache_dir / f"{name}-{digest}"
    if (final / WARM_START_MARKER).is_file():
        logger.info("warm start: reusing %s", final)
        return final

    cache_dir.mkdir(parents=True, exist_ok=True)
    if final.exists():  # no marker: not produced by a finished warm_start; move it out of the way
        stale = cache_dir / f".stale-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = cache_dir / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    logger.info("warm start: training %s (model %s, %d examples)",
                final, model_overrides, len(examples))
    t0 = time.perf_counter()
    try:
        tok = build_char_tokenizer(texts) if tokenizer == "char" else build_tokenizer(texts, vocab_size)
        torch.manual_seed(sft_config.seed)
        model = build_tiny_model(tok, **model_overrides)
        metrics = train_sft(model, tok, examples, sft_config, progress=progress)
        tmp.mkdir()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(tmp / WARM_START_METRICS, "w", encoding="utf-8") as f:
            for m in metrics:
                f.write(json.dumps(m) + "\n")
        marker = {
            "key": key,
            "hash": digest,
            "parameters": count_parameters(model),
            "vocab_size": len(tok),
            "steps": len(metrics),
            "final_loss": metrics[-1]["loss"],
            "seconds": time.perf_counter() - t0,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        with open(tmp / WARM_START_MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / WARM_START_MARKER).is_file():  # not a concurrent finished run
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("warm start: saved %s in %.0f s", final, time.perf_counter() - t0)
    return final
