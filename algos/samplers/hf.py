"""`HFSampler`: the `Sampler` protocol over Hugging Face `transformers` ``generate`` (CPU or GPU).

Log-probs follow the convention in `algos.samplers.base` (tempered, before top-p).
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from algos.samplers.base import (
    Completion,
    SamplingParams,
    check_sampler_args,
    copy_weights,
    finish_completion,
    prompt_caps,
)

# --------------------------------------------------------------------------------------------
# generate() hooks
#
# Why hooks instead of `output_logits=True` and HF's own `stop_strings=`:
# * `output_logits=True` keeps every step's raw logits, (rows, steps, vocab) float32: 8.4 GB for
#   64 rows x 1024 steps x 32k vocab. The two hooks below keep one step, (rows, vocab), and reduce
#   it to one float per row as soon as the token is chosen.
# * HF's `StopStringCriteria` matches the end of the whole `input_ids`, prompt included, so a stop
#   string that straddles the prompt/response boundary fires; we only search the generated text.
#   We also need to know where each stop string was completed to cut the completion.
# Custom logits processors run after generate's own "processors" (none are built from the
# neutral config we pass) and before the sampling warpers (temperature, top-p), so
# `_StashLogSoftmax` sees the raw logits. tests/test_sampling.py checks the returned log-probs
# against a fresh forward pass, which would catch a change of that order.
# --------------------------------------------------------------------------------------------


class _StashLogSoftmax(LogitsProcessor):
    """Keeps ``log_softmax(raw_logits / temperature)`` of the current step; never changes scores."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.last: torch.Tensor | None = None  # (rows, vocab) float32

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores / self.temperature if self.temperature > 0 else scores
        self.last = torch.log_softmax(logits.float(), dim=-1)
        return scores


class _GatherChosenLogprob(StoppingCriteria):
    """After each step, gathers the stashed log-prob of the token just appended; never stops."""

    def __init__(self, stash: _StashLogSoftmax):
        self.stash = stash
        self.steps: list[torch.Tensor] = []  # each (rows,) float32

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        assert self.stash.last is not None, "logits processor did not run before the stopping criteria"
        self.steps.append(self.stash.last.gather(1, input_ids[:, -1:]).squeeze(1))
        self.stash.last = None
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _StopOnGeneratedText(StoppingCriteria):
    """Stops a row once the decoded text of its *generated* tokens contains a stop string.

    Only the last ``window`` generated tokens are decoded each step: enough to hold any stop
    string (a character spans at most 4 byte-level tokens) plus slack, so the check costs
    O(rows x window) per step instead of O(rows x steps). The exact cut point is recomputed on the
    full generated text afterwards (`HFSampler._finish`).
    """

    def __init__(self, tokenizer, stop_strings: tuple[str, ...], prompt_width: int, rows: int):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.prompt_width = prompt_width
        self.window = 4 * max(len(s) for s in stop_strings) + 8
        self.first_hit: list[int | None] = [None] * rows  # generated-token count at the first hit

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_width :]
        texts = self.tokenizer.batch_decode(generated[:, -self.window :].tolist(), skip_special_tokens=True)
        hit = [any(s in t for s in self.stop_strings) for t in texts]
        for r, h in enumerate(hit):
            if h and self.first_hit[r] is None:
                self.first_hit[r] = generated.shape[1]
        return torch.tensor(hit, dtype=torch.bool, device=input_ids.device)


class _StopAtCaps(StoppingCriteria):
    """Stops each row once it has generated its own cap of tokens (rows of one batch may have
    different caps; the batch runs for the largest)."""

    def __init__(self, caps: list[int], prompt_width: int):
        self.caps = caps
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        n = input_ids.shape[1] - self.prompt_width
        return torch.tensor([n >= c for c in self.caps], dtype=torch.bool, device=input_ids.device)


# --------------------------------------------------------------------------------------------


class HFSampler:
    """Batched sampling with `transformers` `generate` (left padding, KV cache).

    Args:
        model: a causal LM (`PreTrainedModel`). It is shared, not copied: the sampler always
            uses its current weights. Its train/eval mode is restored after each call.
        tokenizer: its tokenizer; must have an EOS token. PAD falls back to EOS.
        max_batch_size: most sequences (prompts x n) per `generate` call.
        max_context: most tokens of prompt + completion. ``None`` means the model's
            ``config.max_position_embeddings`` when it has one, else no cap.
        cache_implementation: the `transformers` KV-cache class for `generate`: ``None`` (the
            default dynamic cache, grown by concatenation every step) or ``"static"``
            (preallocated, written in place).

    Rows are sorted by prompt length (longest first) to reduce padding, chunked, generated and
    returned in input order. With a seed, the global torch RNG is forked for the call (restored
    afterwards); note that a row's sample then depends on the whole batch it was drawn with.
    EOS is ``tokenizer.eos_token_id`` only; the model's generation config (extra EOS ids,
    top_k=50, repetition penalties, ...) is deliberately ignored so that sampling is exactly
    what `SamplingParams` says.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 64, max_context: int | None = None,
                 cache_implementation: str | None = None):
        max_context = check_sampler_args(model, tokenizer, max_batch_size, max_context, "HFSampler")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.cache_implementation = cache_implementation
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id

    def update_weights(self, model) -> None:
        """Copy ``model``'s weights into the sampler's model (no-op when it is the same object)."""
        copy_weights(self.model, model)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seed: int | None = None,
        budgets: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """Sample ``params.n`` completions per prompt; see `Sampler.generate` (``budgets``: per-prompt
        caps; a row stops at its own cap, rows of different caps share a batch).

        Raises:
            ValueError: an empty prompt, or a prompt longer than ``max_context`` (naming its
                index, its length and the limit); bad ``budgets`` (`prompt_caps`).
        """
        _, room = prompt_caps(prompts, params.max_new_tokens, self.max_context)
        prompts, caps = prompt_caps(prompts, params.max_new_tokens, self.max_context, budgets)

        # One row per (prompt, sample). Longest prompts first; rows that share a length share a
        # context room, so cutting chunks where the room changes keeps every row within the
        # context. Within a chunk each row stops at its own cap (`_StopAtCaps`).
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        rows.sort(key=lambda r: -len(prompts[r[0]]))
        chunks: list[list[tuple[int, int]]] = []
        for r in rows:
            if chunks and len(chunks[-1]) < self.max_batch_size and room[chunks[-1][0][0]] == room[r[0]]:
                chunks[-1].append(r)
            else:
                chunks.append([r])

        results: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices, enabled=seed is not None), torch.inference_mode():
                if seed is not None:
                    torch.manual_seed(seed)
                for chunk in chunks:
                    chunk_prompts = [prompts[i] for i, _ in chunk]
                    outs = self._generate_chunk(chunk_prompts, params, [caps[i] for i, _ in chunk])
                    for (i, j), c in zip(chunk, outs):
                        results[i][j] = c
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    # ----------------------------------------------------------------------------------------

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams, caps: list[int]) -> list[Completion]:
        cap = max(caps)
        if cap == 0:  # the prompt fills the context exactly (or no budget): nothing can be generated
            return [Completion([], [], "length", "") for _ in prompts]
        device = self.model.device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding
            input_ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[r, width - len(p) :] = 1

        greedy = params.temperature == 0
        config = GenerationConfig(
            max_new_tokens=cap,
            do_sample=not greedy,
            temperature=None if greedy else float(params.temperature),
            top_p=None if greedy else float(params.top_p),
            top_k=None if greedy else 0,  # unset, the global default top_k=50 would apply
            num_beams=1,
            num_return_sequences=1,  # rows are already expanded (prompt x n), see `generate`
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            use_cache=True,
            cache_implementation=self.cache_implementation,
            return_dict_in_generate=True,
        )
        stash = _StashLogSoftmax(params.temperature)
        gather = _GatherChosenLogprob(stash)
        criteria = StoppingCriteriaList([gather])
        if min(caps) < cap:
            criteria.append(_StopAtCaps(caps, width))
        stop_check = None
        if params.stop_strings:
            stop_check = _StopOnGeneratedText(self.tokenizer, params.stop_strings, width, len(prompts))
            criteria.append(stop_check)

        # `generate` fills every unset field of the config we pass from `model.generation_config`
        # (a hub model's top_k, repetition_penalty, extra eos ids, ...). Swap in a neutral one for
        # the call so only our settings (plus transformers' global defaults) apply.
        model_config = self.model.generation_config
        self.model.generation_config = GenerationConfig()
        try:
            out = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                logits_processor=LogitsProcessorList([stash]),
                stopping_criteria=criteria,
            )
        finally:
            self.model.generation_config = model_config

        generated = out.sequences[:, width:].cpu()
        n_steps = generated.shape[1]
        logprobs = torch.stack(gather.steps[:n_steps], dim=1).cpu() if n_steps else torch.zeros(len(prompts), 0)
        hits = stop_check.first_hit if stop_check is not None else [None] * len(prompts)
        hits = [h if h is not None and h <= c else None for h, c in zip(hits, caps)]
        return [  # each row cut to its own cap first (past it: padding, or tokens of a longer-capped batch)
            finish_completion(self.tokenizer, self.eos_id, generated[r, :caps[r]].tolist(), logprobs[r, :caps[r]].tolist(),
                              params.stop_strings, hits[r]) for r in range(len(prompts))
        ]
