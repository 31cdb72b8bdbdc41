"""The fused decode step (`algos.samplers.fused_decode`): the model's own function, fewer operations.

References are the model's forward pass over each row's whole sequence (no cache, no padding), in
float64 so that only float64 rounding separates the two; the architectures are the ones the step
claims (Llama with grouped-query heads, Qwen2 with q/k/v biases, Mistral); the sampler gives the same
completions with the fused step as with the model's forward, also after the weights change in place
(an optimiser step), which must rebuild the step's fused weights."""

from __future__ import annotations

import pytest
import torch
from test_fast_sampler import _mixed_prompts
from test_sampling import _train_tokenizer
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.cache_utils import DynamicCache

from algos.samplers.base import SamplingParams
from algos.samplers.decode_cache import cascade_cache
from algos.samplers.fused_decode import FusedDecoder, supports_fused_decode
from algos.samplers.prefix_sharing import PrefixSharingSampler


@pytest.fixture(scope="module")
def tok():
    return _train_tokenizer(bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _config_kwargs(tok) -> dict:
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                tie_word_embeddings=False)


def _model(tok, kind: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    kw = _config_kwargs(tok) | extra
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    elif kind == "llama-bias":  # attention_bias: q, k, v and o all carry a bias
        model = LlamaForCausalLM(LlamaConfig(attention_bias=True, **kw))
    elif kind == "qwen2":  # q, k, v biases, none on o
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **kw))
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**kw))
    else:
        raise AssertionError(kind)
    with torch.no_grad():  # biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model.eval()


def _prefill(model, prompts: list[list[int]], pad_id: int):
    """Left-padded prefill as `PrefixSharingSampler._prefill` runs it: (cache, mask (U, W))."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache,
              use_cache=True)
    return cache, mask


@pytest.mark.parametrize("kind", ["llama", "llama-bias", "qwen2", "mistral"])
@pytest.mark.parametrize("fuse", [True, False])
def test_fused_step_equals_the_models_forward_over_the_whole_sequence(tok, kind, fuse):
    """Ragged rows per prompt (3, 1, 2), then dense ones (2 each) after rows leave: every step's
    logits equal the model's logits at the last position of the row's unpadded sequence."""
    model = _model(tok, kind).double()
    assert supports_fused_decode(model)
    prompts = [tok.encode("Problem: what is 12 + 30?"), tok.encode("3 + 4"), tok.encode("Janet has 3 apples.")]
    cache, mask = _prefill(model, prompts, tok.pad_token_id)
    src = torch.tensor([0, 0, 0, 1, 2, 2])
    chunk = cascade_cache(cache, mask, src, reserve=2, limit=16)  # the suffix buffers have to grow
    decoder = FusedDecoder(model, fuse=fuse)
    decoder.begin()
    assert decoder.fuse is fuse
    rows = [list(prompts[u]) for u in src.tolist()]
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        tokens = torch.randint(3, len(tok), (len(rows),), generator=g)
        positions = torch.tensor([len(r) for r in rows])
        logits = decoder.step(tokens, positions, chunk)
        for r, t in zip(rows, tokens.tolist()):
            r.append(t)
        with torch.inference_mode():
            want = torch.stack([model(input_ids=torch.tensor([r])).logits[0, -1] for r in rows]).float()
        assert logits.dtype == torch.float32 and logits.shape == (len(rows), len(tok))
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
        if step == 1:  # prompt 0 keeps 2 of its 3 rows, prompt 1 loses its only row: 2 rows each remain
            keep = torch.tensor([0, 2, 4, 5])
            chunk.batch_select_indices(keep)
            rows = [rows[k] for k in keep.tolist()]
            assert not chunk.rows.dense
        if step == 3:
            keep = torch.tensor([0, 1, 2, 3])
            chunk.batch_select_indices(keep)
            assert chunk.rows.dense is False  # prompt 1 has no row left: U = 3 prompts, R = 2, B = 4
    src = torch.tensor([0, 0, 1, 1, 2, 2])  # a dense chunk from the start
    chunk = cascade_cache(cache, mask, src, reserve=4, limit=8)
    assert chunk.rows.dense
    rows = [list(prompts[u]) for u in src.tolist()]
    for _ in range(3):
        tokens = torch.randint(3, len(tok), (len(rows),), generator=g)
        logits = decoder.step(tokens, torch.tensor([len(r) for r in rows]), chunk)
        for r, t in zip(rows, tokens.tolist()):
            r.append(t)
        with torch.inference_mode():
            want = torch.stack([model(input_ids=torch.tensor([r])).logits[0, -1] for r in rows]).float()
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)


def test_fused_hidden_states_in_float64_agree_to_float64_rounding(tok):
    """Before the float32 cast of the logits the agreement is float64-tight (1e-10), so an error of
    float32 size anywhere in the step (a projection, the rope table, a bias) would show."""
    model = _model(tok, "qwen2").double()
    prompts = [tok.encode("Problem: what is 12 + 30?"), tok.encode("3 + 4")]
    cache, mask = _prefill(model, prompts, tok.pad_token_id)
    chunk = cascade_cache(cache, mask, torch.tensor([0, 0, 1]), reserve=4, limit=8)
    decoder = FusedDecoder(model)
    decoder.begin()
    tokens = torch.tensor([5, 6, 7])
    positions = torch.tensor([len(prompts[0])] * 2 + [len(prompts[1])])
    hidden = decoder.hidden_states(tokens, positions, chunk)
    assert hidden.dtype == torch.float64
    rows = [prompts[0] + [5], prompts[0] + [6], prompts[1] + [7]]
    with torch.inference_mode():
        want = torch.stack([model(input_ids=torch.tensor([r])).logits[0, -1] for r in rows])
        got = hidden @ model.lm_head.weight.t()
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("temperature, stop", [(0.0, ()), (1.0, ("\n",)), (0.8, (" the", "?"))])
def test_sampler_gives_the_same_completions_with_and_without_the_fused_step(tok, temperature, stop):
    model = _model(tok, "llama").double()
    prompts = _mixed_prompts(tok)
    params = SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=24, stop_strings=stop, n=5)
    # chunked decoding on both sides: the same batches, so the same draws (refill: tests/test_refill.py)
    fused = PrefixSharingSampler(model, tok, max_batch_size=8, continuous=False)
    plain = PrefixSharingSampler(model, tok, max_batch_size=8, fused_decode=False)
    a, b = fused.generate(prompts, params, seed=3), plain.generate(prompts, params, seed=3)
    assert fused._decoder is not None and plain._decoder is None
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            assert (x.token_ids, x.finish_reason, x.text) == (y.token_ids, y.finish_reason, y.text)
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-9, rtol=0)
    assert sum(len(c.token_ids) for r in a for c in r) > 50


def test_an_optimiser_step_rebuilds_the_fused_weights(tok):
    """The fused step copies the projections once; after an in-place AdamW step on the model (as the
    training loop does between sampling calls) the next call must sample from the new weights."""
    model = _model(tok, "llama").double()
    prompts = _mixed_prompts(tok)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=16, n=4)
    fused = PrefixSharingSampler(model, tok, max_batch_size=16, continuous=False)
    plain = PrefixSharingSampler(model, tok, max_batch_size=16, fused_decode=False)
    first = fused.generate(prompts, params, seed=5)
    decoder_weights = fused._decoder._layers[0].qkv[0]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    ids = torch.tensor([prompts[1]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    a, b = fused.generate(prompts, params, seed=5), plain.generate(prompts, params, seed=5)
    assert fused._decoder._layers[0].qkv[0] is not decoder_weights  # rebuilt
    assert [[c.token_ids for c in r] for r in a] == [[c.token_ids for c in r] for r in b]
    assert [[c.token_ids for c in r] for r in a] != [[c.token_ids for c in r] for r in first]
    again = fused._decoder._layers[0].qkv[0]
    fused.generate(prompts, params, seed=6)
    assert fused._decoder._layers[0].qkv[0] is again  # unchanged weights: no copy


def test_float32_model_agrees_with_its_forward(tok):
    model = _model(tok, "llama")
    prompts = _mixed_prompts(tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, n=2)
    a = PrefixSharingSampler(model, tok).generate(prompts, params)
    b = PrefixSharingSampler(model, tok, fused_decode=False).generate(prompts, params)
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            torch.testing.assert_close(torch.tensor(x.logprobs[:3]), torch.tensor(y.logprobs[:3]), atol=1e-4, rtol=0)


def test_models_outside_its_scope_keep_their_forward(tok):
    """Qwen3 (q/k norms), dynamic rope scaling and an MLP with biases are not the fused step's
    function: `supports_fused_decode` says no, `FusedDecoder` refuses, and the sampler runs the
    model's forward pass (same completions as with fused_decode=False)."""
    unsupported = [
        _model(tok, "qwen3"),
        _model(tok, "llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
        _model(tok, "llama", mlp_bias=True),
    ]
    prompts = [[tok.bos_token_id] + tok.encode("Janet has")]
    params = SamplingParams(temperature=0.0, max_new_tokens=6, n=2)
    for model in unsupported:
        assert not supports_fused_decode(model), model.config.model_type
        with pytest.raises(ValueError, match="not supported"):
            FusedDecoder(model)
        sampler = PrefixSharingSampler(model, tok)
        a = sampler.generate(prompts, params)
        assert sampler._decoder is None
        b = PrefixSharingSampler(model, tok, fused_decode=False).generate(prompts, params)
        assert [c.token_ids for c in a[0]] == [c.token_ids for c in b[0]]
    with pytest.raises(ValueError, match="fused_decode"):
        PrefixSharingSampler(unsupported[0], tok, fused_decode="yes")
