"""Hand-written GPU kernels (Pallas) where XLA's are far from the HBM roofline: the decode step's MLP, and the
vision encoder's LayerNorm and GELU.

A decode step multiplies a few rows (M = the decode slots, 16 to 64) by every weight of the model once: the MLP's
gate/up and down GEMMs are ~85% of the bytes. At a 1B model's widths XLA emits them at 1.1-1.6 TB/s (ninth
session's profile: with E = 896 each output tile has a short loop, and N / 128 tiles leave SMs idle). These
kernels stream the weights in narrow column blocks, so that every SM has work, and fuse the element-wise work
around the GEMMs:

- `gated_up`: x [M, E] -> silu(x @ W_gate) * (x @ W_up) [M, I] in one kernel (XLA: one GEMM + one fusion).
- `down_partials`: a [M, I] -> float32 partial products [S, M, E] of S slices of I (split-K); `mlp` sums them.

Whether they beat XLA depends on the widths (an 8B's large GEMMs run at ~3.8 TB/s from XLA; these do not), so
the runner measures both at start-up (`Runner.time_decode_mlps`).

- `layer_norm` and `gelu`: InternViT's pre-norms ([M, D] rows normalised with float32 statistics) and its MLP's
  exact GELU, a row per program. Inside an encoder call XLA's normalization fusion streams the 1,024-wide bf16 rows
  at ~1.4 TB/s on an H200 (two per layer: ~9% of the call) and its GELU fusion at ~2.4 TB/s (~11%); these run at
  3.7 and 2.8 TB/s there (docs/PERF.md, seventeenth session). The runner measures XLA's and these on a few vision
  layers at start-up (`Runner.time_encoder_kernels`).

Shapes: M rows, E model width, I MLP width, S split-K slices. `interpret=True` runs the kernels on any backend (the
CPU tests); on GPU they compile through Pallas's Triton backend (deprecated since JAX 0.11 in favour of Mosaic GPU:
when it is gone, `available()` is False and the runner keeps XLA's).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.sharding import Mesh, PartitionSpec

MIN_ROWS = 16  # a Triton dot's smallest M
MAX_ROWS = 64  # two float32 accumulators of [64, 64] per program stay in registers; more rows would re-read weights
DOWN_STEPS = 4  # K steps per down program: more split-K slices rather than longer loops (measured best)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes of one kernel: `n` output columns per program, `k` reduction rows per loop step, `split` K
    slices (down only), Triton's warps and pipeline stages."""

    n: int = 64
    k: int = 128
    split: int = 1
    warps: int = 4
    stages: int = 4


@dataclasses.dataclass(frozen=True)
class Plan:
    """The tiles of both kernels for one (M, E, I), from `plan`."""

    up: Blocks
    down: Blocks


def available() -> bool:
    """True when the kernels compile here: a GPU backend with Pallas's Triton lowering."""
    if jax.default_backend() != "gpu":
        return False
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _largest_block(size: int, blocks: tuple[int, ...]) -> int | None:
    return next((block for block in blocks if size % block == 0), None)


def plan(rows: int, width: int, mlp_width: int) -> Plan | None:
    """Tiles for M = `rows`, E = `width`, I = `mlp_width` (one device's share), or None when the kernels do not
    apply: M not a power of two from 16 to 64 (below, XLA's GEMMs are as fast once the padding to 16 is
    counted: docs/PERF.md; above, GEMMs are less skinny), or widths not multiples of 16. The tiles are the
    fastest of a sweep on an H200 at the 1B's widths (`python -m bench.mlp_probe --sweep`), smaller where a
    width needs it: 64 gate/up columns per program over 128-row steps; down over 32 columns and split-K slices
    of 4 steps of 64 rows."""
    if not MIN_ROWS <= rows <= MAX_ROWS or rows & (rows - 1):
        return None
    up_k, up_n = _largest_block(width, (128, 64, 32, 16)), _largest_block(mlp_width, (64, 32, 16))
    down_n, down_k = _largest_block(width, (32, 16)), _largest_block(mlp_width, (64, 32, 16))
    if None in (up_k, up_n, down_n, down_k):
        return None
    chunks = mlp_width // down_k  # down's K steps in all
    split = max(d for d in range(1, chunks + 1) if chunks % d == 0 and chunks // d >= min(DOWN_STEPS, chunks))
    return Plan(Blocks(n=up_n, k=up_k, stages=4), Blocks(n=down_n, k=down_k, split=split, stages=3))


def _compiler_params(blocks: Blocks, interpret: bool):
    return _triton_params(blocks.warps, blocks.stages, interpret)


def _triton_params(warps: int, stages: int, interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pallas_triton

    return pallas_triton.CompilerParams(num_warps=warps, num_stages=stages)


def _check(name: str, size: int, block: int, what: str) -> None:
    if size % block:
        raise ValueError(f"{name}: {what} {size} is not a multiple of the block {block}")


def gated_up(x_ME, gate_EI, up_EI, *, blocks: Blocks, interpret: bool = False):
    """silu(x @ gate) * (x @ up), accumulated in float32, returned in x's dtype: [M, I]."""
    m, e = x_ME.shape
    i = gate_EI.shape[1]
    _check("gated_up", e, blocks.k, "width E")
    _check("gated_up", i, blocks.n, "MLP width I")
    steps = e // blocks.k

    def kernel(x_ref, gate_ref, up_ref, out_ref):
        def body(step, carry):
            g, u = carry
            columns = pl.ds(pl.multiple_of(step * blocks.k, blocks.k), blocks.k)
            x = x_ref[:, columns]
            g += jnp.dot(x, gate_ref[columns, :], preferred_element_type=jnp.float32)
            u += jnp.dot(x, up_ref[columns, :], preferred_element_type=jnp.float32)
            return g, u

        zeros = jnp.zeros((m, blocks.n), jnp.float32)
        g, u = jax.lax.fori_loop(0, steps, body, (zeros, zeros))
        out_ref[...] = (g * jax.nn.sigmoid(g) * u).astype(out_ref.dtype)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, i), x_ME.dtype),
        grid=(i // blocks.n,),
        in_specs=[pl.BlockSpec((m, e), lambda j: (0, 0)),
                  pl.BlockSpec((e, blocks.n), lambda j: (0, j)),
                  pl.BlockSpec((e, blocks.n), lambda j: (0, j))],
        out_specs=pl.BlockSpec((m, blocks.n), lambda j: (0, j)),
        compiler_params=_compiler_params(blocks, interpret),
        interpret=interpret,
        name="gated_up",
    )(x_ME, gate_EI, up_EI)


def down_partials(a_MI, down_IE, *, blocks: Blocks, interpret: bool = False):
    """float32[S, M, E]: a @ down over S consecutive slices of I; their sum is a @ down."""
    m, i = a_MI.shape
    e = down_IE.shape[1]
    _check("down_partials", i, blocks.k * blocks.split, "MLP width I")
    _check("down_partials", e, blocks.n, "width E")
    steps = i // (blocks.k * blocks.split)
    span = steps * blocks.k

    def kernel(a_ref, down_ref, out_ref):
        def body(step, acc):
            rows_k = pl.ds(pl.multiple_of(step * blocks.k, blocks.k), blocks.k)
            return acc + jnp.dot(a_ref[:, rows_k], down_ref[rows_k, :], preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((m, blocks.n), jnp.float32))
        out_ref[...] = acc[None]

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((blocks.split, m, e), jnp.float32),
        grid=(e // blocks.n, blocks.split),
        in_specs=[pl.BlockSpec((m, span), lambda j, s: (0, s)),
                  pl.BlockSpec((span, blocks.n), lambda j, s: (s, j))],
        out_specs=pl.BlockSpec((1, m, blocks.n), lambda j, s: (s, 0, j)),
        compiler_params=_compiler_params(blocks, interpret),
        interpret=interpret,
        name="down_partials",
    )(a_MI, down_IE)


def mlp(x_ME, gate_EI, up_EI, down_IE, *, tiles: Plan, interpret: bool = False):
    """The SwiGLU MLP of M rows: float32[M, E] (x @ W_down of silu(x @ W_gate) * (x @ W_up), no residual)."""
    a = gated_up(x_ME, gate_EI, up_EI, blocks=tiles.up, interpret=interpret)
    return down_partials(a, down_IE, blocks=tiles.down, interpret=interpret).sum(0)


def sharded_mlp(mesh: Mesh, row_axis: str | None, mlp_axis: str | None, tiles: Plan, interpret: bool = False):
    """`mlp` over a mesh: rows split over `row_axis` (data-parallel replicas), the MLP width over `mlp_axis`
    (tensor parallel: gate/up by columns, down by rows, the partial outputs summed over the axis). Returns
    fn(x [M, E], gate [E, I], up [E, I], down [I, E]) -> float32[M, E]."""
    def local(x, gate, up, down):
        out = mlp(x, gate, up, down, tiles=tiles, interpret=interpret)
        return jax.lax.psum(out, mlp_axis) if mlp_axis is not None else out

    rows, columns = PartitionSpec(row_axis, None), PartitionSpec(None, mlp_axis)
    # A jit of its own: a decode program calls it once per layer with the same shapes, and JAX lowers (to Triton
    # IR) each distinct jitted function once per program, not once per call.
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(rows, columns, columns, PartitionSpec(mlp_axis, None)),
                                 out_specs=rows, check_vma=False))


# ---- the vision encoder's row-wise kernels: LayerNorm and GELU ---------------------------------------------

ROW_WIDTHS = (16, 8192)  # row widths the kernels take: powers of two in this range (a Triton block is a power of two)


@dataclasses.dataclass(frozen=True)
class RowBlocks:
    """Tiles of a row-wise kernel: `rows` per program, Triton's warps."""

    rows: int = 1
    warps: int = 2


def row_blocks(rows: int, width: int) -> RowBlocks | None:
    """Tiles for M = `rows` rows of width `width`, or None when the kernels do not apply: a width not a power of
    two in ROW_WIDTHS (InternViT-300M's 1,024 and 4,096 are; InternViT-6B's 3,200 is not and keeps XLA's). One
    row per program, a warp per 512 values (at most 8): the fastest of a sweep on an H200 at 1 to 32 tiles for the
    LayerNorm at 1,024 (`python -m bench.kernel_probe --sweep`, docs/PERF.md, seventeenth session)."""
    if not ROW_WIDTHS[0] <= width <= ROW_WIDTHS[1] or width & (width - 1) or rows < 1:
        return None
    return RowBlocks(rows=1, warps=max(1, min(8, width // 512)))


def _row_call(kernel, name: str, x_MD, vectors: tuple, blocks: RowBlocks, interpret: bool):
    """`kernel(x_ref, *vector_refs, out_ref)` over blocks of `blocks.rows` rows of x [M, D] (each vector [D] whole
    in every program): [M, D] in x's dtype."""
    m, d = x_MD.shape
    _check(name, m, blocks.rows, "rows M")
    rows = pl.BlockSpec((blocks.rows, d), lambda i: (i, 0))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, d), x_MD.dtype),
        grid=(m // blocks.rows,),
        in_specs=[rows, *(pl.BlockSpec((1, d), lambda i: (0, 0)) for _ in vectors)],
        out_specs=rows,
        compiler_params=_triton_params(blocks.warps, 1, interpret),
        interpret=interpret,
        name=name,
    )(x_MD, *(vector.reshape(1, d) for vector in vectors))


def layer_norm(x_MD, scale_D, bias_D, *, eps: float, blocks: RowBlocks, interpret: bool = False):
    """(x - mean) / sqrt(var + eps) * scale + bias over each row, statistics in float32 (as torch does for half
    precision, and `layers.LayerNorm`), returned in x's dtype: [M, D]."""
    def kernel(x_ref, scale_ref, bias_ref, out_ref):
        x = x_ref[...].astype(jnp.float32)
        mean = jnp.mean(x, axis=1, keepdims=True)
        centred = x - mean
        var = jnp.mean(centred * centred, axis=1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + eps) * scale_ref[...].astype(jnp.float32)
        out_ref[...] = (y + bias_ref[...].astype(jnp.float32)).astype(out_ref.dtype)

    return _row_call(kernel, "layer_norm", x_MD, (scale_D, bias_D), blocks, interpret)


# erfc(z) ~ t (A1 + t (A2 + ... + t A5)) exp(-z^2) with t = 1 / (1 + P z), for z >= 0, to 1.5e-7 (Hastings's
# approximation, Abramowitz & Stegun 7.1.26). Pallas's Triton lowering has no erf primitive.
ERFC_P = 0.3275911
ERFC_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _one_plus_erf(z):
    """1 + erf(z) in float32 from `ERFC_A`: erfc(-z) for z < 0 and 2 - erfc(z) otherwise, so the small values
    of the negative tail keep their relative precision (no 1 - (1 - e) cancellation)."""
    a = jnp.abs(z)
    t = 1.0 / (1.0 + ERFC_P * a)
    poly = ERFC_A[-1]
    for coefficient in reversed(ERFC_A[:-1]):
        poly = coefficient + t * poly
    erfc = t * poly * jnp.exp(-a * a)
    return jnp.where(z < 0, erfc, 2.0 - erfc)


def gelu(x_MF, *, blocks: RowBlocks, interpret: bool = False):
    """Exact (erf) GELU of every element, x / 2 * (1 + erf(x / sqrt 2)) in float32 and rounded once, as
    `layers.activation("gelu")` (whose erf is XLA's; this one's is `_one_plus_erf`, within 1.5e-7): [M, F]."""
    def kernel(x_ref, out_ref):
        x = x_ref[...].astype(jnp.float32)
        out_ref[...] = (0.5 * x * _one_plus_erf(x * np.float32(np.sqrt(0.5)))).astype(out_ref.dtype)

    return _row_call(kernel, "gelu", x_MF, (), blocks, interpret)


def _on_rows(fn, x_BTD, *vectors):
    """fn(x [M, D], *vectors, blocks=...) on x [B, T, D] seen as B*T rows."""
    batch, tokens, width = x_BTD.shape
    blocks = row_blocks(batch * tokens, width)
    if blocks is None:
        raise ValueError(f"{getattr(fn, '__name__', fn)}: width {width} is not a power of two from {ROW_WIDTHS[0]} "
                         f"to {ROW_WIDTHS[1]}")
    return fn(x_BTD.reshape(batch * tokens, width), *vectors, blocks=blocks).reshape(batch, tokens, width)


def sharded_layer_norm(mesh: Mesh, tiles_axis, interpret: bool = False):
    """`layer_norm` over a mesh for activations [B, T, D] whose B is split over `tiles_axis` (the encoder's tile
    sharding; devices that share tiles compute the same rows). Returns fn(x [B, T, D], scale [D], bias [D], eps)."""
    rows = PartitionSpec(tiles_axis, None, None)

    def apply(x, scale, bias, eps: float):
        local = functools.partial(_on_rows, functools.partial(layer_norm, eps=eps, interpret=interpret))
        return jax.shard_map(local, mesh=mesh, in_specs=(rows, PartitionSpec(), PartitionSpec()), out_specs=rows,
                             check_vma=False)(x, scale, bias)

    # A jit of its own (as `sharded_mlp`): JAX lowers a jitted function once per program and shapes, where each
    # bare pallas_call would be lowered to Triton again at each of the encoder's 48 calls (+10 s of a cold start's
    # lowering for 8 encode programs, seventeenth session).
    return jax.jit(apply, static_argnums=(3,))


def sharded_gelu(mesh: Mesh, tiles_axis, width_axis, interpret: bool = False):
    """`gelu` over a mesh for activations [B, T, F] whose B is split over `tiles_axis` and F over `width_axis`
    (the MLP's hidden width in the encoder's weights mode). Returns fn(x [B, T, F])."""
    spec = PartitionSpec(tiles_axis, None, width_axis)
    local = functools.partial(_on_rows, functools.partial(gelu, interpret=interpret))
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,), out_specs=spec, check_vma=False))
