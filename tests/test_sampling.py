"""Tests for algos.samplers.base (HFSampler) and algos.models.policy, on a tiny random Llama built offline.

The tokenizer is a byte-level BPE trained here on a few strings, with an alphabet of only the
characters seen, so every token decodes to printable ASCII. Behaviours that a random model does
not show on its own (EOS, never EOS) are forced by giving the output layer a bias.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from algos.models.policy import batch_sequences, clone_reference, load_policy, response_logprobs, token_logprobs
from algos.samplers.base import Completion, Sampler, SamplingParams
from algos.samplers.hf import HFSampler

TEXTS = [
    "Janet has 16 eggs. She eats 3 for breakfast and bakes 4 into muffins.\nShe sells the rest.\n",
    "Problem:\nWhat is 12 + 30?\n\nSolution: 12 + 30 = 42. The answer is 42.\n\n\nProblem:",
    "The quick brown fox jumps over the lazy dog; x = y * 2, so y = 7!",
]


def _train_tokenizer(**special) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    tk.train_from_iterator(TEXTS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, **special)


@pytest.fixture(scope="module")
def tok():
    return _train_tokenizer(bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _tiny_llama(tok, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # large weights: peaked, prompt-dependent next-token distributions
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model(tok):
    return _tiny_llama(tok)


def _with_output_bias(model, bias: dict[int, float]):
    """A copy of ``model`` whose lm_head adds ``bias[token]`` to that token's logit."""
    m = copy.deepcopy(model)
    old = m.lm_head
    new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.zero_()
        for t, b in bias.items():
            new.bias[t] = b
    m.lm_head = new
    return m


def _prompts(tok) -> list[list[int]]:
    texts = ["Janet has", "Problem:\nWhat is 12 + 30?\n\nSolution:", "x = y * 2, so y", "The quick brown fox jumps"]
    return [[tok.bos_token_id] + tok.encode(t) for t in texts]


def _no_eos(model, tok):
    return _with_output_bias(model, {tok.eos_token_id: -1e4})


# ------------------------------------------------------------------------------------------
# SamplingParams


def test_sampling_params_validation():
    assert SamplingParams(stop_strings=["a", "b"]).stop_strings == ("a", "b")
    for kwargs, field in [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"n": 0}, "n"),
        ({"stop_strings": ("",)}, "stop_strings"),
    ]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    with pytest.raises(TypeError, match="stop_strings"):
        SamplingParams(stop_strings="\n\n")
    with pytest.raises(TypeError, match="n"):
        SamplingParams(n=2.0)


# ------------------------------------------------------------------------------------------
# HFSampler


def test_protocol(model, tok):
    assert isinstance(HFSampler(model, tok), Sampler)


@pytest.mark.parametrize("temperature", [0.6, 0.0])
def test_logprobs_match_training_forward(model, tok, temperature):
    prompts = _prompts(tok)
    sampler = HFSampler(model, tok, max_batch_size=3)
    params = SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=12, n=2)
    out = sampler.generate(prompts, params, seed=0)
    flat_prompts, flat = [], []
    for p, comps in zip(prompts, out):
        for c in comps:
            assert len(c.logprobs) == len(c.token_ids) > 0
            flat_prompts.append(p)
            flat.append(c)
    batch = batch_sequences(flat_prompts, [c.token_ids for c in flat], tok.pad_token_id)
    with torch.no_grad():
        lp = response_logprobs(model, batch, temperature)
    for i, c in enumerate(flat):
        got = lp[i][batch["response_mask"][i]]
        torch.testing.assert_close(got, torch.tensor(c.logprobs), atol=1e-4, rtol=0)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng(model, tok):
    sampler = HFSampler(model, tok)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=10, n=3)
    prompts = _prompts(tok)
    state = torch.get_rng_state()
    a = sampler.generate(prompts, params, seed=123)
    b = sampler.generate(prompts, params, seed=123)
    c = sampler.generate(prompts, params, seed=124)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == b
    assert [x.token_ids for r in a for x in r] != [x.token_ids for r in c for x in r]


def test_left_padded_batch_equals_one_at_a_time(model, tok):
    m = _no_eos(model, tok)
    sampler = HFSampler(m, tok)
    prompts = _prompts(tok)
    assert len({len(p) for p in prompts}) == len(prompts)
    params = SamplingParams(temperature=0.0, max_new_tokens=15)
    batched = sampler.generate(prompts, params)
    for p, comps in zip(prompts, batched):
        (single,) = sampler.generate([p], params)
        assert comps[0].token_ids == single[0].token_ids
        torch.testing.assert_close(torch.tensor(comps[0].logprobs), torch.tensor(single[0].logprobs), atol=1e-4, rtol=0)


def test_n_samples_and_input_order(model, tok):
    m = _no_eos(model, tok)
    prompts = _prompts(tok)[::-1] + _prompts(tok)[:2]  # lengths out of order, with repeats
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8, n=3)
    singles = [HFSampler(m, tok).generate([p], SamplingParams(temperature=0.0, max_new_tokens=8))[0][0] for p in prompts]
    assert len({tuple(s.token_ids) for s in singles}) > 1  # prompts are distinguishable
    out = HFSampler(m, tok, max_batch_size=4).generate(prompts, greedy)  # 18 rows in chunks of 4
    assert len(out) == len(prompts)
    for comps, single in zip(out, singles):
        assert len(comps) == 3
        assert all(c.token_ids == single.token_ids for c in comps)
    sampled = HFSampler(m, tok, max_batch_size=4).generate(prompts, SamplingParams(temperature=1.0, n=3, max_new_tokens=8), seed=0)
    assert [len(c) for c in sampled] == [3] * len(prompts)
    assert len({tuple(c.token_ids) for c in sampled[0]}) > 1  # n draws, not one draw copied


def test_max_new_tokens_gives_length(model, tok):
    out = HFSampler(_no_eos(model, tok), tok).generate(_prompts(tok), SamplingParams(max_new_tokens=7, n=2), seed=0)
    for comps in out:
        for c in comps:
            assert c.finish_reason == "length"
            assert len(c.token_ids) == len(c.logprobs) == 7
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_eos_stops_with_eos_last(model, tok):
    eos = tok.eos_token_id
    out = HFSampler(_with_output_bias(model, {eos: 1e3}), tok).generate(_prompts(tok), SamplingParams(max_new_tokens=5))
    for (c,) in out:
        assert c.token_ids == [eos] and c.finish_reason == "stop" and c.text == ""
        assert abs(c.logprobs[0]) < 1e-4


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_finished_rows_return_no_padding(model, tok, pad_is_eos):
    tk = copy.deepcopy(tok)
    if pad_is_eos:
        tk.pad_token = tk.eos_token
    eos = tk.eos_token_id
    m = _with_output_bias(model, {eos: 4.0})  # EOS likely but not certain at each step
    out = HFSampler(m, tk).generate(_prompts(tok), SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=10, n=8), seed=0)
    reasons = set()
    for comps in out:
        for c in comps:
            reasons.add(c.finish_reason)
            assert len(c.logprobs) == len(c.token_ids)
            assert tok.pad_token_id not in c.token_ids
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1]
            else:
                assert len(c.token_ids) == 10 and eos not in c.token_ids
    assert reasons == {"stop", "length"}


def test_stop_string_cuts_at_first_hit_in_generated_text(model, tok):
    m = _no_eos(model, tok)
    sampler = HFSampler(m, tok)
    prompt = _prompts(tok)[1]
    free = sampler.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=30))[0][0]
    full = free.text
    # a stop string completed by the k-th generated token: the last 3 characters of its prefix
    for k in range(4, 30):
        before, upto = tok.decode(free.token_ids[: k - 1]), tok.decode(free.token_ids[:k])
        stop = upto[-3:]
        if len(upto) > len(before) and len(stop) == 3 and stop not in before:
            break
    else:
        pytest.fail(f"no usable stop string in {full!r}")
    never = "@@@never@@@"
    out = sampler.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=30, stop_strings=(never, stop)))[0][0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[:k]
    assert out.logprobs == pytest.approx(free.logprobs[:k], abs=1e-5)
    assert out.text == full[: full.find(stop)]
    assert stop not in out.text


def test_stop_string_never_matches_the_prompt(model, tok):
    m = _no_eos(model, tok)
    sampler = HFSampler(m, tok)
    prompt = _prompts(tok)[1]
    prompt_text = tok.decode(prompt, skip_special_tokens=True)
    free = sampler.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=20))[0][0]
    inside = prompt_text[-6:]  # entirely in the prompt
    straddle = prompt_text[-3:] + free.text[:1]  # across the prompt/response boundary
    assert inside not in free.text and straddle not in free.text
    out = sampler.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=20, stop_strings=(inside, straddle)))
    assert out[0][0] == free


def test_tiny_top_p_is_greedy(model, tok):
    sampler = HFSampler(_no_eos(model, tok), tok)
    greedy = sampler.generate(_prompts(tok), SamplingParams(temperature=0.0, max_new_tokens=10))
    nucleus = sampler.generate(_prompts(tok), SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=10, n=2), seed=3)
    for g, comps in zip(greedy, nucleus):
        for c in comps:
            assert c.token_ids == g[0].token_ids
            # at temperature 1 the tempered log-prob is the plain one; top-p does not renormalise
            assert c.logprobs == pytest.approx(g[0].logprobs, abs=1e-5)


def test_context_cap(model, tok):
    prompts = _prompts(tok)
    longest = max(len(p) for p in prompts)
    limit = longest + 3
    sampler = HFSampler(_no_eos(model, tok), tok, max_context=limit)
    out = sampler.generate(prompts, SamplingParams(max_new_tokens=10, n=2), seed=0)
    for p, comps in zip(prompts, out):
        for c in comps:
            assert len(c.token_ids) == min(10, limit - len(p))
            assert c.finish_reason == "length"
    full = HFSampler(model, tok, max_context=len(prompts[0])).generate([prompts[0]], SamplingParams(max_new_tokens=5))
    assert full[0][0] == Completion([], [], "length", "")
    too_long = [tok.bos_token_id] * (limit + 1)
    with pytest.raises(ValueError, match=rf"{limit + 1} tokens.*max_context={limit}"):
        sampler.generate([prompts[0], too_long], SamplingParams(max_new_tokens=5))


def test_model_mode_and_generation_config_untouched(model, tok):
    m = _no_eos(model, tok)
    m.train()
    m.generation_config.top_k = 1  # would make sampling greedy if it leaked into generate
    gc = m.generation_config
    sampler = HFSampler(m, tok)
    out = sampler.generate([_prompts(tok)[0]], SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=10, n=6), seed=0)
    assert len({tuple(c.token_ids) for c in out[0]}) > 1
    assert m.training and m.generation_config is gc


def test_update_weights(model, tok):
    a, b = _tiny_llama(tok, seed=1), _tiny_llama(tok, seed=2)
    sampler = HFSampler(a, tok)
    sampler.update_weights(a)  # same object: no-op
    sampler.update_weights(b)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)


# ------------------------------------------------------------------------------------------
# policy


def test_batch_sequences_hand_checked():
    b = batch_sequences([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b["response_mask"].tolist() == [[False, False, False, True, True], [False, True, True, True, False]]
    assert b["response_lengths"].tolist() == [2, 3]
    assert b["prompt_lengths"].tolist() == [3, 1]
    with pytest.raises(ValueError, match="2 responses for 1 prompts"):
        batch_sequences([[1]], [[2], [3]], 0)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        batch_sequences([[]], [[2]], 0)


def test_token_logprobs_against_manual_forward(model, tok):
    seqs = [[1, 5, 9, 13, 20, 7], [1, 40, 41]]
    b = batch_sequences([s[:2] for s in seqs], [s[2:] for s in seqs], tok.pad_token_id)
    lp = token_logprobs(model, b["input_ids"], b["attention_mask"], temperature=0.6)
    assert lp.shape == (2, 6) and lp.dtype == torch.float32
    with torch.no_grad():
        for i, s in enumerate(seqs):
            logits = model(torch.tensor([s])).logits[0]  # (len, V), alone, no padding
            manual = [0.0] + [torch.log_softmax(logits[t - 1] / 0.6, -1)[s[t]].item() for t in range(1, len(s))]
            torch.testing.assert_close(lp[i, : len(s)].detach(), torch.tensor(manual), atol=1e-5, rtol=0)
            assert (lp[i, len(s) :] == 0).all()
    # chunking, greedy convention, masking, gradients
    torch.testing.assert_close(token_logprobs(model, b["input_ids"], b["attention_mask"], 0.6, chunk_size=1), lp)
    torch.testing.assert_close(
        token_logprobs(model, b["input_ids"], b["attention_mask"], 0.0),
        token_logprobs(model, b["input_ids"], b["attention_mask"], 1.0),
    )
    r = response_logprobs(model, b, 0.6)
    assert torch.equal(r, torch.where(b["response_mask"], lp, torch.zeros_like(lp)))
    r.sum().backward()
    assert model.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_token_logprobs_left_padding_matches_right_padding(model, tok):
    ids = torch.tensor([[0, 0, 1, 5, 9], [1, 40, 41, 42, 43]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        left = token_logprobs(model, ids, mask, 0.6)
        right = token_logprobs(model, torch.tensor([[1, 5, 9]]), torch.ones(1, 3, dtype=torch.long), 0.6)
    torch.testing.assert_close(left[0, 2:], right[0], atol=1e-5, rtol=0)
    assert (left[0, :3] == 0).all()


def test_clone_reference(model):
    ref = clone_reference(model)
    assert not ref.training and all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert ref.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()
    torch.testing.assert_close(ref.lm_head.weight, model.lm_head.weight)


def test_load_policy_roundtrip(model, tok, tmp_path):
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m, t = load_policy(str(tmp_path), dtype="float32")
    assert t.padding_side == "left" and t.eos_token_id == tok.eos_token_id and t.pad_token_id == tok.pad_token_id
    assert not m.training
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, model(ids).logits)


def test_load_policy_missing_path(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_policy(missing)
    with pytest.raises(FileNotFoundError, match="not_here"):
        load_policy("./not_here")


def test_load_policy_tokenizer_without_pad_or_eos(model, tmp_path, caplog):
    no_pad = tmp_path / "no_pad"
    model.save_pretrained(no_pad)
    _train_tokenizer(bos_token="<s>", eos_token="</s>").save_pretrained(no_pad)
    with caplog.at_level(logging.WARNING, logger="algos.models.policy"):
        _, t = load_policy(str(no_pad))
    assert t.pad_token_id == t.eos_token_id and "no PAD" in caplog.text
    no_eos = tmp_path / "no_eos"
    model.save_pretrained(no_eos)
    _train_tokenizer(bos_token="<s>").save_pretrained(no_eos)
    with pytest.raises(ValueError, match="no EOS"):
        load_policy(str(no_eos))
