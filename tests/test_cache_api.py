"""The samplers use the KV-cache API of the installed transformers without deprecation warnings.

transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache``; the old name warns
(``FutureWarning``, removal announced for 5.40) on every forward pass. These tests turn every
``FutureWarning`` raised while sampling into an error, so the next deprecation on the sampling path
fails CI instead of printing a warning per iteration until the release that removes the old API.
Models and tokenizers are built from configs (no hub), as in tests/test_sampling.py.
"""

from __future__ import annotations

import inspect
import logging
import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from test_sampling import _prompts, _tiny_llama, _train_tokenizer

from algos.models.policy import batch_sequences, response_logprobs
from algos.samplers.base import SamplingParams
from algos.samplers.hf import HFSampler
from algos.samplers.prefix_sharing import PrefixSharingSampler, cache_keyword

RENAMED_IN = Version("5.24.0")  # first transformers whose LlamaForCausalLM.forward takes `cache`


@pytest.fixture(scope="module")
def tok():
    return _train_tokenizer(bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model(tok):
    return _tiny_llama(tok)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _strict(fn):
    """Run ``fn()`` with every FutureWarning raised as an error; also collect transformers' own
    deprecation log lines (its `logger.warning_once`, e.g. for reading ``output.past_key_values``;
    emitted once per process, so this only catches what nothing earlier in the process triggered)."""
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            out = fn()
    finally:
        logger.removeHandler(handler)
    deprecated = [m for m in handler.messages if "deprecat" in m.lower()]
    assert not deprecated, deprecated
    return out


@pytest.mark.parametrize("prealloc_tokens", [0, 256])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_prefix_sharing_sampler_raises_no_future_warning(model, tok, prealloc_tokens, temperature):
    p = _prompts(tok)
    prompts = [p[0], p[1], p[0], p[2]]  # a repeated prompt: one prefill expanded to its rows
    params = SamplingParams(temperature=temperature, top_p=0.9 if temperature else 1.0, max_new_tokens=10, n=3,
                            stop_strings=("\n",))
    sampler = PrefixSharingSampler(model, tok, max_batch_size=5, prealloc_tokens=prealloc_tokens)
    out = _strict(lambda: sampler.generate(prompts, params, seed=0))
    assert [len(r) for r in out] == [3] * len(prompts)
    assert sampler.stats.unique_prompts == 3 and sampler.stats.decode_calls > 0


def test_hf_sampler_and_logprobs_raise_no_future_warning(model, tok):
    prompts = _prompts(tok)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=2)
    out = _strict(lambda: HFSampler(model, tok).generate(prompts, params, seed=0))
    pairs = [(prompts[i], c.token_ids) for i, row in enumerate(out) for c in row]
    batch = batch_sequences([p for p, _ in pairs], [r for _, r in pairs], pad_id=tok.pad_token_id)
    logp = _strict(lambda: response_logprobs(model, batch, temperature=1.0))
    assert logp.shape == batch["input_ids"].shape


def test_cache_goes_in_under_the_current_keyword(model, tok):
    """On transformers >= 5.24 the sampler passes ``cache=`` and never ``past_key_values=``."""
    seen: list[set[str]] = []
    handle = model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    try:
        PrefixSharingSampler(model, tok).generate(_prompts(tok), SamplingParams(temperature=0.0, max_new_tokens=6))
    finally:
        handle.remove()
    expected = "cache" if Version(transformers.__version__) >= RENAMED_IN else "past_key_values"
    assert cache_keyword(model) == expected
    assert seen and all(expected in kw for kw in seen)
    if expected == "cache":
        assert not any("past_key_values" in kw for kw in seen)


def test_cache_keyword_follows_the_forward_signature():
    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            pass

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
            pass

    class Wrapper(torch.nn.Module):  # declares neither name: the installed transformers decides
        def forward(self, *args, **kwargs):
            pass

    assert cache_keyword(Old()) == "past_key_values"
    assert cache_keyword(New()) == "cache"
    installed = "cache" if Version(transformers.__version__) >= RENAMED_IN else "past_key_values"
    assert cache_keyword(Wrapper()) == installed
    assert "kwargs" in inspect.signature(Wrapper().forward).parameters
