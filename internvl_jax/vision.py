"""InternViT encoder and the pixel-shuffle projector (`mlp1` / `multi_modal_projector`).

Shapes: B tiles, T tokens per tile (1 CLS + G*G patches), D width, N heads, H head dim, F MLP width,
E the LLM width. See `layers.py` for the letter key.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax.config import ProjectorConfig, VisionConfig
from internvl_jax.layers import LayerNorm, RMSNorm, activation, attention, make_norm, param


class VisionEmbeddings(nnx.Module):
    def __init__(self, config: VisionConfig, dtype, rngs: nnx.Rngs | None):
        d, p = config.hidden_size, config.patch_size
        self.config = config
        # The conv is a matmul over flattened (channel, row, column) patches.
        self.patch = nnx.Dict(
            kernel=param(rngs, (3 * p * p, d), ("vis_patch", "vis_embed"), dtype),
            bias=param(rngs, (d,), ("vis_embed",), dtype, "zeros"),
        )
        self.cls = param(rngs, (d,), ("vis_embed",), dtype)
        self.position = param(rngs, (config.num_patches + 1, d), ("vis_positions", "vis_embed"), dtype)

    def __call__(self, pixels_BCHW):
        """float[B, 3, H, W] -> [B, 1 + (H/P)*(W/P), D] in the parameter dtype."""
        p = self.config.patch_size
        batch, channels, height, width = pixels_BCHW.shape
        rows, cols = height // p, width // p
        dtype = self.patch["kernel"][...].dtype
        x = pixels_BCHW.astype(dtype).reshape(batch, channels, rows, p, cols, p)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, channels * p * p)
        x = jnp.einsum("bpc,cd->bpd", x, self.patch["kernel"][...]) + self.patch["bias"][...]
        cls = jnp.broadcast_to(self.cls[...], (batch, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self._positions(rows, cols)[None]

    def _positions(self, rows: int, cols: int):
        table = self.position[...]
        grid = self.config.grid
        if rows == grid and cols == grid:
            return table
        # Another resolution: bicubic resampling of the patch grid exactly as torch's
        # F.interpolate(mode="bicubic", align_corners=False), in float32 as vLLM does.
        patch_table = table[1:].astype(jnp.float32).reshape(grid, grid, -1)
        resampled = jnp.einsum("rg,ch,ghd->rcd", _bicubic_matrix(grid, rows), _bicubic_matrix(grid, cols),
                               patch_table)
        return jnp.concatenate([table[:1], resampled.reshape(rows * cols, -1).astype(table.dtype)])


@functools.lru_cache(maxsize=32)
def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float32[out, in] weights of torch's 1-D bicubic upsampling (A = -0.75, clamped borders)."""
    a = -0.75

    def cubic(x):
        x = abs(x)
        if x <= 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return 0.0

    weights = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for out_index in range(out_size):
        source = (out_index + 0.5) * scale - 0.5  # cubic: no clamping of the source coordinate
        base = int(np.floor(source))
        frac = source - base
        for offset in range(-1, 3):
            index = min(max(base + offset, 0), in_size - 1)
            weights[out_index, index] += cubic(offset - frac)
    return weights.astype(np.float32)


class VisionAttention(nnx.Module):
    def __init__(self, config: VisionConfig, dtype, rngs: nnx.Rngs | None):
        d, n, h = config.hidden_size, config.num_heads, config.head_dim
        self.config = config
        # q, k and v each a GEMM of its own (`_project`), so each its own weights: [D, N, H] and a bias [N, H].
        self.q, self.k, self.v = (self._projection(config, dtype, rngs) for _ in range(3))
        if config.qk_norm:
            # InternViT-6B normalises q and k over the full width, before the head split.
            self.q_norm = RMSNorm(d, config.norm_eps, dtype, "vis_embed_norm", rngs)
            self.k_norm = RMSNorm(d, config.norm_eps, dtype, "vis_embed_norm", rngs)
        self.out = nnx.Dict(
            kernel=param(rngs, (n, h, d), ("vis_heads", "head_dim", "vis_embed"), dtype),
            bias=param(rngs, (d,), ("vis_embed",), dtype, "zeros"),
        )

    @staticmethod
    def _projection(config: VisionConfig, dtype, rngs: nnx.Rngs | None) -> nnx.Dict:
        d, n, h = config.hidden_size, config.num_heads, config.head_dim
        projection = nnx.Dict(kernel=param(rngs, (d, n, h), ("vis_embed", "vis_heads", "head_dim"), dtype))
        if config.qkv_bias:
            projection["bias"] = param(rngs, (n, h), ("vis_heads", "head_dim"), dtype, "zeros")
        return projection

    def __call__(self, x_BTD, kv_lengths_B=None):
        """`kv_lengths_B`: tokens past it are padding (`VisionEncoder` pads odd row counts) and not attended."""
        batch, tokens, width = x_BTD.shape
        heads, head_dim = self.config.num_heads, self.config.head_dim
        x_MD = x_BTD.reshape(batch * tokens, width)
        q, k, v = (_project(x_MD, projection).reshape(batch, tokens, heads, head_dim)
                   for projection in (self.q, self.k, self.v))
        if self.config.qk_norm:
            q = self.q_norm(q.reshape(batch, tokens, -1)).reshape(batch, tokens, heads, head_dim)
            k = self.k_norm(k.reshape(batch, tokens, -1)).reshape(batch, tokens, heads, head_dim)
        o = attention(q, k, v, causal=False, kv_lengths=kv_lengths_B)
        return jnp.einsum("btnh,nhd->btd", o, self.out["kernel"][...]) + self.out["bias"][...]


def _project(x_MD, projection: nnx.Dict):
    """x [M, D] @ kernel [D, N, H] (+ bias) -> [M, N*H]: 2-D, the bias a vector, so cuBLAS adds it in its epilogue
    and the output is already in the attention's layout. (One GEMM for q, k and v together costs a copy of each
    out of the fused output, and XLA broadcasts a [3, N, H] bias to the output's size first: ~250 us per layer at
    32 tiles on an H100, docs/PERF.md, ninth session.)"""
    kernel = projection["kernel"][...]
    y = x_MD @ kernel.reshape(kernel.shape[0], -1)
    if "bias" in projection:
        y = y + projection["bias"][...].reshape(-1)
    return y


class LayerKernels(NamedTuple):
    """Functions a vision layer runs in place of XLA's fusions; None: XLA's. `layer_norm` fn(x [B, T, D], scale [D],
    bias [D], eps) for the LayerNorms (`kernels.sharded_layer_norm`, the same function; RMSNorms stay XLA's);
    `gelu` fn(h [B, T, F]) in place of an exact-GELU MLP's activation: `kernels.sharded_gelu` (the same function),
    or the tanh approximation the runner's `vision_gelu="tanh"` asks for (`layers.gelu_tanh_in_dtype`)."""

    layer_norm: Callable | None = None
    gelu: Callable | None = None


XLA_KERNELS = LayerKernels()  # XLA's fusions throughout


class VisionLayer(nnx.Module):
    def __init__(self, config: VisionConfig, dtype, rngs: nnx.Rngs | None):
        d, f = config.hidden_size, config.intermediate_size
        self.config = config
        self.norm1 = make_norm(config.norm_type, d, config.norm_eps, dtype, "vis_embed_norm", rngs)
        self.attn = VisionAttention(config, dtype, rngs)
        self.ls1 = param(rngs, (d,), ("vis_embed",), dtype, "ones")
        self.norm2 = make_norm(config.norm_type, d, config.norm_eps, dtype, "vis_embed_norm", rngs)
        self.mlp = nnx.Dict(
            fc1=nnx.Dict(kernel=param(rngs, (d, f), ("vis_embed", "vis_mlp"), dtype),
                         bias=param(rngs, (f,), ("vis_mlp",), dtype, "zeros")),
            fc2=nnx.Dict(kernel=param(rngs, (f, d), ("vis_mlp", "vis_embed"), dtype),
                         bias=param(rngs, (d,), ("vis_embed",), dtype, "zeros")),
        )
        self.ls2 = param(rngs, (d,), ("vis_embed",), dtype, "ones")
        self.layer_scale_folded = False  # static: ls1/ls2 are in the weights (`fold_layer_scale`)

    def __call__(self, x_BTD, kv_lengths_B=None, kernels: LayerKernels = XLA_KERNELS):
        with jax.named_scope("attention"):
            h_BTD = self.attn(_normalise(self.norm1, x_BTD, kernels.layer_norm), kv_lengths_B)
            x_BTD = x_BTD + self._layer_scale(h_BTD, self.ls1)
        with jax.named_scope("mlp"):
            fc1, fc2 = self.mlp["fc1"], self.mlp["fc2"]
            h_BTF = jnp.einsum("btd,df->btf", _normalise(self.norm2, x_BTD, kernels.layer_norm), fc1["kernel"][...])
            h_BTF = h_BTF + fc1["bias"][...]
            if kernels.gelu is not None and self.config.hidden_act == "gelu":
                h_BTF = kernels.gelu(h_BTF)
            else:
                h_BTF = activation(self.config.hidden_act, h_BTF)
            h_BTD = jnp.einsum("btf,fd->btd", h_BTF, fc2["kernel"][...]) + fc2["bias"][...]
            x_BTD = x_BTD + self._layer_scale(h_BTD, self.ls2)
        return x_BTD

    def _layer_scale(self, h_BTD, scale):
        return h_BTD if self.layer_scale_folded else h_BTD * scale[...]

    def fold_layer_scale(self) -> None:
        """Multiplies ls1 into the attention's output projection and ls2 into fc2 (weights and biases), sets
        both to ones and stops multiplying by them. `x + h @ W + b` is then one cuBLAS call (the residual as
        its C matrix, the bias as its epilogue), where `x + (h @ W + b) * ls` needs an elementwise kernel after
        the GEMM: ~27 us per branch and layer at 32 tiles on an H200, +3% tiles/s at 8-32 tiles on an H100 (but
        0.1 ms slower at one tile; docs/PERF.md, eighth session). The function is the same up to the products'
        rounding, and the parameters still describe it if read without the fold (the scales are ones). Folding
        twice is a no-op."""
        if self.layer_scale_folded:
            return
        out, fc2 = self.attn.out, self.mlp["fc2"]
        targets = (out["kernel"], out["bias"], self.ls1, fc2["kernel"], fc2["bias"], self.ls2)
        values = tuple(variable[...] for variable in targets)
        folded = _fold_program(tuple(value.sharding for value in values))(*values)
        for variable, value in zip(targets, folded, strict=True):
            variable.set_value(value)
        self.layer_scale_folded = True


def _normalise(norm, x_BTD, kernel):
    if kernel is None or not isinstance(norm, LayerNorm) or norm.bias is None:
        return norm(x_BTD)
    return kernel(x_BTD, norm.scale[...], norm.bias[...], norm.eps)


def _fold_scales(out_kernel, out_bias, ls1, fc2_kernel, fc2_bias, ls2):
    """One layer's layer scales multiplied into the weights they follow (float32 products, rounded once), and
    ones in their place."""
    def scaled(x, scale):
        return (x.astype(jnp.float32) * scale.astype(jnp.float32)).astype(x.dtype)

    return (scaled(out_kernel, ls1), scaled(out_bias, ls1), jnp.ones_like(ls1),
            scaled(fc2_kernel, ls2), scaled(fc2_bias, ls2), jnp.ones_like(ls2))


@functools.cache
def _fold_program(shardings: tuple) -> Callable:
    """`_fold_scales` jitted to keep each input's sharding: one program for all the layers of a tower."""
    return jax.jit(_fold_scales, out_shardings=shardings)


class VisionEncoder(nnx.Module):
    """InternViT up to the feature layer: embeddings + `layers_used` pre-norm layers, no final norm."""

    def __init__(self, config: VisionConfig, dtype, rngs: nnx.Rngs | None):
        self.embeddings = VisionEmbeddings(config, dtype, rngs)
        self.layers = nnx.List([VisionLayer(config, dtype, rngs) for _ in range(config.layers_used)])

    def fold_layer_scales(self) -> None:
        """Every layer's `VisionLayer.fold_layer_scale` (the serving form; `Runner` does it)."""
        for layer in self.layers:
            layer.fold_layer_scale()

    def __call__(self, pixels_BCHW, hidden_sharding=None, kernels: LayerKernels = XLA_KERNELS):
        """float[B, 3, H, W] -> [B, 1 + G*G, D].

        `hidden_sharding` pins the activations' sharding between layers: the tile axis spread over
        all devices in encoder data-parallel mode, so no layer needs a collective. `kernels`: the layers'
        `LayerKernels`.
        """
        x = self.embeddings(pixels_BCHW)
        batch, tokens, _ = x.shape
        padding = token_padding(batch, tokens)
        kv_lengths = None
        if padding:
            x = jnp.pad(x, ((0, 0), (0, padding), (0, 0)))
            kv_lengths = jnp.full((batch,), tokens, jnp.int32)
        for index, layer in enumerate(self.layers):
            if hidden_sharding is not None:
                x = jax.lax.with_sharding_constraint(x, hidden_sharding)
            with jax.named_scope(f"vision_layer_{index}"):
                x = layer(x, kv_lengths, kernels)
        return x[:, :tokens] if padding else x


def token_padding(batch: int, tokens: int, multiple: int = 8) -> int:
    """Padding tokens per tile that make the layers' GEMMs `batch * tokens` rows a multiple of `multiple`, or 0
    when they already are. For fewer rows XLA pads every GEMM operand to that multiple itself, one copy
    each (five per layer; 1,025 rows for one 448 px tile: ~0.4 ms of a 2.6 ms call on an H100, docs/PERF.md,
    ninth session). Padding each tile once instead costs 7 rows per tile and an attention that masks them out of
    its keys (~2 us per layer at one tile)."""
    return 0 if batch * tokens % multiple == 0 else -tokens % multiple


def pixel_shuffle(x_BWHC, factor: int, ps_version: str):
    """The reference's exact op sequence (`pixel_shuffle(x, 1/factor)`): [B, W, H, C] -> [B, W/f, H/f, C*f*f].

    The reshapes interleave rows and columns in a specific order; a different but "equivalent"
    formulation permutes the channels and breaks parity with the trained projector.
    """
    batch, width, height, channels = x_BWHC.shape
    x = x_BWHC.reshape(batch, width, height // factor, channels * factor)
    x = x.transpose(0, 2, 1, 3)
    x = x.reshape(batch, height // factor, width // factor, channels * factor * factor)
    if ps_version != "v1":
        x = x.transpose(0, 2, 1, 3)
    return x


class Projector(nnx.Module):
    """Drop CLS -> pixel shuffle -> LayerNorm(eps 1e-5) -> Linear -> exact GELU -> Linear."""

    def __init__(self, config: ProjectorConfig, dtype, rngs: nnx.Rngs | None):
        i, e = config.input_size, config.text_hidden_size
        self.config = config
        self.norm = LayerNorm(i, config.norm_eps, dtype, "proj_in", rngs=rngs)
        self.fc1 = nnx.Dict(kernel=param(rngs, (i, e), ("proj_in", "embed"), dtype),
                            bias=param(rngs, (e,), ("embed",), dtype, "zeros"))
        self.fc2 = nnx.Dict(kernel=param(rngs, (e, e), ("embed_in", "embed"), dtype),
                            bias=param(rngs, (e,), ("embed",), dtype, "zeros"))

    def __call__(self, vision_BTD):
        """[B, 1 + G*G, D] -> [B, G*G/f^2, E]."""
        patches = vision_BTD[:, 1:]
        batch, count, width = patches.shape
        side = int(round(count**0.5))
        x = pixel_shuffle(patches.reshape(batch, side, side, width), self.config.shuffle_factor,
                          self.config.ps_version)
        x = x.reshape(batch, -1, x.shape[-1])
        x = jnp.einsum("bti,ie->bte", self.norm(x), self.fc1["kernel"][...]) + self.fc1["bias"][...]
        x = activation(self.config.hidden_act, x)
        return jnp.einsum("bti,ie->bte", x, self.fc2["kernel"][...]) + self.fc2["bias"][...]
