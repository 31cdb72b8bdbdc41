"""Tests for algos.samplers.vllm.VLLMSampler against HFSampler on a tiny fp32 Llama (no hub).

Needs the optional `vllm` package, so every test is marked ``vllm`` (left out of the default run)
and the module is skipped where vllm is missing. On a CPU machine, run it in the separate
environment that holds the CPU build (see algos/samplers/vllm.py):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 /work/venv-vllm/bin/python -m pytest -q -m vllm \
        tests/test_vllm_sampler.py -p no:cacheprovider

One engine is built for the whole module (building one per test would cost seconds each, and
`update_weights` must work on the live engine anyway).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from algos.models.policy import batch_sequences, response_logprobs
from algos.models.tiny import build_tiny_model
from algos.samplers.base import Completion, Sampler, SamplingParams
from algos.samplers.hf import HFSampler
from algos.samplers.vllm import VLLMSampler, make_vllm_sampler  # imports vllm lazily

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module", autouse=True)
def _needs_vllm():
    # here rather than at import: the default run (-m "not vllm") then just deselects these
    # tests, and `-m vllm` without vllm skips each one with the reason
    pytest.importorskip("vllm")


MAX_CONTEXT = 256
CORPUS = [
    "Janet has 16 eggs. She eats 3 for breakfast and bakes 4 into muffins.\nShe sells the rest.\n",
    "Problem:\nWhat is 12 + 30?\n\nSolution: 12 + 30 = 42. The answer is 42.\n\n\nProblem:",
    "The quick brown fox jumps over the lazy dog; x = y * 2, so y = 7!",
]
# the last prompt spans several KV blocks (block_size=32 below), so later calls hit the prefix cache
TEXTS = [
    "Janet has",
    "Problem:\nWhat is 12 + 30?\n\nSolution:",
    "x = y * 2, so y",
    "The quick brown fox jumps",
    "The",
    CORPUS[0] + CORPUS[2] + CORPUS[1],
]


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE whose alphabet is only the characters of CORPUS: every token decodes to
    printable ASCII, so stop strings never straddle a partial UTF-8 character."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    tk.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model(tokenizer):
    # head size 32 (64 / 2 heads): vLLM's CPU attention rejects 16. initializer_range 0.2: peaked,
    # prompt-dependent next-token distributions, so greedy paths have no near-ties.
    torch.manual_seed(0)
    return build_tiny_model(
        tokenizer, hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=MAX_CONTEXT, initializer_range=0.2
    ).eval()


@pytest.fixture(scope="module")
def sampler(model, tokenizer, tmp_path_factory):
    s = make_vllm_sampler(
        model,
        tokenizer,
        MAX_CONTEXT,
        tmp_path_factory.mktemp("vllm"),
        enforce_eager=True,  # no torch.compile warm-up on CPU
        kv_cache_memory_bytes=64 << 20,  # else vLLM's CPU backend reserves most of the RAM
        block_size=32,  # prefix caching reuses whole blocks only (CPU default: 128 tokens)
    )
    yield s
    s.close()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    out = [[tokenizer.bos_token_id] + tokenizer.encode(t) for t in TEXTS]
    assert len(out[-1]) > 2 * 32
    return out


def _hf(model, tokenizer):
    return HFSampler(model, tokenizer, max_context=MAX_CONTEXT)


def test_fields_and_n_completions(sampler, tokenizer, prompts):
    assert isinstance(sampler, Sampler)
    assert sampler.max_context == MAX_CONTEXT
    out = sampler.generate(prompts[:3], SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=10, n=3), seed=0)
    assert len(out) == 3 and all(len(comps) == 3 for comps in out)
    eos = tokenizer.eos_token_id
    for comps in out:
        for c in comps:
            assert isinstance(c, Completion)
            assert len(c.token_ids) == len(c.logprobs) > 0
            assert all(isinstance(t, int) for t in c.token_ids) and all(lp <= 0 for lp in c.logprobs)
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1]
            else:
                assert c.finish_reason == "length" and len(c.token_ids) == 10 and eos not in c.token_ids
        assert len({tuple(c.token_ids) for c in comps}) > 1  # n draws, not one draw copied


def test_greedy_matches_hf(sampler, model, tokenizer, prompts):
    params = SamplingParams(temperature=0.0, max_new_tokens=16, n=2)
    ours = sampler.generate(prompts, params)
    ref = _hf(model, tokenizer).generate(prompts, params)
    assert len({tuple(r[0].token_ids) for r in ref}) > 1  # the prompts are distinguishable
    for mine, theirs in zip(ours, ref):
        for a, b in zip(mine, theirs):
            assert a.token_ids == b.token_ids
            assert a.finish_reason == b.finish_reason and a.text == b.text
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature", [0.6, 0.0, 1.3])
def test_logprobs_match_training_forward(sampler, model, tokenizer, prompts, temperature):
    # top_p 0.9 cuts the nucleus: vLLM's "processed_logprobs" would be renormalised over it
    params = SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=12, n=2)
    out = sampler.generate(prompts, params, seed=1)
    flat_prompts, flat = [], []
    for p, comps in zip(prompts, out):
        for c in comps:
            flat_prompts.append(p)
            flat.append(c)
    batch = batch_sequences(flat_prompts, [c.token_ids for c in flat], tokenizer.pad_token_id)
    with torch.no_grad():
        lp = response_logprobs(model, batch, temperature)
    for i, c in enumerate(flat):
        torch.testing.assert_close(torch.tensor(c.logprobs), lp[i][batch["response_mask"][i]], atol=1e-3, rtol=0)


def test_top_p_nucleus_is_taken_from_the_tempered_distribution(sampler, model, prompts):
    temperature, top_p = 0.6, 0.5
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=16, n=4)
    out = sampler.generate(prompts, params, seed=2)
    for p, comps in zip(prompts, out):
        for c in comps:
            with torch.no_grad():
                logits = model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1 : -1]
            probs = torch.softmax(logits / temperature, dim=-1)
            for k, t in enumerate(c.token_ids):
                # the mass of the tokens likelier than the sampled one is below top_p
                assert probs[k][probs[k] > probs[k][t]].sum().item() < top_p + 1e-4


def test_stop_strings_cut_as_hf(sampler, model, tokenizer, prompts):
    hf = _hf(model, tokenizer)
    prompt = prompts[1]
    free = hf.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=30))[0][0]
    ours_free = sampler.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=30))[0][0]
    assert ours_free.token_ids == free.token_ids
    # a stop string completed by the k-th generated token: the last 3 characters of its prefix
    for k in range(4, len(free.token_ids)):
        before, upto = tokenizer.decode(free.token_ids[: k - 1]), tokenizer.decode(free.token_ids[:k])
        stop = upto[-3:]
        if len(upto) > len(before) and len(stop) == 3 and stop not in before:
            break
    else:
        pytest.fail(f"no usable stop string in {free.text!r}")
    params = SamplingParams(temperature=0.0, max_new_tokens=30, stop_strings=("@@@never@@@", stop))
    ours = sampler.generate([prompt], params)[0][0]
    theirs = hf.generate([prompt], params)[0][0]
    assert ours.finish_reason == theirs.finish_reason == "stop"
    assert ours.token_ids == theirs.token_ids == free.token_ids[:k]
    assert ours.text == theirs.text == free.text[: free.text.find(stop)]
    assert ours.logprobs == pytest.approx(free.logprobs[:k], abs=1e-4)
    # a stop string inside the prompt never matches
    prompt_text = tokenizer.decode(prompt, skip_special_tokens=True)
    inside = prompt_text[-6:]
    if inside not in free.text:
        c = sampler.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=30, stop_strings=(inside,)))[0][0]
        assert c.token_ids == free.token_ids and c.finish_reason == free.finish_reason


def test_max_new_tokens_and_context_cap(sampler, tokenizer, prompts):
    eos = tokenizer.eos_token_id
    out = sampler.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=7, n=2), seed=0)
    reasons = set()
    for comps in out:
        for c in comps:
            reasons.add(c.finish_reason)
            if c.finish_reason == "length":
                assert len(c.token_ids) == len(c.logprobs) == 7 and eos not in c.token_ids
            else:
                assert c.token_ids[-1] == eos
    assert "length" in reasons
    # prompt + completion never exceeds max_context
    body = prompts[3][1:]
    long_prompt = (prompts[3][:1] + body * MAX_CONTEXT)[: MAX_CONTEXT - 3]
    full_prompt = (prompts[3][:1] + body * MAX_CONTEXT)[:MAX_CONTEXT]
    (c,), (empty,) = sampler.generate([long_prompt, full_prompt], SamplingParams(temperature=0.0, max_new_tokens=20))
    assert len(c.token_ids) <= 3 and (c.finish_reason == "length") == (len(c.token_ids) == 3 and eos not in c.token_ids)
    assert empty == Completion([], [], "length", "")
    with pytest.raises(ValueError, match="more than the context limit"):
        sampler.generate([full_prompt + [5]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate([prompts[0], []], SamplingParams(max_new_tokens=2))


def test_same_seed_same_completions(sampler, prompts):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12, n=3)
    a = sampler.generate(prompts, params, seed=123)
    b = sampler.generate(prompts, params, seed=123)
    c = sampler.generate(prompts, params, seed=124)
    ids = lambda res: [x.token_ids for comps in res for x in comps]
    assert ids(a) == ids(b)
    assert [x.text for r in a for x in r] == [x.text for r in b for x in r]
    for x, y in zip([x for r in a for x in r], [y for r in b for y in r]):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
    assert ids(a) != ids(c)
    # a row's draws do not depend on the rows beside it: the first prompt alone gives the same
    alone = sampler.generate(prompts[:1], params, seed=123)
    assert ids(alone) == ids(a)[: params.n]
    # more prompt tokens than one engine step takes (4096): seeded rows whose prefill is split
    # crash vLLM 0.32's CPU build unless chunked prefill is off (see VLLMSampler)
    # (a distinct second token per row: no prefix-cache hits, every prompt is prefilled in full)
    long = prompts[-1]
    many = [[long[0], 4 + r] + long[1:] for r in range(4096 // len(long) + 8)]
    small = SamplingParams(temperature=1.0, max_new_tokens=3)
    assert ids(sampler.generate(many, small, seed=5)) == ids(sampler.generate(many, small, seed=5))


def test_update_weights_without_new_engine(sampler, model, tokenizer, prompts):
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    llm = sampler.llm
    # fills the prefix cache: without a reset after the update, the long prompt would reuse KV
    # computed with the old weights
    before = [r[0].token_ids for r in sampler.generate(prompts, params)]
    perturbed = copy.deepcopy(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    want = [r[0].token_ids for r in _hf(perturbed, tokenizer).generate(prompts, params)]
    assert want != before
    try:
        sampler.update_weights(perturbed)
        assert sampler.llm is llm
        got = [r[0].token_ids for r in sampler.generate(prompts, params)]
        assert got == want
    finally:
        sampler.update_weights(model)  # leave the module's engine as it was
    assert [r[0].token_ids for r in sampler.generate(prompts, params)] == before


def test_missing_model_dir(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        VLLMSampler(str(tmp_path / "no_such_model"), tokenizer)
