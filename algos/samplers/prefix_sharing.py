"""A sampler built for Monte-Carlo rollouts: many continuations of few (often long) prefixes.

`PrefixSharingSampler` implements the `algos.samplers.base.Sampler` protocol with exactly the fields and
conventions of `HFSampler` (see `algos.samplers.base`: log-prob ``log_softmax(logits / T)`` at the
chosen token without top-p renormalisation, plain ``log_softmax`` for greedy; finish reasons
``"stop"`` / ``"length"``; stop strings searched in the generated text only, text cut before them;
the context cap; the same errors), but runs its own decode loop on the model's forward pass with a
`transformers.DynamicCache` instead of `generate`. The cache goes in through the forward keyword the
model declares (`cache_keyword`: ``cache`` since transformers 5.24, where ``past_key_values`` is a
deprecated alias due to be removed in 5.40; ``past_key_values`` before) and is updated in place, so
the sampler keeps its own reference and never reads it back from the model's output:

1. **One prefill per distinct prompt.** VinePPO asks for K continuations of every step-boundary
   prefix (McGill-NLP/VinePPO, episode_generators/math_episode_generator_with_mc_advantages.py);
   `generate` with rows expanded to (prompt x n) encodes each prefix K times. Here distinct prompts
   (identical prompts in one call are merged) are prefilled once, in length buckets with left
   padding, and the KV cache is expanded to the rows by an index select on the batch dimension
   (``keys[index]`` with repeated indices, as transformers 5.23 `DynamicLayer.batch_select_indices`
   does). The first token of every row is sampled from the prefill's last-position logits, so
   expansion costs no forward pass. Full-attention layers are then written in place into a
   preallocated buffer (`algos.samplers.decode_cache.expand_cache`: a `DynamicLayer` subclass inside
   the `DynamicCache`) instead of `DynamicLayer.update`'s per-step ``torch.cat``; other layer types
   (sliding window, ...) keep their transformers class. For models that qualify (Llama-family full
   attention, `algos.samplers.decode_cache.supports_cascade`) the prefix is not even copied: each
   prompt's keys/values stay once in the cache and a decode step attends to them once for all the
   prompt's rows (shared-prefix "cascade" attention), the rows' own tokens apart.
2. **Finished rows leave the batch.** A row that emits EOS, completes a stop string or reaches its
   own cap is removed from the running batch (cache, attention mask, positions), so the remaining
   steps cost only the live rows. `generate` keeps computing finished rows until the whole batch
   is done.
3. **No per-row Python in the hot loop.** Temperature, top-p (`algos.samplers.nucleus`: the
   nucleus of ``TopPLogitsWarper`` found with ``topk`` instead of a sort of the vocabulary), the
   multinomial draw, the log-prob gather and the EOS / cap checks are batched tensor ops. Stop strings are checked only for rows whose new
   token could complete one: a boolean vocabulary mask, computed once per (stop strings, vocab
   size), marks tokens whose text contains the last character of a stop string (or could: U+FFFD,
   empty text, ids the tokenizer does not know); only those rows decode their tail window.
4. **A fused decode step.** With cascade attention on a Llama / Mistral / Qwen2 layout, a decode step
   does not call the model's forward pass: `algos.samplers.fused_decode.FusedDecoder` computes the
   same function with fused q/k/v and gate/up products and no per-step module plumbing (the
   model's own forward still runs every prefill, and every decode step of other models).

Rows (prompt x sample) are run in chunks of at most ``max_batch_size`` sequences. With a seed, a
`torch.Generator` owned by the call draws every sample; the global RNG is never touched. As with
`HFSampler`, a row's sample depends on the batch it was drawn with (same seed, same prompts and
same weights give identical completions; the same prompt inside another call need not).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from algos.samplers.base import (
    Completion,
    SamplingParams,
    check_sampler_args,
    copy_weights,
    finish_completion,
    prompt_caps,
)
from algos.samplers.decode_cache import (
    cascade_cache,
    cascade_decoding,
    expand_cache,
    supports_cascade,
    supports_cascade_model,
)
from algos.samplers.fused_decode import FusedDecoder, supports_fused_decode
from algos.samplers.nucleus import sample_top_p
from algos.samplers.refill import RowQueue, decode_refilled

__all__ = ["PrefixSharingSampler", "SamplerStats", "cache_keyword", "stop_candidate_mask"]


def cache_keyword(model) -> str:
    """The keyword under which ``model.forward`` takes a KV cache: ``"cache"`` or ``"past_key_values"``.

    transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache`` (and the output
    field likewise); the old name still works there but warns (``FutureWarning``: removed in 5.40).
    The name the forward's signature declares wins (`inspect.signature` follows the deprecation
    decorator to the wrapped function), so a model class not yet renamed keeps working; a forward
    that declares neither (``**kwargs`` only, e.g. a wrapper) gets the name of the installed
    transformers, read from `CausalLMOutputWithPast`'s fields.
    """
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params and params[name].kind is not inspect.Parameter.VAR_KEYWORD:
            return name
    return "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


@dataclass
class SamplerStats:
    """Work done by the last `PrefixSharingSampler.generate` call (counts, not seconds).

    Attributes:
        prompts: prompts asked for.
        unique_prompts: distinct prompts, each prefilled exactly once.
        prefill_calls: forward passes over prompts (one per length bucket).
        prefill_tokens: token positions run in prefill, padding included.
        decode_calls: single-token forward passes.
        decode_rows: row-steps run in decode (sum over decode calls of the batch size).
        generated_tokens: tokens returned (after cutting at EOS / stop strings).
        stop_checks: tail-window decodes run to confirm a possible stop string.
    """

    prompts: int = 0
    unique_prompts: int = 0
    prefill_calls: int = 0
    prefill_tokens: int = 0
    decode_calls: int = 0
    decode_rows: int = 0
    generated_tokens: int = 0
    stop_checks: int = 0
    buckets: list[int] = field(default_factory=list)


def stop_candidate_mask(tokenizer, stop_strings: Sequence[str], vocab_size: int) -> torch.Tensor:
    """Which token ids could complete one of ``stop_strings`` when appended to a generated text.

    A token is a candidate when its decoded text (alone, and after a plain reference token, to
    catch tokenizers that strip a leading space from the first token of a text) contains the last
    character of some stop string, contains U+FFFD (an incomplete UTF-8 sequence that a later byte
    can turn into any character), decodes to nothing although it is not a special token, or is an
    id the tokenizer does not know (a model vocabulary padded past ``len(tokenizer)``). Special
    tokens decode to nothing with ``skip_special_tokens=True`` and are not candidates.

    The assumption (shared with `HFSampler`'s stop-string cut) is that decoding is append-monotone:
    the text of ``ids + [t]`` extends the text of ``ids`` by what ``t`` contributes, up to
    incomplete trailing bytes. Under it, a token that is not a candidate cannot complete a stop
    string, so skipping the check for it never changes the result.

    Args:
        tokenizer: a Hugging Face tokenizer.
        stop_strings: non-empty strings.
        vocab_size: the model's vocabulary size (the last dimension of its logits).

    Returns:
        (vocab_size,) bool tensor on the CPU.
    """
    lasts = {s[-1] for s in stop_strings}
    known = min(vocab_size, len(tokenizer))
    mask = torch.ones(vocab_size, dtype=torch.bool)  # unknown ids stay candidates
    ids = list(range(known))
    alone = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)
    ref_ids = tokenizer.encode("a", add_special_tokens=False)[:1] or [ids[-1]]
    ref_text = tokenizer.decode(ref_ids, skip_special_tokens=True)
    paired = tokenizer.batch_decode([ref_ids + [i] for i in ids], skip_special_tokens=True)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def could_complete(text: str) -> bool:
        return text == "" or "\ufffd" in text or any(c in text for c in lasts)

    for i, (a, p) in enumerate(zip(alone, paired)):
        tail = p.removeprefix(ref_text)  # what the token adds after "a" (all of it if not a clean extension)
        if i in special and a == "" and tail == "":
            mask[i] = False
        else:
            mask[i] = could_complete(a) or could_complete(tail)
    return mask


class PrefixSharingSampler:
    """`Sampler` with one prefill per distinct prompt, finished-row dropping and batched sampling.

    Args:
        model: a causal LM (`PreTrainedModel`) whose forward takes ``attention_mask``,
            ``position_ids``, ``use_cache`` and a cache as ``cache`` (transformers >= 5.24) or
            ``past_key_values`` (see `cache_keyword`). Shared, not copied: the sampler
            always uses its current weights; its train/eval mode is restored after each call.
        tokenizer: its tokenizer; must have an EOS token. PAD falls back to EOS.
        max_batch_size: most sequences (rows = prompt x sample) decoded together.
        max_context: most tokens of prompt + completion. ``None`` means the model's
            ``config.max_position_embeddings`` when it has one, else no cap.
        bucket_slack: a prompt joins a prefill bucket (sorted longest first) while its left
            padding is at most ``max(8, bucket_slack * longest)`` tokens, where ``longest`` is the
            bucket's longest prompt (tokens); larger values mean fewer, fuller batches and more
            attention over padding. ``inf`` puts all prompts in as few buckets as the batch size
            allows.
        prealloc_tokens: room (positions) reserved per row in the KV cache of full-attention
            layers when decoding starts; new keys/values are written in place and the buffer
            grows by half when full. ``0`` keeps transformers' `DynamicLayer`, which
            concatenates every step (a copy of the whole layer cache per token).
        cascade: decode with shared-prefix attention (`algos.samplers.decode_cache`: one copy of each
            prompt's keys/values for all its rows) where the model qualifies
            (`supports_cascade`); False, or a model that does not qualify, expands the prompt's
            cache to every row (``prealloc_tokens`` then applies to the whole row).
        fused_decode: with cascade attention, run each decode step as `algos.samplers.fused_decode`'s
            few fused tensor operations instead of the model's forward pass, where the model
            qualifies (`supports_fused_decode`: Llama, Mistral, Qwen2 layouts). Same function,
            float rounding aside; False always calls the model's forward.
        continuous: with the fused decode step, decode all rows as one batch refilled as rows finish
            (`algos.samplers.refill`: continuous batching; fewer decode steps with few rows) instead
            of chunk by chunk. Same distribution; with a seed, other draws than chunked decoding.
        refill_at: with ``continuous``, admit the next rows once this many of the batch's
            ``max_batch_size`` slots are free (default: half of them, at least 1; every cohort of
            rows admitted together costs its own attention operations per step, so admitting rarely
            but many rows at once measured best: GSM8K tiny model, batch 64, refill at 16 / 32 / 48 /
            64 free slots: 1,895 / 1,933 / 1,913 / 1,404 tokens/s).

    Raises:
        ValueError: a bad argument (named), or a tokenizer without EOS.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 64, max_context: int | None = None,
                 bucket_slack: float = 0.25, prealloc_tokens: int = 256, cascade: bool = True,
                 fused_decode: bool = True, continuous: bool = True, refill_at: int | None = None):
        max_context = check_sampler_args(model, tokenizer, max_batch_size, max_context, "PrefixSharingSampler")
        if isinstance(bucket_slack, bool) or not isinstance(bucket_slack, (int, float)) or not bucket_slack >= 0:
            raise ValueError(f"bucket_slack: expected a number >= 0, got {bucket_slack!r}")
        if isinstance(prealloc_tokens, bool) or not isinstance(prealloc_tokens, int) or prealloc_tokens < 0:
            raise ValueError(f"prealloc_tokens: expected an int >= 0, got {prealloc_tokens!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.bucket_slack = float(bucket_slack)
        self.prealloc_tokens = prealloc_tokens
        if not isinstance(cascade, bool):
            raise ValueError(f"cascade: expected a bool, got {cascade!r}")
        self.cascade = cascade
        if not isinstance(fused_decode, bool):
            raise ValueError(f"fused_decode: expected a bool, got {fused_decode!r}")
        self.fused_decode = fused_decode
        self._decoder: FusedDecoder | None = None
        if not isinstance(continuous, bool):
            raise ValueError(f"continuous: expected a bool, got {continuous!r}")
        self.continuous = continuous
        if refill_at is None:
            refill_at = max(1, max_batch_size // 2)
        if isinstance(refill_at, bool) or not isinstance(refill_at, int) or not 1 <= refill_at <= max_batch_size:
            raise ValueError(f"refill_at: expected an int in [1, max_batch_size={max_batch_size}], got {refill_at!r}")
        self.refill_at = refill_at
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id
        self.stats = SamplerStats()
        self._stop_masks: dict[tuple[tuple[str, ...], int, str], torch.Tensor] = {}
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache_kw = cache_keyword(model)

    def update_weights(self, model) -> None:
        """Copy ``model``'s weights into the sampler's model (no-op when it is the same object)."""
        copy_weights(self.model, model)

    # ----------------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seed: int | None = None,
        budgets: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """Sample ``params.n`` completions per prompt; see `algos.samplers.base.Sampler.generate`
        (``budgets``: per-prompt caps; every row already stops at its own cap).

        Raises:
            ValueError: an empty prompt, or a prompt longer than ``max_context`` (naming its
                index, its length and the limit); bad ``budgets`` (`prompt_caps`).
        """
        prompts, caps = prompt_caps(prompts, params.max_new_tokens, self.max_context, budgets)

        # Distinct (prompt, cap) pairs; each owns the rows (i, j) of every occurrence i and sample j.
        owner: dict[tuple[tuple[int, ...], int], int] = {}
        unique: list[tuple[int, ...]] = []
        rows_of: list[list[tuple[int, int]]] = []
        for i, p in enumerate(prompts):
            key = tuple(p)
            u = owner.setdefault((key, caps[i]), len(unique))
            if u == len(unique):
                unique.append(key)
                rows_of.append([])
            rows_of[u].extend((i, j) for j in range(params.n))

        self.stats = SamplerStats(prompts=len(prompts), unique_prompts=len(unique))
        results: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        live = []
        for u, key in enumerate(unique):
            if caps[rows_of[u][0][0]] == 0:  # the prompt fills the context exactly: nothing to generate
                for i, j in rows_of[u]:
                    results[i][j] = Completion([], [], "length", "")
            else:
                live.append(u)

        was_training = self.model.training
        self.model.eval()
        device = self.model.device
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        try:
            with torch.inference_mode():
                buckets = [[live[b] for b in bucket]
                           for bucket in self._buckets([unique[u] for u in live], [len(rows_of[u]) for u in live])]
                decoder = self._fused_decoder() if self.continuous and self.cascade and buckets else None
                if decoder is not None and supports_cascade_model(self.model):  # one refilled batch (algos.samplers.refill)
                    self._run_refilled([([list(unique[u]) for u in us], [rows_of[u] for u in us],
                                         [caps[rows_of[u][0][0]] for u in us]) for us in buckets],
                                       params, generator, results, decoder)
                else:
                    for us in buckets:
                        self.stats.buckets.append(len(us))
                        self._run_bucket([list(unique[u]) for u in us], [rows_of[u] for u in us],
                                         [caps[rows_of[u][0][0]] for u in us], params, generator, results)
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    # ----------------------------------------------------------------------------------------

    def _buckets(self, prompts: list[tuple[int, ...]], rows: list[int]) -> list[list[int]]:
        """Group prompt indices, longest first, into prefill buckets: padding bounded by
        ``bucket_slack``, rows (samples of all prompts in the bucket) at most ``max_batch_size``
        unless one prompt alone has more."""
        order = sorted(range(len(prompts)), key=lambda u: -len(prompts[u]))
        buckets: list[list[int]] = []
        n_rows = 0
        for u in order:
            if buckets:
                longest = len(prompts[buckets[-1][0]])
                fits = n_rows + rows[u] <= self.max_batch_size
                if fits and longest - len(prompts[u]) <= max(8.0, self.bucket_slack * longest):
                    buckets[-1].append(u)
                    n_rows += rows[u]
                    continue
            buckets.append([u])
            n_rows = rows[u]
        return buckets

    def _prefill(self, prompts: list[list[int]]):
        """One forward pass over left-padded ``prompts``.

        Returns:
            (cache, logits, mask, lengths): the DynamicCache of the U prompts (U, heads, W, d per
            layer), float32 last-position logits (U, V), the attention mask (U, W) long and the
            prompt lengths (U,) long (tokens), all on the model's device.
        """
        device = self.model.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        # positions count real tokens only; padding gets 0 (transformers `_prepare_position_ids_for_generation`)
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=self.model.config)
        kwargs = {"logits_to_keep": 1} if self._keeps_logits else {}
        kwargs[self._cache_kw] = cache  # filled in place
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **kwargs)
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += ids.numel()
        logits = out.logits[:, -1, :].float()
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
        return cache, logits, mask, lengths

    def _run_bucket(self, prompts, rows_of, caps, params: SamplingParams, generator, results) -> None:
        """Prefill a bucket's prompts once, then decode their rows in chunks of ``max_batch_size``."""
        cache, logits, mask, lengths = self._prefill(prompts)
        device = logits.device
        flat = [(u, r) for u, rs in enumerate(rows_of) for r in rs]  # (source prompt, (i, j))
        chunks = [flat[k:k + self.max_batch_size] for k in range(0, len(flat), self.max_batch_size)]
        for c, chunk in enumerate(chunks):
            src = torch.tensor([u for u, _ in chunk], dtype=torch.long, device=device)
            cap = torch.tensor([caps[u] for u, _ in chunk], dtype=torch.long, device=device)
            # (U, heads, W, d) -> (rows, heads, W + room, d): repeated indices expand a prompt to its samples
            steps = max(caps[u] for u, _ in chunk)
            reserve = min(steps, self.prealloc_tokens)
            if self.cascade and supports_cascade(self.model, cache):
                # one copy of each prompt's keys/values for all its rows (algos.samplers.decode_cache)
                chunk_cache = cascade_cache(cache, mask, src, reserve=max(reserve, 1), limit=steps)
                decoder = self._fused_decoder()
                if decoder is not None:  # the decode step as a few fused tensor ops (algos.samplers.fused_decode)
                    outs = self._decode(chunk_cache, logits[src], None, lengths[src], cap, params, generator,
                                        step=lambda tok, pos, c=chunk_cache: decoder.step(tok, pos, c))
                else:
                    with cascade_decoding(self.model, chunk_cache):
                        outs = self._decode(chunk_cache, logits[src], None, lengths[src], cap, params, generator)
            else:
                chunk_cache = expand_cache(cache, src, reserve=reserve, limit=mask.shape[1] + steps)
                outs = self._decode(chunk_cache, logits[src], mask[src], lengths[src], cap, params, generator)
            for (_, (i, j)), comp in zip(chunk, outs):
                results[i][j] = comp

    def _run_refilled(self, buckets, params: SamplingParams, generator, results, decoder: FusedDecoder) -> None:
        """Decode all buckets' rows as one batch refilled as rows finish (`algos.samplers.refill`)."""
        n_rows = sum(len(slots) for _, rows_of, _ in buckets for slots in rows_of)
        max_cap = max(c for _, _, caps in buckets for c in caps)
        stops = params.stop_strings
        stop_mask = self._stop_mask(stops, self.model.config.vocab_size, self.model.device) if stops else None
        window = 4 * max(len(s) for s in stops) + 8 if stops else 0  # as `HFSampler`'s windowed check
        slots, tokens, logprobs, lengths, window_hit = decode_refilled(
            self, RowQueue(self, buckets), n_rows, max_cap, params, generator, decoder, stop_mask, window)
        for r, (i, j) in enumerate(slots):
            n = lengths[r]
            comp = finish_completion(self.tokenizer, self.eos_id, tokens[r][:n], logprobs[r][:n], stops,
                                     window_hit.get(r))
            self.stats.generated_tokens += len(comp.token_ids)
            results[i][j] = comp

    def _fused_decoder(self) -> FusedDecoder | None:
        """The model's `FusedDecoder` with its weight layout up to date, or None (``fused_decode`` off
        or a model it does not support)."""
        if not self.fused_decode or not supports_fused_decode(self.model):
            return None
        if self._decoder is None or self._decoder.model is not self.model:
            self._decoder = FusedDecoder(self.model)
        self._decoder.begin()
        return self._decoder

    def _stop_mask(self, stop_strings: tuple[str, ...], vocab_size: int, device) -> torch.Tensor:
        key = (stop_strings, vocab_size, str(device))
        if key not in self._stop_masks:
            self._stop_masks[key] = stop_candidate_mask(self.tokenizer, stop_strings, vocab_size).to(device)
        return self._stop_masks[key]

    def _decode(self, cache, logits: torch.Tensor, mask: torch.Tensor | None, prompt_lengths: torch.Tensor,
                caps: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                step=None) -> list[Completion]:
        """The decode loop for one chunk of B rows.

        Args:
            cache: DynamicCache already expanded to the B rows (B, heads, W, d per layer).
            logits: (B, V) float32 next-token logits after the prompt.
            mask: (B, W) long attention mask of the prompt (left padding); None for a cascade
                cache, which holds the padding itself (the model is then called without a mask).
            prompt_lengths: (B,) long, tokens; the position of a row's first new token.
            caps: (B,) long, most new tokens per row (>= 1).
            step: ``step(tokens (B,), positions (B,)) -> (B, V) float32 logits`` that appends the
                tokens to ``cache`` (`FusedDecoder.step`); None calls the model's forward pass.
        Returns:
            B completions, in row order.
        """
        device = logits.device
        n_rows, vocab = logits.shape
        max_steps = int(caps.max())
        greedy = params.temperature == 0
        stops = params.stop_strings
        stop_mask = self._stop_mask(stops, vocab, device) if stops else None
        window = 4 * max(len(s) for s in stops) + 8 if stops else 0  # as `HFSampler`'s windowed check

        out_tok = torch.full((n_rows, max_steps), self.pad_id, dtype=torch.long, device=device)
        out_lp = torch.zeros((n_rows, max_steps), dtype=torch.float32, device=device)
        lengths = torch.zeros(n_rows, dtype=torch.long, device=device)  # generated tokens per row when done
        window_hit: dict[int, int] = {}  # row -> step count at which its tail window showed a stop string
        alive = torch.arange(n_rows, device=device)  # chunk rows still running, in batch order
        position = prompt_lengths.clone()
        row_caps = caps.clone()
        fwd_kwargs = {"logits_to_keep": 1} if self._keeps_logits else {}
        fwd_kwargs[self._cache_kw] = cache  # the same object every step: rows are dropped from it in place

        for t in range(max_steps):
            # ---- choose the next token of every live row (batched)
            if greedy:
                logp = torch.log_softmax(logits, dim=-1)
                tok = logits.argmax(dim=-1)
            else:
                logp = torch.log_softmax(logits / params.temperature, dim=-1)
                tok = sample_top_p(logp.exp(), float(params.top_p), generator)  # nucleus without a vocabulary sort
            out_tok[alive, t] = tok
            out_lp[alive, t] = logp.gather(1, tok[:, None]).squeeze(1)

            # ---- which rows end here: EOS, own cap, stop string (only rows whose token could complete one)
            done = (tok == self.eos_id) | (row_caps <= t + 1)
            if stop_mask is not None:
                cand = stop_mask[tok] & ~done
                idx = cand.nonzero().squeeze(1).tolist()
                if idx:
                    self.stats.stop_checks += len(idx)
                    rows = alive[idx]
                    tails = out_tok[rows, max(0, t + 1 - window): t + 1].tolist()
                    texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
                    hits = [k for k, text in zip(idx, texts) if any(s in text for s in stops)]
                    if hits:
                        done[hits] = True
                        for k in hits:
                            window_hit[int(alive[k])] = t + 1
            n_done = int(done.sum())
            if n_done:
                lengths[alive[done]] = t + 1
                if n_done == alive.numel():
                    break
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                alive, position, row_caps, tok = alive[keep], position[keep], row_caps[keep], tok[keep]
                mask = mask[keep] if mask is not None else None

            # ---- one forward step for the live rows
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            if step is not None:
                logits = step(tok, position)
            else:
                out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=position[:, None],
                                 use_cache=True, **fwd_kwargs)
                logits = out.logits[:, -1, :].float()
            self.stats.decode_calls += 1
            self.stats.decode_rows += tok.shape[0]
            position = position + 1

        tokens, logprobs, lengths = out_tok.cpu().tolist(), out_lp.cpu().tolist(), lengths.cpu().tolist()
        completions = []
        for r in range(n_rows):
            n = lengths[r]
            comp = finish_completion(self.tokenizer, self.eos_id, tokens[r][:n], logprobs[r][:n], stops,
                                     window_hit.get(r))
            self.stats.generated_tokens += len(comp.token_ids)
            completions.append(comp)
        return completions
