"""The decode step's MLP: XLA's GEMMs vs the Pallas kernels of `internvl_jax.kernels`, at a model's real widths.

    python -m bench.mlp_probe --preset InternVL3-1B --rows 16,32,64 --out $OUT/mlp_probe.json

Each variant is one jitted chain of the model's decoder depth of MLP blocks, `x = x + mlp_l(rms(x))`, every layer
with its own weights (so they stream from HBM, as in a decode step), timed over chained calls (median of repeats).
The kernels' tiles from `kernels.plan` (what the server runs) come first; with --sweep, the gate/up kernel's tiles
are then swept with a fixed down kernel, and the down kernel's with the best gate/up. Prints us per layer and the
weights' TB/s, checks every Pallas chain against XLA's output, and profiles the XLA chain and the planned tiles'
(kernels per layer, us each). --interpret runs the kernels interpreted: a smoke test on CPU.
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from bench.profiler import capture_trace, summarize_trace
from internvl_jax import kernels

UP_SWEEP = [kernels.Blocks(n=n, k=k, stages=s) for n, k, s in itertools.product((16, 32, 64), (64, 128), (2, 3, 4))]
DOWN_SWEEP = [kernels.Blocks(n=n, k=k, split=split, stages=s)
              for n, (k, split), s in itertools.product((16, 32, 64), ((128, 1), (128, 2), (64, 4), (64, 19),
                                                                         (128, 19)), (3, 4))]


def _rms(x):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + 1e-6)).astype(x.dtype)


def xla_chain(x, layers):
    for gate, up, down in layers:
        h = _rms(x)
        x = x + jnp.einsum("mi,ie->me", jax.nn.silu(h @ gate) * (h @ up), down)
    return x


def pallas_chain(x, layers, tiles: kernels.Plan, interpret: bool):
    for gate, up, down in layers:
        x = (x.astype(jnp.float32) + kernels.mlp(_rms(x), gate, up, down, tiles=tiles, interpret=interpret)
             ).astype(x.dtype)
    return x


def _profile(fn, args, calls=3):
    jax.block_until_ready(fn(*args))
    trace = capture_trace(lambda: fn(*args), calls)
    return summarize_trace(trace, {}, calls) if trace is not None else None


class Probe:
    """The variants of one row count M."""

    def __init__(self, x, layers, args, layer_bytes: int):
        self.x, self.layers, self.args, self.layer_bytes = x, layers, args, layer_bytes
        self.xla = jax.jit(xla_chain)
        self.reference = np.asarray(self.xla(x, layers), np.float32)
        self.scale = float(np.abs(self.reference).max())
        self.rows: list[dict] = []

    def pallas(self, tiles: kernels.Plan):
        return jax.jit(lambda x, w: pallas_chain(x, w, tiles, self.args.interpret))

    def measure(self, name: str, fn, tiles: kernels.Plan | None = None) -> float | None:
        depth, m = len(self.layers), self.x.shape[0]
        try:
            timing = common.time_calls(lambda: fn(self.x, self.layers), jax.block_until_ready,
                                       repeats=self.args.repeats)
            out = np.asarray(fn(self.x, self.layers), np.float32)
        except Exception as failure:  # a tile choice Triton cannot compile: say so and go on
            print(f"  M={m:3d} {name}: failed: {str(failure).splitlines()[0][:200]}", flush=True)
            self.rows.append({"variant": name, "error": str(failure)[:500]})
            return None
        error = float(np.abs(out - self.reference).max()) / self.scale
        us = timing.seconds * 1e6 / depth
        self.rows.append({"variant": name, "us_per_layer": us, "tb_per_s": self.layer_bytes / us / 1e6,
                          "max_abs_error_over_max": error,
                          "tiles": tiles and {"up": vars(tiles.up), "down": vars(tiles.down)}})
        print(f"  M={m:3d} {us:8.2f} us/layer {self.layer_bytes / us / 1e6:5.2f} TB/s  err {error:.1e}  {name}",
              flush=True)
        return us

    def sweep(self, start: kernels.Plan) -> tuple[kernels.Plan, float]:
        """The fastest tiles: gate/up's swept with `start`'s down, then down's with the best gate/up."""
        best, best_us = start, float("inf")
        with common.progress(len(UP_SWEEP) + len(DOWN_SWEEP), f"M={self.x.shape[0]} tiles") as bar:
            for up in UP_SWEEP:
                tiles = kernels.Plan(up, start.down)
                us = self.measure(f"pallas up={up} down={start.down}", self.pallas(tiles), tiles)
                if us is not None and us < best_us:
                    best, best_us = tiles, us
                bar.update(1)
            for down in DOWN_SWEEP:
                tiles = kernels.Plan(best.up, down)
                if self.layers[0][2].shape[0] % (down.k * down.split) == 0:  # down.k * split divides I
                    us = self.measure(f"pallas up={best.up} down={down}", self.pallas(tiles), tiles)
                    if us is not None and us < best_us:
                        best, best_us = tiles, us
                bar.update(1)
        return best, best_us


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="InternVL3-1B")
    parser.add_argument("--layers", type=int, default=None, help="default: the preset's decoder depth")
    parser.add_argument("--rows", default="16,32,64", help="decode rows (M), comma-separated, each 16 to 64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sweep", action="store_true", help="also sweep the kernels' tiles")
    parser.add_argument("--interpret", action="store_true", help="run the kernels interpreted (a CPU smoke test)")
    parser.add_argument("--out", default="mlp_probe.json")
    args = parser.parse_args(argv)
    config, _ = common.load_config(args.preset)
    e, i = config.text.hidden_size, config.text.intermediate_size
    depth = args.layers or config.text.num_layers
    rows = common.parse_ints(args.rows)
    keys = iter(jax.random.split(jax.random.key(0), 3 * depth + len(rows)))

    def weight(shape):  # drawn on the device: an 8B's 11 GB of MLP weights in seconds
        return (jax.random.normal(next(keys), shape, jnp.float32) * shape[0] ** -0.5).astype(jnp.bfloat16)

    layers = [(weight((e, i)), weight((e, i)), weight((i, e))) for _ in range(depth)]
    result = {"preset": args.preset, "width": e, "mlp": i, "layers": depth, "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "rows": {}}
    print(f"{args.preset}: E={e} I={i}, {depth} layers, {jax.devices()[0].device_kind}", flush=True)
    for m in rows:
        tiles = kernels.plan(m, e, i)
        if tiles is None:
            print(f"  M={m}: the kernels do not apply (kernels.plan)", flush=True)
            continue
        x = jax.random.normal(next(keys), (m, e), jnp.float32).astype(jnp.bfloat16)
        probe = Probe(x, layers, args, 3 * e * i * 2)
        entry = {"xla_us_per_layer": probe.measure("xla", probe.xla),
                 "planned_us_per_layer": probe.measure(f"pallas planned {tiles}", probe.pallas(tiles), tiles),
                 "planned": {"up": vars(tiles.up), "down": vars(tiles.down)}}
        if args.sweep:
            best, _ = probe.sweep(tiles)
            entry["best"] = {"up": vars(best.up), "down": vars(best.down)}
            entry["again"] = {"xla": probe.measure("xla (again)", probe.xla),
                              "best": probe.measure(f"best again: {best}", probe.pallas(best), best)}
        entry["profile_xla"] = _profile(probe.xla, (x, layers))
        entry["profile_planned"] = _profile(probe.pallas(tiles), (x, layers))
        entry["variants"] = probe.rows
        result["rows"][str(m)] = entry
        common.write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
