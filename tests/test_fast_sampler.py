"""Tests for algos.samplers.prefix_sharing.PrefixSharingSampler against HFSampler and fresh forward passes.

Models and tokenizers are built here from configs (no hub): the byte-level BPE and tiny random
Llama of tests/test_sampling.py, and for the VinePPO check a character tokenizer over a 4-symbol
alphabet with a toy task whose answers a random model gets right about half the time.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_sampling import _no_eos, _prompts, _tiny_llama, _train_tokenizer, _with_output_bias
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from algos.models.policy import batch_sequences, response_logprobs
from algos.models.tiny import build_char_tokenizer, build_tiny_model
from algos.rollout import collect_episodes, continue_states, step_layout
from algos.samplers.base import Completion, Sampler, SamplingParams
from algos.samplers.hf import HFSampler
from algos.samplers.prefix_sharing import PrefixSharingSampler, stop_candidate_mask
from langenv import LanguageEnv, Problem
from langenv.steps import split_gsm8k


@pytest.fixture(scope="module")
def tok():
    return _train_tokenizer(bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model(tok):
    return _tiny_llama(tok)


def _mixed_prompts(tok) -> list[list[int]]:
    """Prompts of very different lengths, one repeated, out of length order."""
    p = _prompts(tok)
    long = [tok.bos_token_id] + tok.encode("Problem:\nWhat is 12 + 30?\n\nSolution: 12 + 30 = 42. The answer is")
    return [p[0], long, p[2], p[1], p[0], [tok.bos_token_id], p[3]]


def _same(a: list[list[Completion]], b: list[list[Completion]], atol: float = 1e-4) -> None:
    """Token ids, finish reasons and text identical; log-probs within ``atol`` nats."""
    assert [len(r) for r in a] == [len(r) for r in b]
    for i, (ra, rb) in enumerate(zip(a, b)):
        for j, (x, y) in enumerate(zip(ra, rb)):
            assert (x.token_ids, x.finish_reason, x.text) == (y.token_ids, y.finish_reason, y.text), (i, j)
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=atol, rtol=0)


def _forward_hook(model, calls: list[tuple[int, int]]):
    """Records (batch rows, sequence length) of every forward pass of ``model``."""
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append(tuple(ids.shape))
    return model.register_forward_pre_hook(hook, with_kwargs=True)


# ------------------------------------------------------------------------------------------
# exact agreement with HFSampler (greedy)


def test_protocol_and_bad_arguments(model, tok):
    assert isinstance(PrefixSharingSampler(model, tok), Sampler)
    for kwargs, name in [({"max_batch_size": 0}, "max_batch_size"), ({"max_context": 0}, "max_context"),
                         ({"bucket_slack": -1.0}, "bucket_slack"), ({"prealloc_tokens": -1}, "prealloc_tokens")]:
        with pytest.raises(ValueError, match=name):
            PrefixSharingSampler(model, tok, **kwargs)


@pytest.mark.parametrize("eos_bias", [None, 2.5])
def test_greedy_identical_to_hf_sampler(model, tok, eos_bias):
    m = _no_eos(model, tok) if eos_bias is None else _with_output_bias(model, {tok.eos_token_id: eos_bias})
    prompts = _mixed_prompts(tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, n=3)
    ref = HFSampler(m, tok, max_batch_size=64).generate(prompts, params)
    # chunks that split a prompt's rows; a preallocated cache that must grow; transformers' own DynamicLayer
    for batch, prealloc in ((4, 256), (64, 3), (64, 0)):
        out = PrefixSharingSampler(m, tok, max_batch_size=batch, prealloc_tokens=prealloc).generate(prompts, params)
        _same(out, ref)
    reasons = {c.finish_reason for r in ref for c in r}
    assert reasons == ({"length"} if eos_bias is None else {"stop", "length"})


def test_greedy_stop_strings_identical_to_hf_sampler(model, tok):
    m = _no_eos(model, tok)
    prompts = _mixed_prompts(tok)
    free = HFSampler(m, tok).generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=24))
    # stop strings completed somewhere inside several of the free greedy texts, plus one in a prompt only
    stops = tuple({r[0].text[5:8] for r in free if len(r[0].text) > 8} | {"Solution:"})
    params = SamplingParams(temperature=0.0, max_new_tokens=24, n=2, stop_strings=stops)
    ref = HFSampler(m, tok, max_batch_size=6).generate(prompts, params)
    out = PrefixSharingSampler(m, tok, max_batch_size=6).generate(prompts, params)
    _same(out, ref)
    stopped = [c for r in out for c in r if c.finish_reason == "stop"]
    assert len(stopped) >= 4 and all(not any(s in c.text for s in stops) for r in out for c in r)


def test_context_cap_and_prompt_errors_like_hf_sampler(model, tok):
    m = _no_eos(model, tok)
    prompts = _prompts(tok)
    limit = max(len(p) for p in prompts) + 3
    params = SamplingParams(temperature=0.0, max_new_tokens=10, n=2)
    ref = HFSampler(m, tok, max_context=limit).generate(prompts, params)
    out = PrefixSharingSampler(m, tok, max_context=limit).generate(prompts, params)
    _same(out, ref)
    assert {len(c.token_ids) for r in out for c in r} == {min(10, limit - len(p)) for p in prompts}
    full = PrefixSharingSampler(m, tok, max_context=len(prompts[0])).generate([prompts[0], prompts[0][:-1]], params)
    assert full[0] == [Completion([], [], "length", "")] * 2 and len(full[1][0].token_ids) == 1
    sampler = PrefixSharingSampler(m, tok, max_context=limit)
    with pytest.raises(ValueError, match=rf"prompt 1 has {limit + 1} tokens.*max_context={limit}"):
        sampler.generate([prompts[0], [tok.bos_token_id] * (limit + 1)], params)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        sampler.generate([[]], params)


# ------------------------------------------------------------------------------------------
# log-probs, seeds, model state


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_logprobs_match_fresh_forward(model, tok, temperature):
    prompts = _mixed_prompts(tok)
    eos_likely = _with_output_bias(model, {tok.eos_token_id: 2.0})  # rows of many lengths
    out = PrefixSharingSampler(eos_likely, tok, max_batch_size=8).generate(
        prompts, SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=12, n=3), seed=0)
    flat_prompts, flat = [], []
    for p, comps in zip(prompts, out):
        for c in comps:
            assert len(c.logprobs) == len(c.token_ids) > 0
            flat_prompts.append(p)
            flat.append(c)
    batch = batch_sequences(flat_prompts, [c.token_ids for c in flat], tok.pad_token_id)
    with torch.no_grad():
        lp = response_logprobs(eos_likely, batch, temperature)
    for i, c in enumerate(flat):
        torch.testing.assert_close(lp[i][batch["response_mask"][i]], torch.tensor(c.logprobs), atol=1e-4, rtol=0)


def test_seeded_reproducible_global_rng_and_model_mode_untouched(model, tok):
    m = _no_eos(model, tok)
    m.train()
    sampler = PrefixSharingSampler(m, tok, max_batch_size=8)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=10, n=3)
    prompts = _mixed_prompts(tok)
    state = torch.get_rng_state()
    a = sampler.generate(prompts, params, seed=123)
    b = sampler.generate(prompts, params, seed=123)
    c = sampler.generate(prompts, params, seed=124)
    assert torch.equal(torch.get_rng_state(), state)
    assert m.training
    assert a == b
    assert [x.token_ids for r in a for x in r] != [x.token_ids for r in c for x in r]
    assert len({tuple(x.token_ids) for x in a[1]}) > 1  # n draws, not one draw copied
    tiny_p = sampler.generate(prompts, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=10, n=2), seed=3)
    greedy = sampler.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=10))
    for g, comps in zip(greedy, tiny_p):
        assert all(x.token_ids == g[0].token_ids and x.logprobs == pytest.approx(g[0].logprobs, abs=1e-5) for x in comps)


def test_update_weights(tok):
    a, b = _tiny_llama(tok, seed=1), _tiny_llama(tok, seed=2)
    sampler = PrefixSharingSampler(a, tok)
    sampler.update_weights(a)
    sampler.update_weights(b)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)


# ------------------------------------------------------------------------------------------
# the work saved: one prefill per distinct prompt, finished rows dropped


def test_each_distinct_prompt_is_prefilled_once(model, tok):
    m = _no_eos(model, tok)
    p = _prompts(tok)
    prompts = [p[0], p[1], p[0], p[2], p[1], p[0]]  # 3 distinct prompts, 6 requests
    calls: list[tuple[int, int]] = []
    handle = _forward_hook(m, calls)
    try:
        sampler = PrefixSharingSampler(m, tok, max_batch_size=64, bucket_slack=math.inf)
        out = sampler.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=6, n=5), seed=0)
    finally:
        handle.remove()
    prefill = [c for c in calls if c[1] > 1]
    decode = [c for c in calls if c[1] == 1]
    assert sum(rows for rows, _ in prefill) == 3 and len(prefill) == sampler.stats.prefill_calls == 1
    assert sampler.stats.unique_prompts == 3 and sampler.stats.prompts == 6
    assert all(rows == 30 for rows, _ in decode) and len(decode) == 5  # 6 prompts x 5 samples, 6 tokens
    # identical prompts share the prefill but not the draws
    assert len({tuple(c.token_ids) for c in out[0] + out[2] + out[5]}) > 5


def test_finished_rows_leave_the_batch(model, tok):
    m = _with_output_bias(model, {tok.eos_token_id: 3.0})  # EOS likely but not certain at each step
    calls: list[tuple[int, int]] = []
    handle = _forward_hook(m, calls)
    try:
        sampler = PrefixSharingSampler(m, tok, max_batch_size=64)
        out = sampler.generate([_prompts(tok)[1]], SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=20, n=24),
                               seed=0)
    finally:
        handle.remove()
    lengths = [len(c.token_ids) for c in out[0]]
    assert min(lengths) < 5 and max(lengths) > 10  # rows finish at very different steps
    decode = [rows for rows, width in calls if width == 1]
    assert decode == sorted(decode, reverse=True) and decode[-1] < decode[0]  # the batch only shrinks
    # the first token comes from the prefill; every later token costs its row exactly one decode step
    assert sum(decode) == sampler.stats.decode_rows == sum(n - 1 for n in lengths)
    for c in out[0]:
        assert (c.finish_reason == "stop") == (c.token_ids[-1] == tok.eos_token_id)
        assert tok.eos_token_id not in c.token_ids[:-1] and tok.pad_token_id not in c.token_ids


# ------------------------------------------------------------------------------------------
# stop-string candidate mask


def test_stop_candidate_mask_is_conservative():
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["a: b; → c:d é"] * 8, trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    mask = stop_candidate_mask(t, ("x:", "→"), len(t) + 3)
    assert mask.shape == (len(t) + 3,) and mask[len(t):].all()  # ids unknown to the tokenizer
    for i in range(len(t)):
        text = t.decode([i], skip_special_tokens=True)
        must = ":" in text or "→" in text or "\ufffd" in text
        if must:
            assert mask[i], (i, text)
        if i in t.all_special_ids:
            assert not mask[i]
        elif text and not must and text.isascii():
            assert not mask[i], (i, text)
    # every lone byte >= 0x80 decodes to U+FFFD: each could be the last byte of "→"
    assert sum(bool(mask[i]) for i in range(len(t)) if "\ufffd" in t.decode([i])) >= 64


def test_multibyte_stop_string_identical_to_hf_sampler(model, tok):
    """A stop string whose last character spans several byte tokens (U+FFFD candidates)."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=259, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["ab→é"], trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    arrow = t.encode("→", add_special_tokens=False)
    assert len(arrow) == 3  # three byte tokens
    m = _tiny_llama(t, seed=3)
    m = _with_output_bias(m, {i: 20.0 for i in arrow} | {t.eos_token_id: -1e4})  # mostly the 3 bytes of "→"
    prompts = [[t.bos_token_id], [t.bos_token_id] + t.encode("ab", add_special_tokens=False)]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=30, n=16, stop_strings=("→",))
    out = PrefixSharingSampler(m, t).generate(prompts, params, seed=0)
    assert sum(c.finish_reason == "stop" for r in out for c in r) >= 2
    for r in out:
        for c in r:
            full = t.decode(c.token_ids)
            if c.finish_reason == "stop":  # cut right after the byte completing "→"; text before it
                assert full.endswith("→") and "→" not in t.decode(c.token_ids[:-1]) and c.text == full[:-1]
            else:
                assert "→" not in full and len(c.token_ids) == 30
    greedy = SamplingParams(temperature=0.0, max_new_tokens=30, n=1, stop_strings=("→", "b"))
    _same(PrefixSharingSampler(m, t).generate(prompts, greedy), HFSampler(m, t).generate(prompts, greedy))


# ------------------------------------------------------------------------------------------
# statistical agreement with HFSampler (sampled)


def test_sampled_distribution_matches_hf_sampler_and_the_model(model, tok):
    """First-token frequencies of both samplers vs the exact tempered top-p distribution, and the
    mean log-prob of two tokens between samplers; bounds are 5 standard errors (seeds are fixed,
    so the test is deterministic; 5 SE makes it robust to any change of seed)."""
    temperature, top_p, n = 0.5, 0.9, 600
    prompt = _prompts(tok)[2]
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=2, n=n)
    fast = PrefixSharingSampler(model, tok, max_batch_size=256).generate([prompt], params, seed=11)[0]
    hf = HFSampler(model, tok, max_batch_size=256).generate([prompt], params, seed=12)[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1] / temperature
    probs = torch.softmax(logits, -1)
    sorted_p, order = probs.sort(descending=True)
    keep = order[: int((sorted_p.cumsum(0) < top_p).sum()) + 1]  # the nucleus: smallest set with mass >= top_p
    exact = torch.zeros_like(probs)
    exact[keep] = probs[keep] / probs[keep].sum()
    assert 5 <= len(keep) <= 20  # several likely tokens, and some left out
    for comps in (fast, hf):
        first = torch.bincount(torch.tensor([c.token_ids[0] for c in comps]), minlength=len(probs)).float() / n
        assert first[exact == 0].sum() == 0
        se = (exact * (1 - exact) / n).sqrt()
        assert ((first - exact).abs() <= 5 * se + 1e-9).all(), (first - exact).abs().max()
    mean = [torch.tensor([sum(c.logprobs) for c in comps]) for comps in (fast, hf)]
    se = math.sqrt(sum(float(m.var()) / n for m in mean))
    assert abs(float(mean[0].mean() - mean[1].mean())) < 5 * se


# ------------------------------------------------------------------------------------------
# VinePPO Monte-Carlo values through a real LanguageEnv


class CoinTask:
    """A toy task: the response is a few characters of "1", "2", " " and "\\n"; the last number read
    from it (the grader's lenient fallback) is compared with the answer "1"."""

    name, grading_kind, stop_strings = "coin", "gsm8k", ()

    def load(self, split):
        return [Problem(id=f"coin/{i}", question=q, solution="1", answer="1")
                for i, q in enumerate(["12 21\n1", "2 1 12"])]

    def prompt(self, problem):
        return problem.question + "\n"

    def target(self, problem):
        return problem.solution

    def split_steps(self, response):
        return split_gsm8k(response)


@pytest.fixture(scope="module")
def coin():
    task = CoinTask()
    char_tok = build_char_tokenizer(["12 \n"])
    torch.manual_seed(5)
    m = build_tiny_model(char_tok, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2).eval()
    never = {t: -1e4 for t in (char_tok.unk_token_id, char_tok.bos_token_id, char_tok.pad_token_id)}
    m = _with_output_bias(m, {char_tok.eos_token_id: -0.5, **never})
    with torch.no_grad():
        m.lm_head.weight.mul_(0.5)  # milder dependence on the context: values between 0.1 and 0.4
    env = LanguageEnv(task, char_tok, split="train", max_new_tokens=16)
    return task, env, char_tok, m


def _prefix_states(env, sampler, tokenizer, task):
    """Unique step-boundary prefixes, as `VinePPO.estimate_values` builds them."""
    episodes = collect_episodes(env, sampler, env.problems, SamplingParams(1.0, 1.0, 16, (), 4), seed=0)
    unique = {}
    for e in episodes:
        for b in step_layout(e, tokenizer, task.split_steps).boundaries:
            unique.setdefault(e.state.prefix(b).token_ids, e.state.prefix(b))
    return list(unique.values())


def test_vineppo_values_agree_with_hf_sampler(coin):
    task, env, char_tok, m = coin
    hf, fast = HFSampler(m, char_tok, max_batch_size=512), PrefixSharingSampler(m, char_tok, max_batch_size=512)
    states = _prefix_states(env, hf, char_tok, task)
    assert len(states) >= 4 and len({len(s.token_ids) for s in states}) >= 3
    # greedy: identical continuations, so identical values
    greedy = SamplingParams(0.0, 1.0, 16, (), 1)
    a = continue_states(env, hf, states, greedy)
    b = continue_states(env, fast, states, greedy)
    assert [[r.state for r in rs] for rs in a] == [[r.state for r in rs] for rs in b]
    # sampled: K continuations per state; mean rewards agree within 5 standard errors
    k = 100
    params = SamplingParams(1.0, 0.95, 16, (), k)
    values = []
    for sampler, seed in ((hf, 1), (fast, 2)):
        results = continue_states(env, sampler, states, params, seed=seed)
        values.append([sum(r.reward for r in rs) / k for rs in results])
    v_hf, v_fast = torch.tensor(values[0]), torch.tensor(values[1])
    assert 0.05 < float(v_hf.mean()) < 0.95  # rewards are not all alike
    p = ((v_hf + v_fast) / 2).clamp(1 / k, 1 - 1 / k)
    se = (2 * p * (1 - p) / k).sqrt()
    assert ((v_hf - v_fast).abs() <= 5 * se).all(), (v_hf, v_fast)
    pooled_se = float(se.pow(2).sum().sqrt()) / len(states)
    assert abs(float(v_hf.mean() - v_fast.mean())) < 5 * pooled_se


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("temperature", [0.1, 0.6, 1.0, 5.0])
def test_nucleus_is_transformers_top_p(top_p, temperature):
    """`nucleus` keeps exactly the tokens transformers' TopPLogitsWarper keeps, with the same
    renormalised probabilities, on peaked and flat rows (flat ones widen k up to the whole vocabulary)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from algos.samplers.nucleus import nucleus

    gen = torch.Generator().manual_seed(int(100 * top_p + temperature))
    logits = torch.randn(64, 2048, generator=gen, dtype=torch.float64) * 4
    scores = logits / temperature
    warped = TopPLogitsWarper(top_p)(None, scores.clone()) if top_p < 1 else scores
    expected = torch.softmax(warped, dim=-1)
    weights, ids = nucleus(torch.softmax(scores, dim=-1), top_p)
    got = torch.zeros_like(expected).scatter(1, ids, weights)
    got = got / got.sum(dim=-1, keepdim=True)
    assert torch.equal(got > 0, expected > 0)
    assert torch.allclose(got, expected, atol=1e-12)


def test_sample_top_p_frequencies_and_errors():
    """Draws from `sample_top_p` follow the renormalised nucleus (4 tokens kept of 6), never a token
    outside it; bad arguments are refused."""
    from algos.samplers.nucleus import nucleus, sample_top_p

    probs = torch.tensor([[0.05, 0.4, 0.02, 0.3, 0.2, 0.03]]).repeat(20000, 1)
    tok = sample_top_p(probs, 0.92, torch.Generator().manual_seed(0))
    counts = torch.bincount(tok, minlength=6).double() / len(tok)
    nucleus_p = torch.tensor([0.05, 0.4, 0.0, 0.3, 0.2, 0.0], dtype=torch.float64) / 0.95
    assert counts[2] == 0 and counts[5] == 0
    assert torch.allclose(counts, nucleus_p, atol=0.015)
    with pytest.raises(ValueError, match="top_p"):
        nucleus(probs, 0.0)
    with pytest.raises(ValueError, match="first_k"):
        nucleus(probs, 0.5, first_k=0)
