"""The decode MLP's Pallas kernels (`internvl_jax.kernels`), run interpreted on CPU: the same MLP as XLA's GEMMs
alone and split over a mesh, their tiles, and the shapes they refuse."""

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
