"""The vision encoder's row-wise kernels alone: XLA's fusions vs the Pallas kernels of `internvl_jax.kernels`.

    python -m bench.kernel_probe --preset InternVL3-1B --tiles 1,8,32 [--sweep] --out $OUT/kernel_probe.json

For each tile batch (rows = tiles x tokens per tile, padded as `VisionEncoder` pads them): `--depth` LayerNorms
over bf16 [rows, D], each with its own scale and bias, and `--depth` exact GELUs over bf16 [rows, F], each on
its own input, with an optimization barrier between calls (XLA would otherwise fuse a chain of them into one
kernel). XLA's (`layers.LayerNorm`, `layers.activation("gelu")`: what the model runs) against the kernels with the
tiles of `kernels.row_blocks`, then, with --sweep, every rows x warps pair (of --sweep-rows and --sweep-warps).
Prints us per call and TB/s (a read and a write of the activations); checks every kernel's output against XLA's.
--interpret runs the kernels interpreted (a CPU smoke test).
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from internvl_jax import kernels
from internvl_jax.layers import LayerNorm, activation
from internvl_jax.vision import token_padding

SWEEP_ROWS = (1, 2, 4, 8)
SWEEP_WARPS = (1, 2, 4, 8)


def _chain(step):
    """fn(xs, params) applying `step(x, param)` to each (x, param) pair, one after the other (a barrier between)."""
    def chain(xs, params):
        outs = []
        for x, param in zip(xs, params, strict=True):
            x, *_ = jax.lax.optimization_barrier((x, *outs[-1:]))
            outs.append(step(x, param))
        return outs
    return jax.jit(chain)


class Case:
    """One kernel at one size: its inputs, XLA's outputs, and the variants measured."""

    def __init__(self, label: str, xs, params, reference, moved: int, args):
        self.label, self.xs, self.params, self.reference = label, xs, params, reference
        self.moved, self.args = moved, args
        self.variants: list[dict] = []

    def measure(self, name: str, fn, blocks=None) -> None:
        try:
            timing = common.time_calls(lambda: fn(self.xs, self.params), jax.block_until_ready,
                                       repeats=self.args.repeats)
            error = max(float(np.abs(np.asarray(y, np.float32) - r).max())
                        for y, r in zip(fn(self.xs, self.params), self.reference, strict=True))
        except Exception as failure:  # a tile choice Triton cannot compile: say so and go on
            print(f"  {self.label} {name}: failed: {str(failure).splitlines()[0][:200]}", flush=True)
            self.variants.append({"variant": name, "error": str(failure)[:500]})
            return
        us = timing.seconds * 1e6 / self.args.depth
        self.variants.append({"variant": name, "us": us, "tb_per_s": self.moved / us / 1e6,
                              "max_abs_diff_vs_xla": error, "blocks": blocks and vars(blocks)})
        print(f"  {self.label} {us:8.2f} us {self.moved / us / 1e6:5.2f} TB/s  diff {error:.1e}  {name}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="InternVL3-1B")
    parser.add_argument("--tiles", default="1,8,32")
    parser.add_argument("--kernels", default="layer_norm,gelu")
    parser.add_argument("--depth", type=int, default=8, help="calls per timed program")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sweep", action="store_true", help="also every rows x warps pair")
    parser.add_argument("--sweep-rows", type=common.parse_ints, default=SWEEP_ROWS,
                        help="rows per program to sweep (comma-separated)")
    parser.add_argument("--sweep-warps", type=common.parse_ints, default=SWEEP_WARPS,
                        help="warps per program to sweep (comma-separated)")
    parser.add_argument("--interpret", action="store_true", help="run the kernels interpreted (a CPU smoke test)")
    parser.add_argument("--out", default="kernel_probe.json")
    args = parser.parse_args(argv)
    config, _ = common.load_config(args.preset)
    vision = config.vision
    tokens, eps = vision.num_patches + 1, vision.norm_eps
    keys = iter(jax.random.split(jax.random.key(0), 4 * args.depth + 64))

    def xla_norm(x, param):
        norm = LayerNorm(x.shape[1], eps, jnp.bfloat16, None)
        norm.scale.set_value(param[0])
        norm.bias.set_value(param[1])
        return norm(x)

    cases = {  # name: (width, xla step, kernel step given blocks, params of one call given a key)
        "layer_norm": (vision.hidden_size, xla_norm,
                       lambda blocks: lambda x, p: kernels.layer_norm(x, *p, eps=eps, blocks=blocks,
                                                                      interpret=args.interpret),
                       lambda key, width: ((1 + 0.1 * jax.random.normal(key, (width,))).astype(jnp.bfloat16),
                                           (0.1 * jax.random.normal(key, (width,))).astype(jnp.bfloat16))),
        "gelu": (vision.intermediate_size, lambda x, _: activation("gelu", x),
                 lambda blocks: lambda x, _: kernels.gelu(x, blocks=blocks, interpret=args.interpret),
                 lambda key, width: None),
    }
    result = {"preset": args.preset, "depth": args.depth, "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "cases": {}}
    print(f"{args.preset}: {args.depth} calls per program, {result['device']}", flush=True)
    for name in [n.strip() for n in args.kernels.split(",") if n.strip()]:
        width, xla_step, kernel_step, make_param = cases[name]
        for tiles in common.parse_ints(args.tiles):
            rows = tiles * (tokens + token_padding(tiles, tokens))
            xs = [(jax.random.normal(next(keys), (rows, width)) * 2 + 0.5).astype(jnp.bfloat16)
                  for _ in range(args.depth)]
            params = [make_param(next(keys), width) for _ in range(args.depth)]
            case = Case(f"{name} {tiles:3d} tiles ({rows:6d} x {width})", xs, params,
                        [np.asarray(y, np.float32) for y in _chain(xla_step)(xs, params)],
                        2 * rows * width * 2, args)  # bytes per call: one read and one write of bf16 [rows, width]
            case.measure("xla", _chain(xla_step))
            planned = kernels.row_blocks(rows, width)
            case.measure(f"pallas {planned} (planned)", _chain(kernel_step(planned)), planned)
            if args.sweep:
                for block_rows, warps in itertools.product(args.sweep_rows, args.sweep_warps):
                    blocks = kernels.RowBlocks(block_rows, warps)
                    if rows % block_rows == 0 and blocks != planned:
                        case.measure(f"pallas {blocks}", _chain(kernel_step(blocks)), blocks)
            result["cases"][f"{name} {tiles}"] = {"rows": rows, "width": width, "variants": case.variants}
            common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
