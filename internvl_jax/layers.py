"""Building blocks shared by the vision tower and the decoder: parameters, norms, RoPE, attention.

Shape letters used in einsum strings and names across the package:
  B batch (tiles for the vision tower), T query tokens, S key/value tokens (cache length),
  D model width, N query heads, K key/value heads, G query heads per kv head, H head dim,
  F MLP width, V vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax.config import RopeConfig

# A large finite negative instead of -inf: fully masked rows (padding) then give a uniform softmax
# rather than NaN, and NaN can never leak into valid rows through 0 * NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype,
          init: str = "normal", scale: float = 0.02) -> nnx.Param:
    """A parameter that carries its logical axis names (`sharding.py` maps them to mesh axes).

    Values are only placeholders: real ones come from a checkpoint, or from `weights.dummy_weights`.
    """
    assert len(shape) == len(axes), (shape, axes)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class LayerNorm(nnx.Module):
    def __init__(self, size: int, eps: float, dtype, axis_name: str | None, *, bias: bool = True,
                 rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = param(rngs, (size,), (axis_name,), dtype, "ones")
        self.bias = param(rngs, (size,), (axis_name,), dtype, "zeros") if bias else None

    def __call__(self, x):
        # Statistics in float32, as torch does for half-precision LayerNorm.
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, dtype, axis_name: str | None, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = param(rngs, (size,), (axis_name,), dtype, "ones")

    def __call__(self, x):
        # The reference normalises in float32, casts back to the input dtype, then scales:
        # `weight * x.to(input_dtype)`. Keeping that order matters for bf16 parity.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x.dtype)


def make_norm(norm_type: str, size: int, eps: float, dtype, axis_name: str | None, rngs: nnx.Rngs | None):
    if norm_type == "rms_norm":
        return RMSNorm(size, eps, dtype, axis_name, rngs=rngs)
    return LayerNorm(size, eps, dtype, axis_name, rngs=rngs)


def activation(name: str, x):
    if name == "gelu":  # exact erf GELU, as torch's nn.GELU() / ACT2FN["gelu"]
        return _gelu_erf(x)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    if name == "silu":
        return jax.nn.silu(x)
    raise ValueError(f"unknown activation {name!r}")


def gelu_tanh_in_dtype(x):
    """The tanh-approximate GELU in x's own dtype: the form XLA's GEMM rewriter folds into the cuBLASLt GEMM that
    produces x, as its GELU epilogue (evaluated there in float32 on the accumulator, before the one rounding to
    x's dtype). Where it is not folded (off GPU, a GEMM XLA gives to Triton) it runs in x's dtype, for bf16 less
    precisely than `activation("gelu_pytorch_tanh")`, which computes in float32. The exact (erf) GELU has no such
    epilogue and costs a pass of its own over the MLP's activations."""
    return jax.nn.gelu(x, approximate=True)


def _gelu_erf(x):
    """x/2 * (1 + erf(x/sqrt(2))) in float32, rounded once to x's dtype: torch's formula and precision
    for half-precision inputs. (`jax.nn.gelu(approximate=False)` goes through erfc, a longer
    polynomial, and rounds every intermediate to bf16; on the InternViT MLP it was the costliest
    non-GEMM kernel: docs/PERF.md.)"""
    x32 = x.astype(jnp.float32)
    return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * np.float32(np.sqrt(0.5))))).astype(x.dtype)


# ---- rotary position embedding ------------------------------------------------------------------


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """float32[H/2] inverse frequencies for the rope types InternVL's decoders use."""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq, scaled)
    # "dynamic" (NTK) only changes the frequencies past max_position_embeddings (32k for InternVL3),
    # beyond any max_model_len we serve; below it the reference uses the default frequencies.
    return inv_freq.astype(np.float32)


def rope_tables(positions_BT, inv_freq) -> tuple[jax.Array, jax.Array]:
    """cos, sin: float32[B, T, H] for positions int32[B, T] (half-rotation layout, as HF)."""
    angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BTNH, cos_BTH, sin_BTH):
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    # The reference casts cos/sin to the activation dtype before multiplying.
    cos = cos_BTH[:, :, None, :].astype(x_BTNH.dtype)
    sin = sin_BTH[:, :, None, :].astype(x_BTNH.dtype)
    return x_BTNH * cos + rotated * sin


# ---- attention --------------------------------------------------------------------------------------


def cudnn_usable_dtype(dtype, head_dim: int) -> bool:
    """cuDNN flash attention: GPU, half precision, head_dim a multiple of 8 up to 256 (Hopper)."""
    return (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 256)


def _cudnn_usable(q, k) -> bool:
    return cudnn_usable_dtype(q.dtype, q.shape[-1]) and q.shape[2] % k.shape[2] == 0


def attention(q_BTNH, k_BSKH, v_BSKH, *, causal: bool, q_lengths=None, kv_lengths=None,
              implementation: str | None = None):
    """Scaled dot-product attention, the one entry point for vision, prefill and decode.

    q: [B, T, N, H]; k, v: [B, S, K, H] with N a multiple of K (grouped-query attention).
    `kv_lengths` int32[B]: only keys [0, len) are valid (a prefix, the layout cuDNN understands).
    `causal`: query t attends keys s <= t (prefill, where T == S).
    `implementation`: "cudnn" or "xla"; None picks cuDNN on GPU for half precision, else XLA.
    Returns [B, T, N, H] in q's dtype.
    """
    if implementation is None:
        implementation = "cudnn" if _cudnn_usable(q_BTNH, k_BSKH) else "xla"
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, is_causal=causal, query_seq_lengths=q_lengths,
            key_value_seq_lengths=kv_lengths, implementation="cudnn")
    if implementation != "xla":
        raise ValueError(f"attention implementation {implementation!r}: expected 'cudnn', 'xla' or None")
    return _xla_attention(q_BTNH, k_BSKH, v_BSKH, causal=causal, kv_lengths=kv_lengths)


def _xla_attention(q_BTNH, k_BSKH, v_BSKH, *, causal: bool, kv_lengths):
    batch, t_len, heads, head_dim = q_BTNH.shape
    s_len, kv_heads = k_BSKH.shape[1], k_BSKH.shape[2]
    groups = heads // kv_heads
    q_BTKGH = q_BTNH.reshape(batch, t_len, kv_heads, groups, head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(head_dim))
    mask = None
    if causal:
        mask = jnp.arange(s_len)[None, :] <= jnp.arange(t_len)[:, None]
        mask = mask[None, None, None]
    if kv_lengths is not None:
        valid = (jnp.arange(s_len)[None, :] < kv_lengths[:, None])[:, None, None, None, :]
        mask = valid if mask is None else mask & valid
    if mask is not None:
        scores = jnp.where(mask, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH, preferred_element_type=jnp.float32)
    return out.reshape(batch, t_len, heads, head_dim).astype(q_BTNH.dtype)
