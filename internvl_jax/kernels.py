"""Hand-written GPU kernels (Pallas) for the decode step's MLP, where XLA's GEMMs are far from the HBM roofline.

A decode step multiplies a few rows (M = the decode slots, 16 to 64) by every weight of the model once: the MLP's
gate/up and down GEMMs are ~85% of the bytes. At a 1B model's widths XLA emits them at 1.1-1.6 TB/s (ninth
session's profile: with E = 896 each output tile has a short loop, and N / 128 tiles leave SMs idle). These
kernels stream the weights in narrow column blocks, so that every SM has work, and fuse the element-wise work
around the GEMMs:

- `gated_up`: x [M, E] -> silu(x @ W_gate) * (x @ W_up) [M, I] in one kernel (XLA: one GEMM + one fusion).
- `down_partials`: a [M, I] -> float32 partial products [S, M, E] of S slices of I (split-K); `mlp` sums them.

Whether they beat XLA depends on the widths (an 8B's large GEMMs run at ~3.8 TB/s from XLA; these do not), so
the runner measures both at start-up (`Runner.time_decode_mlps`). Shapes: M rows, E model width, I MLP width,
S split-K slices. `interpret=True` runs them on any backend (the CPU tests); on GPU they compile through Pallas's
Triton backend (deprecated since JAX 0.11 in favour of Mosaic GPU: when it is gone, `available()` is False and
decode keeps XLA's GEMMs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
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
    if interpret:
        return None
    from jax.experimental.pallas import triton as pallas_triton

    return pallas_triton.CompilerParams(num_warps=blocks.warps, num_stages=blocks.stages)


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
