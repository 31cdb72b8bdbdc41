"""The KV caches of the decode loop of `algos.samplers.prefix_sharing`, in two layouts.

**Expanded** (`expand_cache`): every row holds its own copy of its prompt's prefill keys/values,
written with the row's new tokens into a preallocated buffer (`_PreallocatedLayer`); any model.

**Shared prefix** (`cascade_cache`, `cascade_attention`), for models that qualify:

Monte-Carlo rollouts continue each prefix K times. Without sharing, each of the K rows of a prefix
holds its own copy of the prefix's keys and values, so a decode step reads the prefix K times (and
building the copies costs a cache copy per chunk and per dropped row). Here the KV cache of a
chunk keeps **one** copy of every prompt's prefill keys/values, (U, heads_kv, W, d), next to each
row's own generated suffix, (B, heads_kv, S, d). Attention for a decode step is computed in two
parts over one softmax (shared-prefix "cascade" attention: Ye et al. 2024, FlashInfer blog "Cascade
Inference: Memory Bandwidth Efficient Shared Prefix Batch Decoding"; vLLM's ``cascade_attention``):

- prefix part: the query rows of one prompt, laid out as a (U, heads_kv, R·g, d) grid (R: most rows
  of a prompt, g: query heads per KV head), against that prompt's keys in **one** batched matrix
  product, (U, heads_kv, R·g, d) @ (U, heads_kv, d, W); left padding masked out;
- suffix part: each row against its own generated keys, (B, heads_kv, g, d) @ (B, heads_kv, d, S);

then softmax over the W + S scores of every row and the two weighted sums of values, added. This is
exactly ``softmax(q·[K_prefix; K_suffix]ᵀ·scale)·[V_prefix; V_suffix]`` for a single query token,
which is what the expanded-cache path computes (checked against it in the tests).

Use: `supports_cascade` says whether a model and its prefill cache qualify (plain full-attention
layers of a model whose attention goes through transformers' `AttentionInterface`, a model type
listed in `CASCADE_MODEL_TYPES`); `cascade_cache` builds the chunk's cache; `cascade_decoding` is the
context manager that routes the model's attention to `cascade_attention` for the decode steps and
restores its implementation afterwards. Inside it the model must be called with
``attention_mask=None`` (padding lives in the cache) and explicit ``position_ids``.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["CASCADE_ATTENTION", "CASCADE_MODEL_TYPES", "cascade_attention", "cascade_cache", "cascade_decoding",
           "expand_cache", "shared_prefix_attention", "supports_cascade", "supports_cascade_model"]

CASCADE_ATTENTION = "langenv_cascade"
#: Model types whose attention is plain scaled dot-product attention over the cache (no soft-capping,
#: attention sinks or sliding windows inside a full-attention layer) and whose rotary positions are
#: applied before the cache: the cascade decomposition is exact for them.
CASCADE_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})

_ACTIVE: contextvars.ContextVar["_CascadeCache | None"] = contextvars.ContextVar("langenv_cascade_cache",
                                                                                 default=None)


class _PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` that writes new keys/values into a preallocated buffer instead of
    concatenating (transformers 5.23 `DynamicLayer.update` is ``torch.cat([keys, new], dim=-2)``,
    a full copy of the layer's cache every step).

    Buffers: (B, heads, capacity, d); ``keys`` / ``values`` are views of the first ``length``
    positions, what attention reads. The buffer grows by half its size (at most to ``limit``
    positions) when full. Only plain full-attention layers are replaced by this one; sliding-window
    or other layer types keep their own class.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, reserve: int, limit: int):
        length = keys.shape[-2]
        self._allocate(keys, values, index.numel(), length, max(limit, length), reserve)
        self._k[:, :, :length] = keys[index]
        self._v[:, :, :length] = values[index]
        self._views()

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor, rows: int, length: int, limit: int,
                  reserve: int) -> None:
        """Empty (rows, heads, capacity, d) buffers shaped and typed like ``keys`` / ``values``, with
        ``length`` positions counted as filled and room for ``reserve`` more (``limit`` at most)."""
        DynamicLayer.__init__(self)
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.length, self.limit = length, limit
        capacity = max(1, min(limit, length + reserve))
        self._k = keys.new_empty((rows, keys.shape[1], capacity, keys.shape[3]))
        self._v = values.new_empty((rows, values.shape[1], capacity, values.shape[3]))

    def _views(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self.length + n > self._k.shape[2]:
            capacity = max(self.length + n, min(self.limit, self._k.shape[2] * 3 // 2))
            grow = capacity - self._k.shape[2]
            self._k = torch.cat([self._k, self._k.new_empty(self._k.shape[:2] + (grow, self._k.shape[3]))], dim=2)
            self._v = torch.cat([self._v, self._v.new_empty(self._v.shape[:2] + (grow, self._v.shape[3]))], dim=2)
        self._k[:, :, self.length: self.length + n] = key_states
        self._v[:, :, self.length: self.length + n] = value_states
        self.length += n
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # copy only the filled positions: the rest of the new buffer is never touched before it is written
        k = self._k.new_empty((indices.numel(),) + self._k.shape[1:])
        v = self._v.new_empty((indices.numel(),) + self._v.shape[1:])
        k[:, :, : self.length] = self.keys[indices]
        v[:, :, : self.length] = self.values[indices]
        self._k, self._v = k, v
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._k = self._k.repeat_interleave(repeats, dim=0)
        self._v = self._v.repeat_interleave(repeats, dim=0)
        self._views()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop: expected a negative count of tokens to remove, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)
        self._views()

    def reset(self) -> None:
        self.length = 0
        self._views()


def expand_cache(cache: DynamicCache, index: torch.Tensor, reserve: int, limit: int) -> DynamicCache:
    """A cache for the rows ``index`` (B,) of ``cache`` (U rows): row b holds prompt ``index[b]``.

    Plain `DynamicLayer` layers become `_PreallocatedLayer` with room for ``reserve`` more
    positions (``limit`` at most) when ``reserve > 0``; other layers (and all layers when
    ``reserve == 0``) are index-selected on a shallow copy (`DynamicLayer.batch_select_indices`
    is ``keys[indices]``, a new tensor, so repeated indices expand and ``cache`` is unchanged).
    """
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        plain = type(layer) is DynamicLayer and layer.is_initialized and layer.get_seq_length() > 0
        if plain and reserve > 0:
            out.layers.append(_PreallocatedLayer(layer.keys, layer.values, index, reserve, limit))
        else:
            other = copy.copy(layer)
            other.batch_select_indices(index)
            out.layers.append(other)
    return out


class _Rows:
    """Which prompt each live row continues, and its place in the (U, R) query grid.

    ``src`` (B,) long: the row's prompt, non-decreasing (rows of a prompt are contiguous); ``grid``
    (B,) long: ``src · R + slot``, slot the row's rank among its prompt's rows; ``bias`` (B, 1, W)
    additive prefix mask (0 or -inf: the prompt's left padding); ``dense``: every prompt has R rows,
    so ``grid`` is ``arange(B)`` and the rows can be viewed as the grid without a scatter."""

    def __init__(self, src: torch.Tensor, prefix_valid: torch.Tensor, dtype: torch.dtype):
        self.prompts, self.width = prefix_valid.shape
        self._bias = torch.zeros(prefix_valid.shape, dtype=dtype, device=src.device).masked_fill(
            ~prefix_valid, float("-inf"))
        self.select(src)

    def select(self, src: torch.Tensor) -> None:
        self.src = src
        counts = torch.bincount(src, minlength=self.prompts)
        self.per_prompt = int(counts.max())
        first = torch.cumsum(counts, 0) - counts
        self.grid = src * self.per_prompt + (torch.arange(src.numel(), device=src.device) - first[src])
        self.bias = self._bias[src][:, None, :]
        # every prompt has exactly R rows: the rows already are the grid (grid == arange(B)), nothing to scatter
        self.dense = src.numel() == self.prompts * self.per_prompt


class _CascadeLayer(_PreallocatedLayer):
    """One layer's cache: the prompts' prefill keys/values once, each row's suffix in a
    `_PreallocatedLayer` buffer (grown by half when full, at most ``limit`` positions).

    ``update`` appends the new token's keys/values to the suffix and returns the suffix views
    (B, heads_kv, S, d): the prefix is read by `cascade_attention` from ``prefix_keys`` /
    ``prefix_values`` (U, heads_kv, W, d). ``get_seq_length`` counts W + S positions."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: int, reserve: int, limit: int):
        self._allocate(keys, values, rows, 0, max(limit, 1), reserve)
        self.prefix_keys, self.prefix_values = keys, values
        self.width = keys.shape[-2]
        self._views()

    def get_seq_length(self) -> int:
        return self.width + self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a cascade cache is built for its rows; it cannot be repeated")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a cascade cache cannot be cropped")


class _CascadeCache(Cache):
    """The decode cache of one chunk: `_CascadeLayer` per layer plus the shared `_Rows`."""

    def __init__(self, layers: list[_CascadeLayer], rows: _Rows):
        super().__init__(layers=layers)
        self.rows = rows

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.rows.select(self.rows.src[indices])
        for layer in self.layers:
            layer.batch_select_indices(indices)


def supports_cascade_model(model) -> bool:
    """Whether ``model`` qualifies for cascade attention before any prefill: a model type in
    `CASCADE_MODEL_TYPES`, attention through transformers' `AttentionInterface`
    (``_can_set_attn_implementation``), currently ``sdpa`` or ``eager``, and a `DynamicCache` built
    from its config holding only plain full-attention (`DynamicLayer`) layers."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in CASCADE_MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        return False
    layers = DynamicCache(config=config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def supports_cascade(model, cache: Cache) -> bool:
    """Whether the decode steps of ``model`` after a prefill into ``cache`` can use cascade attention:
    `supports_cascade_model`, and ``cache`` holds only plain full-attention (`DynamicLayer`) layers,
    all filled."""
    if not supports_cascade_model(model):
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer and layer.is_initialized
                                      and layer.get_seq_length() > 0 for layer in cache.layers)


def cascade_cache(cache: Cache, prefix_valid: torch.Tensor, src: torch.Tensor, reserve: int,
                  limit: int) -> _CascadeCache:
    """The decode cache for rows ``src`` (B,) (row b continues prompt ``src[b]``, non-decreasing)
    of a prefill ``cache`` over U prompts (left-padded to W tokens).

    Args:
        cache: the prefill cache, (U, heads_kv, W, d) per layer; shared, not copied.
        prefix_valid: (U, W) bool or long, 1 where the prompt has a token (not left padding).
        src: (B,) long prompt index of each row, non-decreasing.
        reserve: suffix positions preallocated per row.
        limit: most suffix positions a row can reach (the buffer never grows past it).

    Raises:
        ValueError: ``src`` decreasing somewhere (rows of a prompt must be contiguous).
    """
    if src.numel() > 1 and bool((src[1:] < src[:-1]).any()):
        raise ValueError("src: rows of one prompt must be contiguous (non-decreasing prompt index)")
    layers = [_CascadeLayer(layer.keys, layer.values, src.numel(), reserve, limit) for layer in cache.layers]
    return _CascadeCache(layers, _Rows(src, prefix_valid.bool(), cache.layers[0].keys.dtype))


@contextlib.contextmanager
def cascade_decoding(model, cache: _CascadeCache):
    """Route ``model``'s attention to `cascade_attention` over ``cache`` inside the block; its own
    implementation (and no active cache) afterwards, also on error."""
    before = model.config._attn_implementation
    token = _ACTIVE.set(cache)
    model.set_attn_implementation(CASCADE_ATTENTION)
    try:
        yield cache
    finally:
        model.set_attn_implementation(before)
        _ACTIVE.reset(token)


def cascade_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """Attention of one decode step over a `_CascadeCache` (registered as ``"langenv_cascade"``).

    Args:
        module: the attention module (its ``layer_idx`` picks the cache layer).
        query: (B, heads, 1, d).
        key, value: (B, heads_kv, S, d): the rows' suffixes, as `_CascadeLayer.update` returns them.
        attention_mask: ignored (None: padding is in the cache).
        scaling: the softmax scale (default d^-0.5).

    Returns:
        ((B, 1, heads, d) attention output, None).

    Raises:
        RuntimeError: called outside `cascade_decoding`, for more than one query token, with
            dropout (training), a sliding window or soft-capping.
    """
    cache = _ACTIVE.get()
    if cache is None:
        raise RuntimeError("cascade attention is only valid inside cascade_decoding()")
    if query.shape[2] != 1 or dropout:
        raise RuntimeError("cascade attention handles single-token decode steps without dropout")
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise RuntimeError("cascade attention does not handle sliding windows or soft-capping")
    d = query.shape[-1]
    scale = d ** -0.5 if scaling is None else scaling
    out = shared_prefix_attention(query[:, :, 0, :] * scale, key, value, cache.layers[module.layer_idx], cache.rows)
    return out[:, None], None


def shared_prefix_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: _CascadeLayer,
                            rows: _Rows) -> torch.Tensor:
    """``softmax(q·[K_prefix; K_suffix]ᵀ)·[V_prefix; V_suffix]`` for one query token per row, reading
    each prompt's prefix once for all its rows (see the module docstring).

    Args:
        q: (B, heads, d) queries, already multiplied by the softmax scale.
        key, value: (B, heads_kv, S, d): the rows' own suffixes (heads divisible by heads_kv).
        layer: the cache layer holding ``prefix_keys`` / ``prefix_values`` (U, heads_kv, W, d).
        rows: the chunk's `_Rows` (prompt of each row, grid, padding bias).

    Returns:
        (B, heads, d) in ``q``'s dtype; the softmax runs in at least float32.
    """
    n_rows, heads, d = q.shape
    heads_kv, groups = key.shape[1], heads // key.shape[1]
    prompts, width, per = rows.prompts, rows.width, rows.per_prompt

    # prefix scores: the grid (U, R, H, d) -> (U, H_kv, R·g, d) against each prompt's keys once
    if rows.dense:
        grid = q
    else:
        grid = q.new_zeros((prompts * per, heads, d))
        grid[rows.grid] = q
    grid = grid.view(prompts, per, heads_kv, groups, d).permute(0, 2, 1, 3, 4).reshape(prompts, heads_kv, per * groups, d)
    s_pre = torch.matmul(grid, layer.prefix_keys.transpose(-1, -2))  # (U, H_kv, R·g, W)
    s_pre = s_pre.view(prompts, heads_kv, per, groups, width).permute(0, 2, 1, 3, 4).reshape(prompts * per, heads, width)
    s_pre = (s_pre if rows.dense else s_pre[rows.grid]) + rows.bias  # (B, H, W)
    # suffix scores: each row against its own keys
    s_suf = torch.matmul(q.view(n_rows, heads_kv, groups, d), key.transpose(-1, -2))  # (B, H_kv, g, S)
    scores = torch.cat([s_pre, s_suf.reshape(n_rows, heads, -1)], dim=-1)
    p = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)
    p_pre, p_suf = p[..., :width], p[..., width:]

    if rows.dense:
        weights = p_pre
    else:
        weights = p.new_zeros((prompts * per, heads, width))
        weights[rows.grid] = p_pre
    weights = weights.reshape(prompts, per, heads_kv, groups, width).permute(0, 2, 1, 3, 4).reshape(
        prompts, heads_kv, per * groups, width)
    o_pre = torch.matmul(weights, layer.prefix_values)  # (U, H_kv, R·g, d)
    o_pre = o_pre.view(prompts, heads_kv, per, groups, d).permute(0, 2, 1, 3, 4).reshape(prompts * per, heads, d)
    o_suf = torch.matmul(p_suf.reshape(n_rows, heads_kv, groups, -1), value)  # (B, H_kv, g, d)
    out = (o_pre if rows.dense else o_pre[rows.grid]) + o_suf.reshape(n_rows, heads, d)
    return out.to(q.dtype)


AttentionInterface.register(CASCADE_ATTENTION, cascade_attention)
