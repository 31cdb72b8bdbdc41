"""Continuous batching for `PrefixSharingSampler`: the running batch is refilled as rows finish.

Without it the sampler decodes its rows chunk by chunk (at most ``max_batch_size`` rows), and a chunk
runs until its longest row ends. Monte-Carlo continuations vary widely in length, so most decode
steps of a chunk run a few stragglers: on the tiny GSM8K model (40 VinePPO prefixes × K = 9, chunks of
64 rows, ≤ 256 tokens) 933 of 1,191 decode steps ran ≤ 16 rows and took 66 % of the decode time, and
on a CPU a step of 4 rows costs a third of a step of 64 (every step reads all the weights).

Here, whenever at least ``refill_at`` rows of the batch are free, the next rows in line join it: the
next prompts' rows of the current prefill bucket, prefilling the next bucket when one is used up
(`algos.samplers.prefix_sharing.PrefixSharingSampler._buckets`, one prefill per distinct prompt as
before). Rows admitted together form a **cohort**: one `algos.samplers.decode_cache` cascade cache
over the prefill of just the prompts they continue, their generated suffixes side by side. The
fused decode step (`algos.samplers.fused_decode.FusedDecoder.step` with a list of caches) runs the
projections and the MLP once over the rows of all cohorts and the attention cohort by cohort, so a
cohort's rows never attend over another cohort's (longer or shorter) suffixes. A cohort leaves when
its last row ends. A new row's first token is sampled from its prompt's prefill logits, exactly as in
a chunk.

What a row computes is unchanged: its prompt's keys/values, its own suffix, the same sampling step.
What changes is the batch a row is drawn with, hence the random stream: with a seed the draws differ
from chunked decoding (same distribution; `tests/test_refill.py`), and greedy decoding gives the same
tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from algos.samplers.base import SamplingParams
from algos.samplers.decode_cache import cascade_cache, supports_cascade
from algos.samplers.nucleus import sample_top_p

__all__ = ["RowQueue", "decode_refilled"]


@dataclass
class _Piece:
    """Rows admitted together: their cascade cache and what each row starts from."""

    cache: object  # algos.samplers.decode_cache._CascadeCache
    logits: torch.Tensor  # (n, V) float32: the prefill's last-position logits of each row's prompt
    lengths: torch.Tensor  # (n,) long: prompt lengths (the position of each row's first new token)
    caps: torch.Tensor  # (n,) long: most new tokens per row
    slots: list[tuple[int, int]]  # (prompt occurrence i, sample j) of each row


class RowQueue:
    """The rows still to decode, bucket by bucket; a bucket is prefilled when its first row is taken.

    Args:
        sampler: the `PrefixSharingSampler` (its ``_prefill``, ``prealloc_tokens`` and model).
        buckets: (prompts, rows of each prompt as (i, j) slots, cap of each prompt) per bucket, in
            the order to decode.

    Raises:
        RuntimeError: from `take`, when a prefill cache does not qualify for cascade attention
            (the caller checks the model beforehand; this guards the layer types).
    """

    def __init__(self, sampler, buckets: list[tuple[list[list[int]], list[list[tuple[int, int]]], list[int]]]):
        self.sampler, self.buckets = sampler, buckets
        self.next_bucket, self.flat, self.pos = 0, [], 0

    @property
    def empty(self) -> bool:
        return self.pos >= len(self.flat) and self.next_bucket >= len(self.buckets)

    def _prefill_next(self) -> None:
        prompts, rows_of, caps = self.buckets[self.next_bucket]
        self.next_bucket += 1
        self.cache, self.logits, self.mask, self.lengths = self.sampler._prefill(prompts)
        if not supports_cascade(self.sampler.model, self.cache):
            raise RuntimeError("continuous batching needs a cache that qualifies for cascade attention")
        self.caps = caps
        self.flat = [(u, slot) for u, slots in enumerate(rows_of) for slot in slots]
        self.pos = 0
        self.sampler.stats.buckets.append(len(prompts))

    def take(self, n: int) -> _Piece:
        """Up to ``n`` (>= 1) next rows, all of one bucket."""
        if self.pos >= len(self.flat):
            self._prefill_next()
        piece = self.flat[self.pos: self.pos + n]
        self.pos += len(piece)
        device = self.logits.device
        src = torch.tensor([u for u, _ in piece], dtype=torch.long, device=device)
        lo, hi = piece[0][0], piece[-1][0] + 1  # rows are in prompt order: prompts lo..hi-1
        view = SimpleNamespace(layers=[SimpleNamespace(keys=layer.keys[lo:hi], values=layer.values[lo:hi])
                                       for layer in self.cache.layers])  # the cohort's prompts only, no copy
        caps = torch.tensor([self.caps[u] for u, _ in piece], dtype=torch.long, device=device)
        steps = int(caps.max())
        cache = cascade_cache(view, self.mask[lo:hi], src - lo, reserve=max(1, min(steps, self.sampler.prealloc_tokens)),
                              limit=steps)
        return _Piece(cache, self.logits[src], self.lengths[src], caps, [slot for _, slot in piece])


def decode_refilled(sampler, queue: RowQueue, n_rows: int, max_cap: int, params: SamplingParams,
                    generator: torch.Generator, decoder, stop_mask, window: int):
    """Decode every row of ``queue`` with the batch refilled as rows finish.

    Args:
        sampler: the `PrefixSharingSampler` (EOS id, PAD id, tokenizer, stats, ``max_batch_size``,
            ``refill_at``).
        queue: the rows, `RowQueue`.
        n_rows: how many rows the queue holds; ``max_cap``: the largest cap among them.
        params: the sampling parameters; ``generator`` draws every sample.
        decoder: the model's `FusedDecoder`, weights up to date.
        stop_mask: (V,) bool candidate tokens for the stop strings, or None without stop strings;
            ``window``: tokens decoded to confirm a stop string.

    Returns:
        (slots, tokens, logprobs, lengths, window_hit): per admitted row in admission order its
        (i, j) slot, its tokens and log-probs (lists of ``max_cap``), its generated length and,
        for rows stopped by a stop string, the token count at which the window showed it.
    """
    device = sampler.model.device
    greedy = params.temperature == 0
    stops = params.stop_strings
    out_tok = torch.full((n_rows, max_cap), sampler.pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros((n_rows, max_cap), dtype=torch.float32, device=device)
    lengths = torch.zeros(n_rows, dtype=torch.long, device=device)
    window_hit: dict[int, int] = {}
    slots: list[tuple[int, int]] = []
    cohorts: list[list] = []  # [cache, live rows] in batch order
    empty_long = torch.zeros(0, dtype=torch.long, device=device)
    rid, position, row_caps, offset = empty_long, empty_long, empty_long, empty_long
    logits = None
    t = 0  # decode steps so far; a row admitted at step t0 writes its k-th token at t0 + k
    while True:
        live = rid.numel()
        free = sampler.max_batch_size - live
        if not queue.empty and (live == 0 or free >= sampler.refill_at):
            new_logits = []
            while free > 0 and not queue.empty:
                piece = queue.take(free)
                n = len(piece.slots)
                cohorts.append([piece.cache, n])
                rid = torch.cat([rid, torch.arange(len(slots), len(slots) + n, device=device)])
                slots.extend(piece.slots)
                position = torch.cat([position, piece.lengths])
                row_caps = torch.cat([row_caps, piece.caps])
                offset = torch.cat([offset, torch.full((n,), t, dtype=torch.long, device=device)])
                new_logits.append(piece.logits)
                free -= n
            logits = torch.cat(([logits] if logits is not None and live else []) + new_logits)
        if rid.numel() == 0:
            break

        # ---- choose the next token of every live row (batched), as `PrefixSharingSampler._decode`
        if greedy:
            logp = torch.log_softmax(logits, dim=-1)
            tok = logits.argmax(dim=-1)
        else:
            logp = torch.log_softmax(logits / params.temperature, dim=-1)
            tok = sample_top_p(logp.exp(), float(params.top_p), generator)
        index = t - offset  # (B,) this token's index in each row
        out_tok[rid, index] = tok
        out_lp[rid, index] = logp.gather(1, tok[:, None]).squeeze(1)

        # ---- which rows end here: EOS, own cap, stop string (only rows whose token could complete one)
        done = (tok == sampler.eos_id) | (row_caps <= index + 1)
        if stop_mask is not None:
            idx = (stop_mask[tok] & ~done).nonzero().squeeze(1).tolist()
            if idx:
                sampler.stats.stop_checks += len(idx)
                ends = (index[idx] + 1).tolist()
                tails = [out_tok[int(rid[k]), max(0, m - window): m].tolist() for k, m in zip(idx, ends)]
                texts = sampler.tokenizer.batch_decode(tails, skip_special_tokens=True)
                for k, m, text in zip(idx, ends, texts):
                    if any(s in text for s in stops):
                        done[k] = True
                        window_hit[int(rid[k])] = m
        n_done = int(done.sum())
        if n_done:
            lengths[rid[done]] = index[done] + 1
            keep = (~done).nonzero().squeeze(1)
            kept, start = [], 0
            for cohort in cohorts:
                cache, size = cohort
                local = keep[(keep >= start) & (keep < start + size)] - start
                start += size
                if local.numel() == size:
                    kept.append(cohort)
                elif local.numel():
                    cache.batch_select_indices(local)
                    kept.append([cache, local.numel()])
            cohorts = kept
            rid, position, row_caps, offset, tok = rid[keep], position[keep], row_caps[keep], offset[keep], tok[keep]
            if rid.numel() == 0:
                logits = None
                t += 1
                continue

        # ---- one fused forward step for the live rows of every cohort
        logits = decoder.step(tok, position, [cache for cache, _ in cohorts])
        sampler.stats.decode_calls += 1
        sampler.stats.decode_rows += tok.shape[0]
        position = position + 1
        t += 1
    return slots, out_tok.cpu().tolist(), out_lp.cpu().tolist(), lengths.cpu().tolist(), window_hit
