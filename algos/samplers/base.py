"""Samplers: turn prompts (token ids) into completions with per-token log-probs.

`Sampler` is the protocol every algorithm collects experience through, with the rules its
implementations share (argument checks, prompt caps, stop-string cuts, finishing a completion):
`algos.samplers.hf.HFSampler` (transformers ``generate``), `algos.samplers.prefix_sharing`
(one KV cache per distinct prefix) and `algos.samplers.vllm` (a vLLM engine for GPU boxes).

Log-prob convention (VinePPO, McGill-NLP/VinePPO `trainers/ppo_trainer.py` `_forward_pass_actor`):
the log-prob returned for each sampled token is ``log_softmax(logits / temperature)`` at that token,
i.e. under the tempered distribution **without** top-p renormalisation. That is exactly what the
training-time forward pass (`algos.models.policy.token_logprobs` at the sampling temperature) computes,
so the importance ratio is 1 at the start of every iteration. For greedy decoding
(``temperature == 0``) the plain ``log_softmax(logits)`` is returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

__all__ = ["SamplingParams", "Completion", "Sampler", "check_sampler_args", "copy_weights", "prompt_caps",
           "stop_string_end", "finish_completion"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions.

    Attributes:
        temperature: softmax temperature; ``0`` means greedy (argmax) decoding. Defaults to
            VinePPO's 0.6.
        top_p: nucleus mass in (0, 1]; ignored for greedy decoding. Defaults to VinePPO's 0.9.
        max_new_tokens: most tokens generated per completion (tokens). VinePPO: 1024.
        stop_strings: generation stops once the decoded *generated* text contains any of these
            (the prompt is never searched). VinePPO uses ``("\\n\\n\\nProblem:",)``.
        n: completions sampled per prompt.

    Raises:
        ValueError / TypeError: on an out-of-range or mistyped field, naming it.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 1024
    stop_strings: tuple[str, ...] = ()
    n: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(f"temperature: expected a float, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: expected a finite value >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise TypeError(f"top_p: expected a float, got {self.top_p!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p: expected a value in (0, 1], got {self.top_p}")
        for name in ("max_new_tokens", "n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value}")
        stops = self.stop_strings
        if isinstance(stops, str):
            raise TypeError(f"stop_strings: expected a tuple of strings, got the single string {stops!r}")
        stops = tuple(stops)  # accept any sequence (e.g. a list from a config file)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop_strings: expected non-empty strings, got {s!r}")
        object.__setattr__(self, "stop_strings", stops)


@dataclass
class Completion:
    """One sampled completion.

    Attributes:
        token_ids: generated tokens. Includes EOS if the model emitted it; on a stop-string hit
            it ends right after the token that completes the stop string (the environment then
            cuts the episode before the stop string and appends EOS:
            `langenv.env.LanguageEnv.step_states`); never padding.
        logprobs: one per token of ``token_ids`` (nats): log-prob under
            ``softmax(logits / temperature)`` without top-p renormalisation; plain
            ``log_softmax(logits)`` for greedy decoding.
        finish_reason: ``"stop"`` (EOS or a stop string) or ``"length"`` (max_new_tokens or the
            context cap reached).
        text: ``token_ids`` decoded without special tokens, cut *before* the stop string if one
            was hit.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str


# --------------------------------------------------------------------------------------------
# Rules every in-process sampler shares (`HFSampler`, `algos.samplers.prefix_sharing.PrefixSharingSampler`)


def check_sampler_args(model, tokenizer, max_batch_size, max_context, sampler: str) -> int | None:
    """Validate the common constructor arguments; returns the context limit to use (``max_context``,
    else the model's ``config.max_position_embeddings``, else None).

    Raises:
        ValueError: naming the bad argument, or a tokenizer without EOS.
    """
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size: expected an int >= 1, got {max_batch_size!r}")
    if max_context is None:
        max_context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    bad_context = isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1
    if max_context is not None and bad_context:
        raise ValueError(f"max_context: expected an int >= 1 or None, got {max_context!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer has no EOS token (eos_token_id is None); {sampler} needs one to stop sequences")
    return max_context


def copy_weights(target, source) -> None:
    """Load ``source``'s weights into ``target`` (a sampler's own model); a no-op when they are the
    same object, as when the sampler shares the policy.

    An FSDP2-sharded ``source`` (``--sharding fsdp``, where the sampler keeps its own unsharded copy)
    is gathered one parameter at a time into ``target`` (`algos.models.sharding.copy_full_weights`,
    a collective: every rank updates its sampler at the same point), so no second full copy is made."""
    if source is target:
        return
    from algos.models.sharding import copy_full_weights, is_sharded

    if is_sharded(source):
        copy_full_weights(target, source)
    else:
        target.load_state_dict(source.state_dict())


def prompt_caps(prompts: Sequence[Sequence[int]], max_new_tokens: int,
                max_context: int | None, budgets: Sequence[int] | None = None) -> tuple[list[list[int]], list[int]]:
    """The prompts as int lists, and each one's generation cap (tokens): ``max_new_tokens``, or the
    prompt's own budget ``budgets[i]`` when smaller, cut so that prompt + completion fits
    ``max_context`` (0 when the prompt fills it exactly, or its budget is 0).

    Raises:
        ValueError: an empty prompt, or one longer than ``max_context`` (naming its index, its
            length and the limit); ``budgets`` of the wrong length or with a value that is not an
            int >= 0.
    """
    prompts = [[int(t) for t in p] for p in prompts]
    if budgets is not None:
        budgets = list(budgets)
        if len(budgets) != len(prompts):
            raise ValueError(f"budgets: expected one per prompt ({len(prompts)}), got {len(budgets)}")
        for i, b in enumerate(budgets):
            if isinstance(b, bool) or not isinstance(b, int) or b < 0:
                raise ValueError(f"budgets[{i}]: expected an int >= 0 (tokens), got {b!r}")
    caps = []
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; expected at least one token (e.g. BOS)")
        cap = max_new_tokens if budgets is None else min(max_new_tokens, budgets[i])
        if max_context is not None:
            if len(p) > max_context:
                raise ValueError(f"prompt {i} has {len(p)} tokens, more than the context limit "
                                 f"max_context={max_context}")
            cap = min(cap, max_context - len(p))
        caps.append(cap)
    return prompts, caps


def stop_string_end(tokenizer, tokens: list[int], stop_strings: tuple[str, ...]) -> int | None:
    """Smallest k such that the decoded ``tokens[:k]`` contains a stop string, or None.

    Binary search: decoding is prefix-monotone for the tokenizers we use (a string present in
    the text of ``tokens[:k]`` is present in that of ``tokens[:k+1]``).
    """
    if not stop_strings:
        return None

    def hit(k: int) -> bool:
        text = tokenizer.decode(tokens[:k], skip_special_tokens=True)
        return any(s in text for s in stop_strings)

    if not hit(len(tokens)):
        return None
    lo, hi = 1, len(tokens)  # hit(hi) is True
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def finish_completion(tokenizer, eos_id: int, tokens: list[int], logprobs: list[float],
                      stop_strings: tuple[str, ...], window_hit: int | None) -> Completion:
    """Cut one generated row (padding included) at EOS or the stop string, and decode it.

    ``window_hit`` is the generated-token count at which a sampler's windowed stop check stopped
    the row, if it did. A row that ran its whole loop without either reached its cap ("length").
    """
    end, reason = len(tokens), "length"
    if eos_id in tokens:
        end, reason = tokens.index(eos_id) + 1, "stop"
    stop_at = stop_string_end(tokenizer, tokens[:end], stop_strings)
    if stop_at is not None:
        end, reason = stop_at, "stop"
    elif window_hit is not None and window_hit <= end:
        # The windowed check saw a stop string that the full decode does not contain (only for
        # exotic tokenizers, e.g. a stop string holding U+FFFD): the row did stop there.
        end, reason = window_hit, "stop"
    tokens = tokens[:end]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if stop_at is not None:
        text = text[: min(text.find(s) for s in stop_strings if s in text)]
    return Completion(tokens, logprobs[:end], reason, text)


@runtime_checkable
class Sampler(Protocol):
    """What every algorithm samples through."""

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seed: int | None = None,
        budgets: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """Sample ``params.n`` completions for each prompt.

        Args:
            prompts: token-id lists, already containing BOS if the model wants one.
            params: sampling settings.
            seed: same seed, same prompts and same weights give identical completions.
            budgets: optional, one per prompt: the most new tokens for that prompt (tokens, >= 0),
                below ``params.max_new_tokens`` (the smaller of the two applies), e.g. the room a
                partial response leaves (`algos.rollout.continue_states`). Optional in the protocol:
                `continue_states` checks whether a sampler's ``generate`` takes it.

        Returns:
            ``result[i]`` is the list of ``params.n`` completions of ``prompts[i]``.
        """
        ...

    def update_weights(self, model) -> None:
        """Push new policy weights (a no-op for samplers that share the model object)."""
        ...
