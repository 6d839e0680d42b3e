"""The decoder-only LLM: Qwen2/Qwen2.5 (qkv bias), Qwen3 (per-head q/k RMSNorm), Llama (and InternLM2
as Llama-shaped weights). GQA, RoPE, SwiGLU MLP, tied or untied embeddings.

Shapes: B batch, T new tokens, S cache length, E width, N query heads, K kv heads, H head dim,
I MLP width, V vocabulary. A KV cache is one (k, v) pair per layer, each [B, S, K, H] (BTNH, the
layout cuDNN reads directly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from internvl_jax.config import TextConfig
from internvl_jax.layers import RMSNorm, apply_rope, attention, param, rope_inverse_frequencies, rope_tables


def _linear(rngs, shape, axes, dtype, bias_shape=None, bias_axes=None):
    weights = nnx.Dict(kernel=param(rngs, shape, axes, dtype))
    if bias_shape is not None:
        weights["bias"] = param(rngs, bias_shape, bias_axes, dtype, "zeros")
    return weights


def _apply(weights, equation: str, x):
    y = jnp.einsum(equation, x, weights["kernel"][...])
    return y + weights["bias"][...] if "bias" in weights else y


class Attention(nnx.Module):
    def __init__(self, config: TextConfig, dtype, rngs: nnx.Rngs | None):
        e, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.config = config
        qkv_bias = config.qkv_bias
        self.q = _linear(rngs, (e, n, h), ("embed", "q_heads", "head_dim"), dtype,
                         (n, h) if qkv_bias else None, ("q_heads", "head_dim"))
        self.k = _linear(rngs, (e, k, h), ("embed", "kv_heads", "head_dim"), dtype,
                         (k, h) if qkv_bias else None, ("kv_heads", "head_dim"))
        self.v = _linear(rngs, (e, k, h), ("embed", "kv_heads", "head_dim"), dtype,
                         (k, h) if qkv_bias else None, ("kv_heads", "head_dim"))
        self.o = _linear(rngs, (n, h, e), ("q_heads", "head_dim", "embed"), dtype,
                         (e,) if config.o_bias else None, ("embed",))
        if config.qk_norm:
            self.q_norm = RMSNorm(h, config.norm_eps, dtype, "head_dim", rngs)
            self.k_norm = RMSNorm(h, config.norm_eps, dtype, "head_dim", rngs)

    def __call__(self, x_BTE, cos_BTH, sin_BTH, lengths_B, cache=None, write_positions_B=None,
                 attention_impl: str | None = None):
        """Without a cache (prefill): causal self-attention over the T tokens, of which the first
        `lengths[b]` are valid; returns (out, (k, v)) with k, v [B, T, K, H] for the caller to store.

        With a cache ((k, v) each [B, S, K, H]): the T new tokens are written at
        `write_positions[b] + t` and attend to the cache prefix [0, write_positions[b] + T); returns
        (out, updated cache).
        """
        q = _apply(self.q, "bte,enh->btnh", x_BTE)
        k = _apply(self.k, "bte,ekh->btkh", x_BTE)
        v = _apply(self.v, "bte,ekh->btkh", x_BTE)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos_BTH, sin_BTH), apply_rope(k, cos_BTH, sin_BTH)
        if cache is None:
            out = attention(q, k, v, causal=True, q_lengths=lengths_B, kv_lengths=lengths_B,
                            implementation=attention_impl)
            new_kv = (k, v)
        else:
            cache_k, cache_v = cache
            batch, tokens = k.shape[:2]
            if tokens != 1:
                raise NotImplementedError("decode with a cache takes one new token per sequence")
            rows = jnp.arange(batch)[:, None]
            columns = write_positions_B[:, None] + jnp.arange(tokens)[None, :]
            cache_k = cache_k.at[rows, columns].set(k.astype(cache_k.dtype), mode="drop")
            cache_v = cache_v.at[rows, columns].set(v.astype(cache_v.dtype), mode="drop")
            out = attention(q, cache_k, cache_v, causal=False, kv_lengths=write_positions_B + 1,
                            implementation=attention_impl)
            new_kv = (cache_k, cache_v)
        return _apply(self.o, "btnh,nhe->bte", out), new_kv


class DecoderLayer(nnx.Module):
    def __init__(self, config: TextConfig, dtype, rngs: nnx.Rngs | None):
        e, i = config.hidden_size, config.intermediate_size
        self.input_norm = RMSNorm(e, config.norm_eps, dtype, "embed_norm", rngs)
        self.attn = Attention(config, dtype, rngs)
        self.post_attn_norm = RMSNorm(e, config.norm_eps, dtype, "embed_norm", rngs)
        self.mlp = nnx.Dict(
            gate=nnx.Dict(kernel=param(rngs, (e, i), ("embed", "mlp"), dtype)),
            up=nnx.Dict(kernel=param(rngs, (e, i), ("embed", "mlp"), dtype)),
            down=nnx.Dict(kernel=param(rngs, (i, e), ("mlp", "embed"), dtype)),
        )

    def __call__(self, x_BTE, cos_BTH, sin_BTH, lengths_B, cache=None, write_positions_B=None,
                 attention_impl: str | None = None, mlp_kernel=None):
        with jax.named_scope("attention"):
            attn_out, new_kv = self.attn(self.input_norm(x_BTE), cos_BTH, sin_BTH, lengths_B, cache,
                                         write_positions_B, attention_impl)
            x_BTE = x_BTE + attn_out
        with jax.named_scope("mlp"):
            x_BTE = self.mlp_block(x_BTE, mlp_kernel)
        return x_BTE, new_kv

    def mlp_block(self, x_BTE, mlp_kernel=None):
        """x + MLP(norm(x)). `mlp_kernel` None: XLA's GEMMs; else fn(h [M, E], gate, up, down) -> float32[M, E]
        computing the same MLP (the decode step's Pallas kernels, `kernels.sharded_mlp`)."""
        h = self.post_attn_norm(x_BTE)
        gate_w, up_w, down_w = (self.mlp[name]["kernel"][...] for name in ("gate", "up", "down"))
        if mlp_kernel is not None:
            b, t, e = h.shape
            out = mlp_kernel(h.reshape(b * t, e), gate_w, up_w, down_w).reshape(b, t, e)
            return (x_BTE.astype(jnp.float32) + out).astype(x_BTE.dtype)
        gate = jnp.einsum("bte,ei->bti", h, gate_w)
        up = jnp.einsum("bte,ei->bti", h, up_w)
        return x_BTE + jnp.einsum("bti,ie->bte", jax.nn.silu(gate) * up, down_w)


class TextModel(nnx.Module):
    def __init__(self, config: TextConfig, dtype, rngs: nnx.Rngs | None):
        self.config = config
        self.embed = nnx.Dict(embedding=param(rngs, (config.vocab_size, config.hidden_size),
                                              ("vocab", "embed"), dtype))
        self.layers = nnx.List([DecoderLayer(config, dtype, rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.norm_eps, dtype, "embed_norm", rngs)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Dict(kernel=param(rngs, (config.hidden_size, config.vocab_size),
                                                 ("embed", "vocab"), dtype))

    def embed_tokens(self, ids_BT):
        return jnp.take(self.embed["embedding"][...], ids_BT, axis=0)

    def __call__(self, x_BTE, positions_BT, lengths_B, caches=None, write_positions_B=None,
                 attention_impl: str | None = None, mlp_kernel=None):
        """Runs the decoder layers; see `Attention` for the two cache modes. `attention_impl` ("cudnn",
        "xla" or None for the default of `layers.attention`) picks the attention kernel, `mlp_kernel` the
        MLP's (`DecoderLayer.mlp_block`).

        Returns (hidden [B, T, E] after the final norm, per-layer (k, v) list).
        """
        cos, sin = rope_tables(positions_BT, rope_inverse_frequencies(self.config.rope, self.config.head_dim))
        new_caches = []
        for index, layer in enumerate(self.layers):
            with jax.named_scope(f"decoder_layer_{index}"):
                cache = None if caches is None else caches[index]
                x_BTE, kv = layer(x_BTE, cos, sin, lengths_B, cache, write_positions_B, attention_impl, mlp_kernel)
            new_caches.append(kv)
        return self.final_norm(x_BTE), new_caches

    def logits(self, hidden_BTE):
        """float32[B, T, V]."""
        if self.config.tie_word_embeddings:
            out = jnp.einsum("bte,ve->btv", hidden_BTE, self.embed["embedding"][...])
        else:
            out = jnp.einsum("bte,ev->btv", hidden_BTE, self.lm_head["kernel"][...])
        return out.astype(jnp.float32)
