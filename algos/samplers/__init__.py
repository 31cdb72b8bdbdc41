"""Samplers: prompts (token ids) in, completions with per-token log-probs out.

`Sampler` (the protocol), `SamplingParams` and `Completion` are in `algos.samplers.base`; the
implementations are `HFSampler` (transformers ``generate``), `PrefixSharingSampler` (each distinct
prefix prefilled once and its KV cache shared by its continuations; the default) and the vLLM engine
(`algos.samplers.vllm`, imported only when asked for). `make_sampler` builds the one a run names.
"""

from __future__ import annotations

from pathlib import Path

from algos.samplers.base import Completion, Sampler, SamplingParams
from algos.samplers.hf import HFSampler

__all__ = ["Completion", "Sampler", "SamplingParams", "HFSampler", "make_sampler", "SAMPLERS"]

#: The ``--sampler`` choices.
SAMPLERS = ("fast", "hf", "vllm")


def make_sampler(kind: str, policy, tokenizer, *, max_batch_size: int, max_context: int | None,
                 workdir: Path) -> Sampler:
    """The sampler of a run: ``fast`` (`PrefixSharingSampler`), ``hf`` (`HFSampler`) or ``vllm``
    (`algos.samplers.vllm.make_vllm_sampler`, which keeps its engine files under ``workdir``).

    Raises:
        ValueError: ``kind`` is not one of `SAMPLERS`.
    """
    if kind == "vllm":
        from algos.samplers.vllm import make_vllm_sampler

        return make_vllm_sampler(policy, tokenizer, max_context, workdir)
    if kind == "fast":
        from algos.samplers.prefix_sharing import PrefixSharingSampler

        return PrefixSharingSampler(policy, tokenizer, max_batch_size=max_batch_size, max_context=max_context)
    if kind == "hf":
        return HFSampler(policy, tokenizer, max_batch_size=max_batch_size, max_context=max_context)
    raise ValueError(f"sampler: expected one of {SAMPLERS}, got {kind!r}")
