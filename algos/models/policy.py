"""The policy: loading a causal LM + tokenizer, token log-probs, batching, the frozen reference.

Temperature convention (McGill-NLP/VinePPO, `trainers/ppo_trainer.py` `_forward_pass_actor`):
every training-time forward pass divides the logits by the *sampling* temperature before
`log_softmax`, for the actor, ``π_old`` and ``π_ref`` alike. The optimised policy is therefore the
tempered one, and the log-probs here match those the sampler returns (`algos.samplers.base`), so the
PPO ratio is 1 at the start of an iteration. Top-p is not part of the distribution.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from typing import Sequence

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["load_policy", "check_model_source", "check_tokenizer", "batch_sequences", "token_logprobs",
           "response_logprobs", "shared_prompt_logprobs", "prompt_groups", "clone_reference"]

logger = logging.getLogger(__name__)


def _looks_like_local_path(name: str) -> bool:
    """True for names that must be a local path rather than a hub id.

    Absolute, ``./``/``../`` and ``~`` paths, anything that exists, and anything whose first path
    component exists (``runs/sft/final`` when ``runs/`` is here).
    """
    if name.startswith(("/", ".", "~")) or os.path.exists(name):
        return True
    first = name.replace("\\", "/").split("/", 1)[0]
    return "/" in name.replace("\\", "/") and os.path.exists(first)


def check_model_source(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """Resolve a model name to ``(name, local_only)`` without loading anything.

    A name that looks like a local path (absolute, ``./``/``../``, ``~``, or whose first component
    exists, see `_looks_like_local_path`) must be a directory written by ``save_pretrained``:
    ``(expanded path, True)``. Anything else is taken as a hub id: ``(name, False)``.

    Raises:
        FileNotFoundError: a local path that is not a directory, or a directory without a
            ``config.json`` (not a saved model); the message names the path. No hub lookup is tried.
    """
    name = str(name_or_path)
    if not _looks_like_local_path(name):
        return name, False
    path = os.path.expanduser(name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {name!r} (resolved to {os.path.abspath(path)!r})")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"model directory {name!r} has no config.json: expected a directory written by save_pretrained "
            "(model weights, config.json and the tokenizer files)"
        )
    return path, True


def check_tokenizer(tokenizer, source: str, model=None) -> None:
    """Check that a tokenizer can drive generation and training; give it a PAD token if it lacks one.

    Args:
        tokenizer: a Hugging Face tokenizer (modified in place: PAD := EOS when PAD is missing).
        source: where it came from, for messages (a path or hub id).
        model: optionally the causal LM it will feed: every token id must have an embedding row.

    Raises:
        ValueError: no EOS token (generation could never stop and episodes never terminate); or the
            tokenizer has more tokens than the model's input embeddings (ids past the table would
            index out of range). The message names ``source``.

    A tokenizer without PAD gets EOS as PAD (a warning is logged): masks, never the PAD id, mark
    padding everywhere in this package.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer of {source!r} has no EOS token (eos_token is None); generation could never stop. "
            "Set tokenizer.eos_token and save it again"
        )
    if tokenizer.pad_token_id is None:
        logger.warning("tokenizer of %r has no PAD token; using EOS (%r) as PAD", source, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None and hasattr(model, "get_input_embeddings") and model.get_input_embeddings() is not None:
        rows = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            raise ValueError(
                f"tokenizer of {source!r} has {len(tokenizer)} tokens but the model's input embeddings have only "
                f"{rows} rows; expected len(tokenizer) <= {rows} (a tokenizer saved with another model?)"
            )


def load_policy(
    name_or_path: str, dtype: torch.dtype | str = "auto", device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory or a hub id.

    Args:
        name_or_path: a directory written by ``save_pretrained`` or a hub id (``org/name``).
        dtype: ``"auto"`` (the checkpoint's dtype), a `torch.dtype`, or its name (``"bfloat16"``).
        device: where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``; the tokenizer with
        ``padding_side="left"`` (for generation) and a PAD token.

    Raises:
        FileNotFoundError: ``name_or_path`` looks like a local path (starts with ``/``, ``.``,
            ``~``, or its first component exists) but is not a directory holding a ``config.json``
            (`check_model_source`). No hub lookup is tried.
        ValueError: the tokenizer has no EOS token or more tokens than the model has embeddings
            (`check_tokenizer`), or ``dtype`` is not a torch dtype name.

    A tokenizer without PAD gets EOS as PAD (a warning is logged); masks, never the PAD id, mark
    padding everywhere in this package.
    """
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype: expected 'auto', a torch.dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
        dtype = resolved
    name, local_only = check_model_source(name_or_path)

    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    check_tokenizer(tokenizer, str(name_or_path))
    tokenizer.padding_side = "left"

    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_only)
    check_tokenizer(tokenizer, str(name_or_path), model)
    model.to(device)
    model.eval()
    return model, tokenizer


def batch_sequences(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int
) -> dict[str, Tensor]:
    """Right-pad prompt+response concatenations into one batch.

    Args:
        prompt_ids: B prompts (token ids, each non-empty).
        response_ids: B responses (token ids, may be empty).
        pad_id: id written at padding positions (never read: use the masks).

    Returns:
        A dict of CPU tensors, with ``L = max_i (len(prompt_i) + len(response_i))``:
        ``input_ids`` (B, L) long; ``attention_mask`` (B, L) long, 1 on real tokens;
        ``response_mask`` (B, L) bool, True on response tokens; ``prompt_lengths`` (B,) long and
        ``response_lengths`` (B,) long, in tokens.

    Raises:
        ValueError: different numbers of prompts and responses, or an empty prompt.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(
            f"expected as many responses as prompts, got {len(response_ids)} responses for {len(prompt_ids)} prompts"
        )
    if len(prompt_ids) == 0:
        raise ValueError("expected at least one sequence, got an empty batch")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; expected at least one token")
    prompt_lengths = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    response_lengths = torch.tensor([len(r) for r in response_ids], dtype=torch.long)
    width = int((prompt_lengths + response_lengths).max())
    batch = len(prompt_ids)
    input_ids = torch.full((batch, width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    response_mask = torch.zeros((batch, width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        n_p, n_r = len(p), len(r)
        input_ids[i, : n_p + n_r] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention_mask[i, : n_p + n_r] = 1
        response_mask[i, n_p : n_p + n_r] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "prompt_lengths": prompt_lengths,
        "response_lengths": response_lengths,
    }


def token_logprobs(
    model, input_ids: Tensor, attention_mask: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> Tensor:
    """Per-token log-probs ``log π(x_t | x_<t)`` under ``softmax(logits / temperature)``.

    Args:
        model: a causal LM returning ``.logits`` of shape (B, L, V).
        input_ids: (B, L) long; left or right padded (positions come from the mask).
        attention_mask: (B, L), 1 on real tokens, 0 on padding.
        temperature: the sampling temperature (VinePPO: 0.6); ``0`` (greedy) means plain
            ``log_softmax(logits)``, as the sampler reports for greedy decoding.
        chunk_size: rows per forward pass; ``None`` runs the whole batch at once. Peak memory is
            one chunk's (chunk, L, V) logits plus their float32 log-softmax.

    Returns:
        (B, L) float32, in nats, differentiable w.r.t. the model's parameters (unless called under
        `torch.no_grad`). Position 0 and padding positions are 0.

    Raises:
        ValueError: negative or non-finite temperature, mismatched shapes, chunk_size < 1.

    Source: McGill-NLP/VinePPO `trainers/ppo_trainer.py` `_forward_pass_actor` (logits divided by
    the sampling temperature, then log_softmax and gather).
    """
    if not (temperature >= 0 and temperature != float("inf")):
        raise ValueError(f"temperature: expected a finite value >= 0, got {temperature}")
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            "expected input_ids and attention_mask of the same shape (B, L), "
            f"got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1 or None, got {chunk_size}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    scale = temperature if temperature > 0 else 1.0
    step = input_ids.shape[0] if chunk_size is None else chunk_size
    parts = []
    for start in range(0, input_ids.shape[0], step):
        ids = input_ids[start : start + step]
        mask = attention_mask[start : start + step]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float() / scale, dim=-1)
        del logits
        picked = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (b, L-1)
        del logp
        # position t is predicted from t-1: it needs a real token at both t and t-1
        valid = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
        picked = torch.where(valid, picked, torch.zeros_like(picked))
        parts.append(torch.cat([picked.new_zeros(ids.shape[0], 1), picked], dim=1))
    return torch.cat(parts, dim=0)


def response_logprobs(model, batch: dict, temperature: float, chunk_size: int | None = None,
                      share_prompt: bool = False, width_multiple: int = 1) -> Tensor:
    """Token log-probs masked to response positions.

    Args:
        model: a causal LM.
        batch: the output of `batch_sequences` (``input_ids``, ``attention_mask``,
            ``response_mask``), or rows of it trimmed to a common width.
        temperature: the sampling temperature (see `token_logprobs`).
        chunk_size: rows per forward pass (see `token_logprobs`); not with ``share_prompt``.
        share_prompt: when some rows share a prompt, run each distinct prompt once
            (`shared_prompt_logprobs`); a batch whose prompts are all distinct, or whose responses are
            all empty, takes the plain path (one forward pass over every row's prompt + response).
        width_multiple: with ``share_prompt``, the prompt and response widths are rounded up to a
            multiple of this many tokens (see `algos.actor.AUTOCAST_WIDTH_MULTIPLE`).

    Returns:
        (B, L) float32 in nats; 0 outside ``response_mask``. Both paths give the same values up to
        float rounding (``tests/test_shared_prompt_update.py``: within 1e-5 in float32).
    """
    if share_prompt and chunk_size is None and _worth_sharing(batch):
        return shared_prompt_logprobs(model, batch, temperature, width_multiple)
    logp = token_logprobs(model, batch["input_ids"], batch["attention_mask"], temperature, chunk_size=chunk_size)
    return logp * batch["response_mask"].to(logp.device)


def prompt_groups(batch: dict) -> list[int]:
    """The prompt group of every row of a right-padded `batch_sequences` batch: rows whose prompt token
    ids are identical get the same group, numbered 0, 1, ... in order of first appearance.

    A row's prompt is its first ``attention_mask.sum() - response_mask.sum()`` tokens, so this works
    on any row selection of a `batch_sequences` batch (its 1-D length fields need not come along).

    Returns:
        B group indices (a list of int).
    """
    n_prompt = (batch["attention_mask"].sum(1) - batch["response_mask"].sum(1)).tolist()
    ids = batch["input_ids"].cpu()
    seen: dict[tuple[int, ...], int] = {}
    return [seen.setdefault(tuple(ids[b, :n].tolist()), len(seen)) for b, n in enumerate(n_prompt)]


def _worth_sharing(batch: dict) -> bool:
    """Some prompt repeats within the batch and some response is non-empty."""
    groups = prompt_groups(batch)
    return len(set(groups)) < len(groups) and bool(batch["response_mask"].any())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def shared_prompt_logprobs(model, batch: dict, temperature: float, width_multiple: int = 1) -> Tensor:
    """`response_logprobs` with each distinct prompt of the batch run once and its KV cache shared by
    the rows that have it (GRPO / RLOO / VinePPO groups: G responses to one prompt).

    The plain path runs B rows of prompt + response, ``B · (P + R)`` positions; here the U distinct
    prompts run once, ``U · P``, and the responses attend to their prompt's keys and values, ``B · R``
    positions. Every row's log-probs are those of the plain path (same positions, same attended
    tokens), and under autograd the gradient too: the prompt's keys and values are expanded to the
    rows by an index on the batch dimension, whose backward sums the rows' gradients into the one
    prompt (the gradient of ``B`` identical copies). This is shared-prefix (cascade) attention
    applied to training, as in the samplers' one prefill per distinct prompt
    (`algos.samplers.prefix_sharing`).

    Steps, with ``n_p[b]`` / ``n_r[b]`` the prompt / response length of row b, P and R the largest
    of each (rounded up to ``width_multiple``) and ``index`` (B,) the distinct prompt of each row:

    1. the U distinct prompts, right-padded to (U, P), in one forward pass with a fresh
       `transformers.DynamicCache` (``use_cache=True``); logits only at each prompt's last position
       (U, V), which predict the first response token;
    2. every cache layer's keys / values (U, heads, P, d) become (B, heads, P, d) through
       `DynamicCache.batch_select_indices` (``keys[index]``, differentiable);
    3. the right-padded responses (B, R) in a second forward pass with that cache, position ids
       ``n_p[b] + t`` and the attention mask ``[prompt mask of index[b] (P) | response mask (R)]``
       (the prompt's padding is a masked hole between prompt and response); logits (B, R, V);
    4. ``log_softmax(logits / T)`` at the response tokens: token 0 from step 1's logits, token t ≥ 1
       from step 3's position t − 1; scattered back to the batch's (B, L) layout.

    The cache goes in under the keyword the model's forward declares (`cache_keyword`: ``cache`` from
    transformers 5.24, ``past_key_values`` before), so no FutureWarning is raised.

    Args:
        model: a causal LM whose forward takes a KV cache, position ids and ``logits_to_keep``.
        batch: a right-padded `batch_sequences` batch (or rows of one), (B, L) each; at least one
            non-empty response. Rows with an empty response, or a prompt of their own, are fine.
        temperature: the sampling temperature (see `token_logprobs`).
        width_multiple: P and R are rounded up to a multiple of this (bf16 autocast shape reuse).

    Returns:
        (B, L) float32 in nats, 0 outside ``response_mask``; differentiable unless under no_grad.
    """
    from transformers import DynamicCache

    from algos.samplers.prefix_sharing import cache_keyword

    if not (temperature >= 0 and temperature != float("inf")):
        raise ValueError(f"temperature: expected a finite value >= 0, got {temperature}")
    device = next(model.parameters()).device
    ids, mask, resp = (batch[k].to(device) for k in ("input_ids", "attention_mask", "response_mask"))
    rows, width = ids.shape
    n_r = resp.sum(1)
    n_p = mask.sum(1) - n_r
    groups = prompt_groups(batch)
    heads = list(dict.fromkeys(groups))  # group ids are 0..U-1 in order of first appearance
    first_row = [groups.index(g) for g in heads]
    index = torch.tensor(groups, dtype=torch.long, device=device)
    n_p_unique = n_p[first_row]
    p_width = _round_up(int(n_p_unique.max()), width_multiple)
    r_width = _round_up(max(int(n_r.max()), 1), width_multiple)

    # 1. distinct prompts, right-padded (U, P)
    cols = torch.arange(p_width, device=device)
    p_valid = cols[None] < n_p_unique[:, None]
    p_ids = torch.where(p_valid, ids[first_row].gather(1, cols.clamp(max=width - 1).expand(len(heads), -1)), 0)
    p_mask = p_valid.long()
    p_pos = torch.minimum(cols[None], (n_p_unique[:, None] - 1))
    last = (n_p_unique - 1)
    keep = torch.unique(last)  # positions whose logits are needed (one per distinct prompt length)
    cache = DynamicCache(config=model.config)
    kwargs = {cache_keyword(model): cache}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = keep
    else:  # logits at every prompt position; keep the needed ones
        keep = torch.arange(p_width, device=device)
    logits = model(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True, **kwargs).logits
    first_logits = logits[torch.arange(len(heads), device=device), torch.searchsorted(keep, last)]  # (U, V)
    del logits
    kwargs.pop("logits_to_keep", None)

    # 2. share each prompt's keys / values with its rows
    if len(heads) < rows or bool((index != torch.arange(rows, device=device)).any()):
        cache.batch_select_indices(index)

    # 3. responses, right-padded (B, R), after their prompt's cache
    t = torch.arange(r_width, device=device)
    r_valid = t[None] < n_r[:, None]
    r_ids = torch.where(r_valid, ids.gather(1, (n_p[:, None] + t[None]).clamp(max=width - 1)), 0)
    r_pos = n_p[:, None] + torch.minimum(t[None], (n_r[:, None] - 1).clamp(min=0))
    r_mask = torch.cat([p_mask[index], r_valid.long()], dim=1)
    logits = model(input_ids=r_ids, attention_mask=r_mask, position_ids=r_pos, use_cache=True, **kwargs).logits

    # 4. log-probs of the response tokens; token 0 is predicted by the prompt's last position
    scale = temperature if temperature > 0 else 1.0
    predictors = torch.cat([first_logits[index].unsqueeze(1), logits[:, :-1]], dim=1)  # (B, R, V)
    del logits
    logp = torch.log_softmax(predictors.float() / scale, dim=-1)
    del predictors
    picked = logp.gather(-1, r_ids.unsqueeze(-1)).squeeze(-1)  # (B, R)
    del logp
    b_idx, t_idx = r_valid.nonzero(as_tuple=True)
    result = picked.new_zeros(rows, width)
    return result.index_put((b_idx, n_p[b_idx] + t_idx), picked[b_idx, t_idx])


def clone_reference(model) -> PreTrainedModel:
    """A frozen deep copy of ``model`` (eval mode, ``requires_grad=False``), e.g. ``π_ref``."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref
