"""Shared-prefix (cascade) attention of the prefix-sharing sampler (`algos.samplers.decode_cache`).

The cascade cache keeps each prompt's keys/values once and each row's generated suffix apart; its
attention must equal plain attention over the expanded cache (every row holding its prompt's
keys/values, left padding masked) — on random tensors with grouped-query heads, ragged rows per
prompt and rows dropped mid-way, and end to end: the sampler with and without it returns the same
completions (float64 model, so no rounding can flip a sampled token)."""

from __future__ import annotations

import pytest
import torch
from test_fast_sampler import _mixed_prompts
from test_sampling import _tiny_llama, _train_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.cache_utils import DynamicCache

from algos.samplers.base import SamplingParams
from algos.samplers.decode_cache import (
    _ACTIVE,
    CASCADE_ATTENTION,
    cascade_attention,
    cascade_cache,
    cascade_decoding,
    supports_cascade,
)
from algos.samplers.prefix_sharing import PrefixSharingSampler


@pytest.fixture(scope="module")
def tok():
    return _train_tokenizer(bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model64(tok):
    return _tiny_llama(tok).double()  # 4 query heads over 2 KV heads


class _Attn(torch.nn.Module):
    layer_idx = 0


def _expanded_attention(q, prefix_k, prefix_v, valid, src, suffix_k, suffix_v, scale):
    """Reference: sdpa over every row's own copy of its prompt's keys/values plus its suffix."""
    groups = q.shape[1] // prefix_k.shape[1]
    k = torch.cat([prefix_k[src], suffix_k], dim=2).repeat_interleave(groups, dim=1)
    v = torch.cat([prefix_v[src], suffix_v], dim=2).repeat_interleave(groups, dim=1)
    mask = torch.cat([valid[src], torch.ones(src.numel(), suffix_k.shape[2], dtype=torch.bool)], dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return out.transpose(1, 2)


def test_cascade_attention_equals_attention_over_the_expanded_cache():
    g = torch.Generator().manual_seed(0)
    prompts, heads, heads_kv, width, d = 3, 4, 2, 7, 8
    prefill = DynamicCache()
    pk = torch.randn(prompts, heads_kv, width, d, generator=g, dtype=torch.float64)
    pv = torch.randn(prompts, heads_kv, width, d, generator=g, dtype=torch.float64)
    prefill.update(pk, pv, 0)
    valid = torch.ones(prompts, width, dtype=torch.bool)
    valid[0, :3] = valid[2, :5] = False  # left padding of different widths
    src = torch.tensor([0, 0, 0, 1, 2, 2])  # ragged: 3, 1 and 2 rows
    cache = cascade_cache(prefill, valid.long(), src, reserve=2, limit=10)  # the buffer has to grow
    layer, scale = cache.layers[0], 0.3
    token = _ACTIVE.set(cache)
    try:
        suffix_k = suffix_v = None
        for step in range(5):
            rows = cache.rows.src.numel()
            q = torch.randn(rows, heads, 1, d, generator=g, dtype=torch.float64)
            k_new = torch.randn(rows, heads_kv, 1, d, generator=g, dtype=torch.float64)
            v_new = torch.randn(rows, heads_kv, 1, d, generator=g, dtype=torch.float64)
            keys, values = layer.update(k_new, v_new, 0)
            suffix_k = k_new if suffix_k is None else torch.cat([suffix_k, k_new], dim=2)
            suffix_v = v_new if suffix_v is None else torch.cat([suffix_v, v_new], dim=2)
            assert layer.get_seq_length() == width + step + 1
            out, _ = cascade_attention(_Attn(), q, keys, values, None, scaling=scale)
            want = _expanded_attention(q, pk, pv, valid, cache.rows.src, suffix_k, suffix_v, scale)
            torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
            if step == 1:  # rows leave the batch: prompt 1 loses its only row, prompt 0 one of three
                keep = torch.tensor([0, 2, 4, 5])
                cache.batch_select_indices(keep)
                suffix_k, suffix_v = suffix_k[keep], suffix_v[keep]
                assert cache.rows.src.tolist() == [0, 0, 2, 2]
    finally:
        _ACTIVE.reset(token)


def test_cascade_cache_refuses_rows_out_of_prompt_order():
    prefill = DynamicCache()
    prefill.update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), 0)
    with pytest.raises(ValueError, match="src"):
        cascade_cache(prefill, torch.ones(2, 3), torch.tensor([1, 0]), reserve=4, limit=4)


def test_attention_outside_cascade_decoding_is_an_error():
    with pytest.raises(RuntimeError, match="cascade_decoding"):
        cascade_attention(_Attn(), torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), None)


@pytest.mark.parametrize("temperature, stop", [(0.0, ()), (1.0, ()), (1.0, ("\n",)), (0.8, (" the", "?"))])
def test_sampler_with_cascade_equals_the_expanded_cache(model64, tok, temperature, stop):
    """Same seed, same draws: the expanded cache, cascade attention through the model's forward pass
    and cascade attention in the fused decode step (`algos.samplers.fused_decode`) must give the same
    tokens, log-probs within float64 rounding. Batches smaller than a prompt's samples split its rows
    across chunks."""
    prompts = _mixed_prompts(tok)
    params = SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=24, stop_strings=stop, n=5)
    runs = {}
    for path in ("expanded", "cascade", "fused"):
        seen: list[str] = []  # the attention implementation of every forward pass of the model
        hook = model64.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(m.config._attn_implementation))
        try:
            sampler = PrefixSharingSampler(model64, tok, max_batch_size=8, cascade=path != "expanded",
                                           fused_decode=path == "fused", continuous=False)
            runs[path] = (sampler.generate(prompts, params, seed=11), sampler.stats)
        finally:
            hook.remove()
        assert model64.config._attn_implementation == "sdpa"  # restored after the call
        # the fused step never calls the model: only the prefills do
        assert seen.count(CASCADE_ATTENTION) == (sampler.stats.decode_calls if path == "cascade" else 0)
        assert len(seen) == sampler.stats.prefill_calls + (0 if path == "fused" else sampler.stats.decode_calls)
    plain, plain_stats = runs["expanded"]
    for path in ("cascade", "fused"):
        shared, shared_stats = runs[path]
        assert shared_stats.decode_calls == plain_stats.decode_calls
        for ra, rb in zip(plain, shared):
            for x, y in zip(ra, rb):
                assert (x.token_ids, x.finish_reason, x.text) == (y.token_ids, y.finish_reason, y.text)
                torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-9, rtol=0)
        assert sum(len(c.token_ids) for r in shared for c in r) > 50  # a real decode, not empty completions


def test_implementation_restored_after_an_error(model64):
    prefill = DynamicCache()
    prefill.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    cache = cascade_cache(prefill, torch.ones(1, 3), torch.tensor([0]), reserve=2, limit=2)
    with pytest.raises(KeyError), cascade_decoding(model64, cache):
        assert model64.config._attn_implementation == CASCADE_ATTENTION
        raise KeyError("boom")
    assert model64.config._attn_implementation == "sdpa" and _ACTIVE.get() is None


def test_models_that_do_not_qualify_use_the_expanded_cache(tok):
    """A model type outside CASCADE_MODEL_TYPES (GPT-2: learned positions, another attention
    module) and a Llama on an attention implementation other than sdpa/eager keep the plain path."""
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    llama = _tiny_llama(tok)
    prefill = DynamicCache()
    prefill.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    assert supports_cascade(llama, prefill)
    assert not supports_cascade(gpt2, prefill)
    assert not supports_cascade(llama, DynamicCache())  # nothing prefilled
    prompts = [[tok.bos_token_id] + tok.encode("Janet has")]
    params = SamplingParams(temperature=0.0, max_new_tokens=8, n=2)
    a = PrefixSharingSampler(gpt2, tok, cascade=True).generate(prompts, params)
    b = PrefixSharingSampler(gpt2, tok, cascade=False).generate(prompts, params)
    assert [c.token_ids for c in a[0]] == [c.token_ids for c in b[0]]
    llama.set_attn_implementation("eager")
    PrefixSharingSampler(llama, tok).generate(prompts, params)
    assert llama.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="cascade"):
        PrefixSharingSampler(llama, tok, cascade=1)
