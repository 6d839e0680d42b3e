"""The Pallas kernels (`internvl_jax.kernels`), run interpreted on CPU. The decode MLP: the same MLP as XLA's GEMMs
alone and split over a mesh, their tiles, and the shapes they refuse."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from internvl_jax import kernels, sharding


def operands(m, e, i, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, e), np.float32)
    gate, up = (rng.standard_normal((e, i), np.float32) * e**-0.5 for _ in range(2))
    down = rng.standard_normal((i, e), np.float32) * i**-0.5
    return tuple(jnp.asarray(a, dtype) for a in (x, gate, up, down))


def reference_mlp(x, gate, up, down):
    x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
    g = x @ gate
    return (g / (1 + np.exp(-g)) * (x @ up)) @ down


@pytest.mark.parametrize("m,e,i", [(16, 64, 96), (32, 128, 256), (64, 256, 512), (16, 896, 4864)])
def test_the_planned_kernels_compute_the_mlp(m, e, i):
    tiles = kernels.plan(m, e, i)
    x, gate, up, down = operands(m, e, i)
    out = kernels.mlp(x, gate, up, down, tiles=tiles, interpret=True)
    assert out.dtype == jnp.float32 and out.shape == (m, e)
    expected = reference_mlp(x, gate, up, down)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_split_k_partials_sum_to_the_product():
    _, _, _, down = operands(16, 128, 512)
    a = jnp.asarray(np.random.default_rng(1).standard_normal((16, 512)), jnp.float32)
    partials = kernels.down_partials(a, down, blocks=kernels.Blocks(n=32, k=64, split=4), interpret=True)
    assert partials.shape == (4, 16, 128)
    np.testing.assert_allclose(np.asarray(partials[1]), np.asarray(a[:, 128:256] @ down[128:256]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(partials.sum(0)), np.asarray(a @ down), atol=1e-4)


def test_bfloat16_inputs_accumulate_in_float32():
    x, gate, up, down = operands(32, 128, 256, dtype=jnp.bfloat16)
    out = kernels.mlp(x, gate, up, down, tiles=kernels.plan(32, 128, 256), interpret=True)
    expected = reference_mlp(x, gate, up, down)
    # gate/up's product is rounded to bfloat16 once (the kernel's output dtype), as XLA's path rounds it
    assert np.abs(np.asarray(out) - expected).max() <= 2e-2 * np.abs(expected).max()


def test_plan_covers_the_decode_rows_and_widths_it_is_measured_for():
    one_b = kernels.plan(32, 896, 4864)  # InternVL3-1B: the sweep's fastest tiles
    assert one_b.up == kernels.Blocks(n=64, k=128, stages=4)
    assert one_b.down == kernels.Blocks(n=32, k=64, split=19, stages=3)  # 76 steps of 64 rows: 19 slices of 4
    assert kernels.plan(16, 1536, 8960).down.split == 35  # InternVL3-2B: 140 steps, slices of 4
    assert kernels.plan(16, 896, 2432).down.split == 2  # the 1B's MLP over two devices: 38 steps
    assert kernels.plan(16, 64, 96) == kernels.Plan(kernels.Blocks(n=32, k=64, stages=4),
                                                    kernels.Blocks(n=32, k=32, split=1, stages=3))
    for rows in (1, 8, 48, 128):  # below 16 rows or above 64, or not a power of two: XLA's GEMMs
        assert kernels.plan(rows, 896, 4864) is None
    assert kernels.plan(16, 100, 4864) is None and kernels.plan(16, 896, 4870) is None
    assert not kernels.available()  # CPU: the runner offers XLA's GEMMs only


def test_shapes_the_tiles_do_not_divide_are_refused_by_name():
    x, gate, up, down = operands(16, 64, 96)
    with pytest.raises(ValueError, match="gated_up: width E 64 is not a multiple of the block 128"):
        kernels.gated_up(x, gate, up, blocks=kernels.Blocks(n=32, k=128), interpret=True)
    with pytest.raises(ValueError, match="down_partials: MLP width I 96 is not a multiple of the block 128"):
        kernels.down_partials(jnp.zeros((16, 96)), down, blocks=kernels.Blocks(n=32, k=64, split=2), interpret=True)


@pytest.mark.parametrize("data,model", [(1, 2), (2, 2), (2, 1)])
def test_the_sharded_mlp_equals_one_device(data, model):
    """Rows over "data" (replicas), the MLP width over "model" (gate/up by columns, down by rows, summed)."""
    mesh = sharding.make_mesh(data, model)
    m, e, i = 16 * data, 64, 192
    x, gate, up, down = operands(m, e, i, seed=2)
    mlp_axis = sharding.MODEL if model > 1 else None

    def put(array, *spec):
        return jax.device_put(array, NamedSharding(mesh, PartitionSpec(*spec)))

    fn = kernels.sharded_mlp(mesh, sharding.DATA, mlp_axis, kernels.plan(16, e, i // model), interpret=True)
    out = jax.jit(fn)(put(x, sharding.DATA), put(gate, None, mlp_axis), put(up, None, mlp_axis),
                      put(down, mlp_axis, None))
    expected = reference_mlp(x, gate, up, down)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=2e-5 * np.abs(expected).max())


# ---- the vision encoder's LayerNorm and GELU ------------------------------------------------------------------


def layer_norm_operands(m, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, d)) * 3 + 1
    scale, bias = 1 + 0.2 * rng.standard_normal(d), 0.2 * rng.standard_normal(d)
    return tuple(jnp.asarray(a, dtype) for a in (x, scale, bias))


def xla_layer_norm(x, scale, bias, eps):
    from flax import nnx

    from internvl_jax.layers import LayerNorm

    norm = LayerNorm(x.shape[-1], eps, x.dtype, None, rngs=nnx.Rngs(0))
    norm.scale.set_value(scale)
    norm.bias.set_value(bias)
    return norm(x)


@pytest.mark.parametrize("m,d,dtype", [(72, 32, jnp.float32), (65, 64, jnp.bfloat16), (1032, 1024, jnp.bfloat16)])
def test_the_layer_norm_kernel_is_the_models_layer_norm(m, d, dtype):
    x, scale, bias = layer_norm_operands(m, d, dtype)
    out = kernels.layer_norm(x, scale, bias, eps=1e-6, blocks=kernels.row_blocks(m, d), interpret=True)
    expected = np.asarray(xla_layer_norm(x, scale, bias, 1e-6), np.float32)
    assert out.dtype == dtype and out.shape == (m, d)
    if dtype == jnp.float32:
        np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=5e-6)
    else:  # statistics summed in another order: at most one bf16 step apart, and rarely
        differs = np.asarray(out, np.float32) != expected
        assert differs.mean() < 1e-3
        assert np.all(np.abs(np.asarray(out, np.float32) - expected) <= 2 ** -7 * np.abs(expected) + 1e-6)
    if m % 8 == 0:  # blocks of 8 rows: the same rows (sums in another order: one rounding step apart at most)
        eight = kernels.layer_norm(x, scale, bias, eps=1e-6, blocks=kernels.RowBlocks(rows=8, warps=4), interpret=True)
        np.testing.assert_allclose(np.asarray(eight, np.float32), np.asarray(out, np.float32), rtol=2 ** -7, atol=1e-6)


def test_the_gelu_kernel_is_the_exact_gelu():
    """Its own erf (Pallas's Triton lowering has none) is within 5e-7 of the exact GELU in float32, and in bf16 it
    is the model's XLA GELU (up to a rounding step) wherever XLA's 1 + erf does not cancel (x > -2)."""
    import math

    from internvl_jax.layers import activation

    x = np.linspace(-9, 9, 64 * 1024, dtype=np.float32).reshape(-1, 64)
    exact = np.vectorize(lambda v: 0.5 * v * math.erfc(-v / math.sqrt(2)))(x.astype(np.float64))
    out = kernels.gelu(jnp.asarray(x), blocks=kernels.row_blocks(len(x), 64), interpret=True)
    np.testing.assert_allclose(np.asarray(out), exact, rtol=0, atol=5e-7)
    # the negative tail keeps its relative precision (XLA's 1 + erf cancels there): 0.2% down to x = -5
    tail = x > -5
    assert np.all(np.abs(np.asarray(out) - exact)[tail] <= 2e-3 * np.abs(exact)[tail] + 1e-12)
    h = jnp.asarray(np.random.default_rng(3).standard_normal((256, 512)) * 1.5, jnp.bfloat16)
    ours = np.asarray(kernels.gelu(h, blocks=kernels.row_blocks(256, 512), interpret=True), np.float32)
    theirs = np.asarray(activation("gelu", h), np.float32)
    above = np.asarray(h, np.float32) > -2  # at most a bf16 rounding step apart (two polynomials for erf)
    np.testing.assert_allclose(ours[above], theirs[above], rtol=2 ** -8, atol=0)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5)


def test_row_blocks_take_power_of_two_widths():
    assert kernels.row_blocks(32800, 1024) == kernels.RowBlocks(rows=1, warps=2)  # InternViT-300M's LayerNorm
    assert kernels.row_blocks(1032, 4096) == kernels.RowBlocks(rows=1, warps=8)  # its GELU
    assert kernels.row_blocks(65, 32) == kernels.RowBlocks(rows=1, warps=1)
    for width in (3200, 12800, 8, 16384, 80):  # InternViT-6B's widths, too narrow, too wide, not a power of two
        assert kernels.row_blocks(1024, width) is None
    with pytest.raises(ValueError, match="layer_norm: rows M 65 is not a multiple of the block 2"):
        kernels.layer_norm(*layer_norm_operands(65, 32, jnp.float32), eps=1e-6,
                           blocks=kernels.RowBlocks(rows=2), interpret=True)


@pytest.mark.parametrize("tiles_axis,width_axis",
                         [((sharding.DATA, sharding.MODEL), None), (sharding.DATA, sharding.MODEL)])
def test_the_sharded_row_kernels_equal_one_device(tiles_axis, width_axis):
    """Encoder data mode (tiles over every device) and weights mode (tiles over "data", the GELU's width over
    "model"): each device runs the kernels on its own block, and the result is the whole arrays'."""
    mesh = sharding.make_mesh(2, 2)
    x, scale, bias = layer_norm_operands(4 * 9, 32, jnp.float32, seed=5)
    x = x.reshape(4, 9, 32)
    put = functools.partial(jax.device_put, device=NamedSharding(mesh, PartitionSpec(tiles_axis, None, width_axis)))
    norm = jax.jit(kernels.sharded_layer_norm(mesh, tiles_axis, interpret=True), static_argnums=(3,))(
        put(x) if width_axis is None else jax.device_put(x, NamedSharding(mesh, PartitionSpec(tiles_axis))),
        scale, bias, 1e-6)
    np.testing.assert_allclose(np.asarray(norm), np.asarray(xla_layer_norm(x, scale, bias, 1e-6)), atol=5e-6)
    h = put(x * 0.7)
    out = jax.jit(kernels.sharded_gelu(mesh, tiles_axis, width_axis, interpret=True))(h)
    assert out.sharding.spec == PartitionSpec(tiles_axis, None, width_axis)
    expected = kernels.gelu(np.asarray(x * 0.7).reshape(-1, 32), blocks=kernels.RowBlocks(1, 1), interpret=True)
    np.testing.assert_allclose(np.asarray(out).reshape(-1, 32), np.asarray(expected), rtol=0, atol=1e-7)
