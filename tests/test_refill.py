"""Continuous batching of the prefix-sharing sampler (`algos.samplers.refill`).

Rows join the running batch as others finish, in cohorts with their own cascade caches. What each
row computes must not depend on its cohort: greedy completions equal those of chunked decoding,
and every sampled completion's log-probs are the model's own, recomputed over the whole sequence
(float64), whatever rows it ran beside. Prompts of several prefill buckets, per-prompt caps, stop
strings and a small batch make rows cross bucket and cohort boundaries."""

from __future__ import annotations

import pytest
import torch
from test_fast_sampler import _mixed_prompts
from test_fused_decode import _model
from test_sampling import _train_tokenizer

from algos.samplers.base import SamplingParams
from algos.samplers.prefix_sharing import PrefixSharingSampler


@pytest.fixture(scope="module")
def tok():
    return _train_tokenizer(bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model64(tok):
    return _model(tok, "llama").double()


def _teacher_forced_logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> list[float]:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1: -1].float()
    logp = torch.log_softmax(logits / temperature if temperature else logits, dim=-1)
    return logp.gather(1, torch.tensor(tokens)[:, None]).squeeze(1).tolist()


@pytest.mark.parametrize("stop", [(), ("\n",), (" the", "?")])
def test_greedy_completions_equal_chunked_decoding(model64, tok, stop):
    prompts = _mixed_prompts(tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=20, stop_strings=stop, n=3)
    budgets = [20, 5, 20, 12, 20, 1, 9]  # per-prompt caps: rows of one bucket end at different steps
    refilled = PrefixSharingSampler(model64, tok, max_batch_size=4, refill_at=1)
    chunked = PrefixSharingSampler(model64, tok, max_batch_size=4, continuous=False)
    a = refilled.generate(prompts, params, budgets=budgets)
    b = chunked.generate(prompts, params, budgets=budgets)
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            assert (x.token_ids, x.finish_reason, x.text) == (y.token_ids, y.finish_reason, y.text)
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-9, rtol=0)
    assert refilled.stats.generated_tokens == chunked.stats.generated_tokens > 30
    assert len(refilled.stats.buckets) == len(chunked.stats.buckets) > 1  # one prefill per bucket on both paths
    # fuller batches: fewer decode steps for the same tokens
    assert refilled.stats.decode_calls < chunked.stats.decode_calls
    assert refilled.stats.decode_rows / refilled.stats.decode_calls > chunked.stats.decode_rows / chunked.stats.decode_calls


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_every_sampled_completion_has_the_models_own_logprobs(model64, tok, temperature, top_p):
    """Rows admitted at different steps, in different cohorts, beside rows of other prompts: each
    completion's returned log-probs equal the model's, recomputed over prompt + completion alone."""
    prompts = _mixed_prompts(tok)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=16, stop_strings=("?",), n=5)
    sampler = PrefixSharingSampler(model64, tok, max_batch_size=8, refill_at=2)
    out = sampler.generate(prompts, params, seed=0)
    checked = 0
    for prompt, row in zip(prompts, out):
        for comp in row:
            if comp.token_ids:
                want = _teacher_forced_logprobs(model64, list(prompt), comp.token_ids, temperature)
                torch.testing.assert_close(torch.tensor(comp.logprobs), torch.tensor(want), atol=1e-5, rtol=0)
                checked += 1
    assert checked == sum(len(r) for r in out) - sum(1 for r in out for c in r if not c.token_ids)
    assert sampler.stats.decode_calls > 0 and checked > 20


def test_refill_is_seeded_and_covers_every_row(model64, tok):
    prompts = _mixed_prompts(tok)
    params = SamplingParams(temperature=1.0, max_new_tokens=12, n=6)
    sampler = PrefixSharingSampler(model64, tok, max_batch_size=8)
    a, b = sampler.generate(prompts, params, seed=4), sampler.generate(prompts, params, seed=4)
    assert [[c.token_ids for c in r] for r in a] == [[c.token_ids for c in r] for r in b]
    assert all(len(r) == 6 and all(c is not None for c in r) for r in a)


def test_refill_arguments_are_checked(model64, tok):
    with pytest.raises(ValueError, match="refill_at"):
        PrefixSharingSampler(model64, tok, max_batch_size=8, refill_at=9)
    with pytest.raises(ValueError, match="refill_at"):
        PrefixSharingSampler(model64, tok, max_batch_size=8, refill_at=0)
    with pytest.raises(ValueError, match="continuous"):
        PrefixSharingSampler(model64, tok, continuous=None)
    assert PrefixSharingSampler(model64, tok, max_batch_size=64).refill_at == 32
