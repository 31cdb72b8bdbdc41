"""One decode step of a Llama-family model as a short sequence of batched tensor operations.

The prefix-sharing sampler's decode steps run one new token per row. For the small models this
project trains on a CPU, such a step is dominated by per-operation overhead, not arithmetic: the
model's own forward pass (transformers 5.x `LlamaForCausalLM`) dispatches ~60 operations per layer
(separate q/k/v and gate/up projections, an RMSNorm of six operations, the rotary embedding
recomputed from the positions at every step, the attention interface, output dataclasses and
keyword plumbing), and its weights are read as transposed views. `FusedDecoder` computes the same
function for a decode step with shared-prefix attention (`algos.samplers.decode_cache`):

- q, k and v come from **one** matrix product against the three projections' weights concatenated,
  gate and up from another (as vLLM's ``QKVParallelLinear`` / ``MergedColumnParallelLinear``);
  the weights are copied once, transposed to (in, out) and contiguous, and copied again only when
  a source weight changed (its identity or its in-place version counter, which an optimiser step
  or `algos.samplers.base.copy_weights` bumps);
- the residual additions ride on ``addmm``; RMSNorm is ``torch.nn.functional.rms_norm``;
- cos/sin of the rotary embedding are computed once per call for all positions by the model's own
  ``rotary_emb`` module (static rope types only) and gathered per step;
- attention is `algos.samplers.decode_cache.shared_prefix_attention` over the chunk's cascade cache.

The function is the model's (`tests/test_fused_decode.py` compares logits with the model's forward
pass in float64 for Llama with grouped-query heads, Qwen2 with q/k/v biases and Mistral, and the
sampler's tokens with and without the fused step); float32 results differ from the model's by
rounding only (different summation order in the fused products).

Scope (`supports_fused_decode`): model types in `FUSED_MODEL_TYPES` with SiLU-gated MLPs without
bias, a static rotary embedding (`STATIC_ROPE_TYPES`), the standard module layout
(``model.model.layers[i].self_attn.q_proj`` ...), floating-point weights of one dtype. Anything else
(other architectures, quantised or adapter-wrapped models, dynamic rope scaling) keeps the
model's own forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from algos.samplers.decode_cache import CASCADE_MODEL_TYPES, shared_prefix_attention

__all__ = ["FUSED_MODEL_TYPES", "FUSE_LIMIT_BYTES", "STATIC_ROPE_TYPES", "FusedDecoder", "supports_fused_decode"]

#: Architectures whose decoder layer is exactly RMSNorm -> q/k/v (optional bias) -> rotary ->
#: attention -> o_proj -> residual -> RMSNorm -> SiLU(gate)·up -> down -> residual.
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"}) & CASCADE_MODEL_TYPES
#: Rotary embeddings whose cos/sin depend on the position only (not on the sequence length seen).
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3"})
#: Largest extra copy (bytes) of the decoder weights made for the fused projections; above it the
#: step reads the model's weights in place (separate q/k/v and gate/up products, no copy).
FUSE_LIMIT_BYTES = 1 << 30

_LAYER_WEIGHTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def supports_fused_decode(model) -> bool:
    """Whether `FusedDecoder` computes ``model``'s decode step (see the module docstring's scope)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FUSED_MODEL_TYPES:
        return False
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "mlp_bias", False):
        return False
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") not in STATIC_ROPE_TYPES:
        return False
    if not isinstance(getattr(model, "lm_head", None), torch.nn.Linear) or getattr(model.lm_head, "bias", None) is not None:
        return False
    layers = getattr(inner, "layers", None)
    if not layers or not isinstance(getattr(inner, "embed_tokens", None), torch.nn.Embedding):
        return False
    dtypes = {model.lm_head.weight.dtype}
    for layer in layers:
        for name in _LAYER_WEIGHTS:
            module = layer.get_submodule(name)
            if type(module) is not torch.nn.Linear:  # quantised / LoRA-wrapped projections keep the model's forward
                return False
            dtypes.add(module.weight.dtype)
        attn = layer.self_attn
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return False
    return len(dtypes) == 1 and next(iter(dtypes)).is_floating_point


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """The model's RMSNorm: computed in float32, the weight applied in the input's dtype (transformers
    ``LlamaRMSNorm``, which also rounds a float64 input to float32); ``F.rms_norm`` for float32 input."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


class _Layer:
    """One decoder layer's weights, laid out for ``x @ w`` ((in, out) matrices)."""

    def __init__(self, layer, fuse: bool):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        gate_up = [mlp.gate_proj, mlp.up_proj]
        if fuse:
            self.qkv = [torch.cat([m.weight for m in qkv]).t().contiguous()]
            self.gate_up = [torch.cat([m.weight for m in gate_up]).t().contiguous()]
            self.o = attn.o_proj.weight.t().contiguous()
            self.down = mlp.down_proj.weight.t().contiguous()
        else:  # views of the model's weights: no copy
            self.qkv = [m.weight.t() for m in qkv]
            self.gate_up = [m.weight.t() for m in gate_up]
            self.o, self.down = attn.o_proj.weight.t(), mlp.down_proj.weight.t()
        biases = [m.bias for m in qkv]
        self.qkv_bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else m.weight.new_zeros(m.out_features) for b, m in zip(biases, qkv)])
        self.o_bias = attn.o_proj.bias
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.index = attn.layer_idx
        self.intermediate = mlp.gate_proj.out_features


class FusedDecoder:
    """The decode step of one model (see the module docstring); keeps its weight layout between calls.

    Args:
        model: a model for which `supports_fused_decode` is true (its weights are read, never written).
        fuse: copy the projections into fused, contiguous (in, out) matrices; ``None`` does so when the
            copy takes at most `FUSE_LIMIT_BYTES`.

    Raises:
        ValueError: ``model`` is not supported.
    """

    def __init__(self, model, fuse: bool | None = None):
        if not supports_fused_decode(model):
            raise ValueError(f"FusedDecoder: model type {getattr(model.config, 'model_type', None)!r} with this "
                             "configuration is not supported (see algos.samplers.fused_decode.supports_fused_decode)")
        self.model = model
        config = model.config
        attn = model.model.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.heads_kv = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        if fuse is None:
            size = sum(p.numel() * p.element_size() for layer in model.model.layers
                       for name in _LAYER_WEIGHTS for p in [layer.get_submodule(name).weight])
            fuse = size <= FUSE_LIMIT_BYTES
        self.fuse = fuse
        self._layers: list[_Layer] = []
        self._key: tuple = ()
        self._cos = self._sin = None

    def _sources(self) -> list[torch.Tensor]:
        return [p for layer in self.model.model.layers for p in layer.parameters()]

    def _prepare(self) -> None:
        """(Re)build the weight layout when a weight was replaced or changed in place since the last call."""
        key = tuple((id(p), p.data_ptr(), p._version) for p in self._sources())
        if key != self._key:
            self._layers = [_Layer(layer, self.fuse) for layer in self.model.model.layers]
            self._key = key

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (B, 1, d) of ``positions`` (B,), from a table built by the model's ``rotary_emb``
        (grown to the largest position asked for)."""
        needed = int(positions.max()) + 1
        if self._cos is None or self._cos.shape[0] < needed or self._cos.device != positions.device:
            size = max(needed, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            weight = self.model.model.embed_tokens.weight
            cos, sin = self.model.model.rotary_emb(weight[:1], torch.arange(size, device=positions.device)[None])
            self._cos, self._sin = cos[0], sin[0]  # (P, d) in the model's dtype
        return self._cos[positions][:, None], self._sin[positions][:, None]

    @staticmethod
    def _attend(q, k, v, cache, index: int) -> torch.Tensor:
        """Append k, v (B, H_kv, 1, d) to layer ``index`` of ``cache``; attention of q (B, H, d) over it."""
        cache_layer = cache.layers[index]
        keys, values = cache_layer.update(k, v)
        return shared_prefix_attention(q, keys, values, cache_layer, cache.rows)

    def begin(self) -> None:
        """Bring the weight layout up to date; call once per sampling call, before its steps."""
        self._prepare()

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """Next-token logits of every row after appending ``tokens`` at ``positions``.

        Args:
            tokens: (B,) long, the token each row appends.
            positions: (B,) long, its position (the row's length so far, padding excluded).
            cache: the chunk's cascade cache (`algos.samplers.decode_cache.cascade_cache`), or a
                list of them (cohorts: rows that started decoding at different steps, each with its
                own prefixes and suffix length) whose rows, in list order, are the B rows. Each
                layer's suffix gains the new token's keys/values. The projections and the MLP run
                once over all B rows; attention runs per cache.

        Returns:
            (B, V) float32 logits.
        """
        with torch.inference_mode():
            return F.linear(self.hidden_states(tokens, positions, cache), self.model.lm_head.weight).float()

    @torch.inference_mode()
    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """The final (normed) hidden state of every row, (B, hidden) in the model's dtype: `step`
        without the output head. Same arguments as `step`."""
        model = self.model
        caches = cache if isinstance(cache, (list, tuple)) else [cache]
        sizes = [c.rows.src.numel() for c in caches]
        x = model.model.embed_tokens(tokens)  # (B, hidden); the module, so that its hooks see the step
        rows = x.shape[0]
        cos, sin = self._rope(positions)
        heads, heads_kv, d = self.heads, self.heads_kv, self.head_dim
        half, n_qk = d // 2, (heads + heads_kv) * d
        for layer in self._layers:
            h = _rms_norm(x, layer.input_norm)
            qkv = h @ layer.qkv[0] if len(layer.qkv) == 1 else torch.cat([h @ w for w in layer.qkv], dim=-1)
            if layer.qkv_bias is not None:
                qkv = qkv + layer.qkv_bias
            qk = qkv[:, :n_qk].view(rows, heads + heads_kv, d)
            # rotary embedding of q and k at once (transformers `apply_rotary_pos_emb`, rotate_half)
            qk = torch.addcmul(qk * cos, torch.cat((-qk[..., half:], qk[..., :half]), dim=-1), sin)
            q = qk[:, :heads] * self.scale
            k = qk[:, heads:].unsqueeze(2)
            v = qkv[:, n_qk:].view(rows, heads_kv, 1, d)
            if len(caches) == 1:
                o = self._attend(q, k, v, caches[0], layer.index)
            else:
                o = torch.cat([self._attend(qc, kc, vc, c, layer.index) for qc, kc, vc, c in
                               zip(q.split(sizes), k.split(sizes), v.split(sizes), caches)])
            o = o.reshape(rows, heads * d)
            x = torch.addmm(x, o, layer.o)
            if layer.o_bias is not None:
                x = x + layer.o_bias
            h = _rms_norm(x, layer.post_norm)
            gu = h @ layer.gate_up[0] if len(layer.gate_up) == 1 else torch.cat([h @ w for w in layer.gate_up], -1)
            x = torch.addmm(x, F.silu(gu[:, :layer.intermediate]) * gu[:, layer.intermediate:], layer.down)
        return _rms_norm(x, model.model.norm)
