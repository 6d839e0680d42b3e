"""Device time of the InternViT layer's non-GEMM pieces, old formulation vs new, at the encoder's real
activation shape (32 tiles of 1,025 tokens, InternViT-300M widths, bf16):

    python -m bench.encoder_probe --tiles 32 --out $OUT/encoder_probe.json

- GELU: `jax.nn.gelu(approximate=False)` (erfc, bf16 intermediates) vs `layers.activation("gelu")`
  (erf in float32) vs the tanh approximation (for scale only: not what InternViT computes).
- q/k/v: one GEMM over the fused [D, 3, N, H] weight and three slices (what `VisionAttention` runs)
  vs three GEMMs, each followed by the attention kernel (cuDNN on GPU).
Each variant is one jitted function timed over chained calls (median of repeats).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from internvl_jax.layers import activation, attention


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=1025)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="encoder_probe.json")
    args = parser.parse_args(argv)
    b, t, d, f, n = args.tiles, args.tokens, args.width, args.mlp, args.heads
    h = d // n
    rng = np.random.default_rng(0)
    h_BTF = jnp.asarray(rng.standard_normal((b, t, f), np.float32), jnp.bfloat16)
    x_BTD = jnp.asarray(rng.standard_normal((b, t, d), np.float32), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((d, 3, n, h), np.float32) * d**-0.5, jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal((3, n, h), np.float32) * 0.02, jnp.bfloat16)

    def fused(x):
        qkv = jnp.einsum("btd,dcnh->btcnh", x, kernel) + bias
        return attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=False)

    def split(x):
        q, k, v = (jnp.einsum("btd,dnh->btnh", x, kernel[:, c]) + bias[c] for c in range(3))
        return attention(q, k, v, causal=False)

    variants = {
        "gelu: jax.nn.gelu exact (erfc, bf16 steps)": (lambda x: jax.nn.gelu(x, approximate=False), h_BTF),
        "gelu: erf in float32 (layers.activation)": (lambda x: activation("gelu", x), h_BTF),
        "gelu: tanh approximation (reference only)": (lambda x: activation("gelu_pytorch_tanh", x), h_BTF),
        "qkv: one GEMM + 3 slices + attention": (fused, x_BTD),
        "qkv: three GEMMs + attention": (split, x_BTD),
    }
    rows = []
    for name, (fn, x) in variants.items():
        jitted = jax.jit(fn)
        timing = common.time_calls(lambda jitted=jitted, x=x: jitted(x), jax.block_until_ready,
                                   repeats=args.repeats, target_s=0.05)
        rows.append({"variant": name, "us_per_call": timing.seconds * 1e6})
        print(f"{timing.seconds * 1e6:10.1f} us  {name}", flush=True)
    gelu_old = jax.jit(lambda x: jax.nn.gelu(x, approximate=False))
    gelu_new = jax.jit(lambda x: activation("gelu", x))
    reference = jax.nn.gelu(h_BTF.astype(jnp.float32), approximate=False)
    errors = {name: float(jnp.max(jnp.abs(fn(h_BTF).astype(jnp.float32) - reference)))
              for name, fn in (("jax.nn.gelu exact", gelu_old), ("erf float32", gelu_new))}
    result = {"shape": {"tiles": b, "tokens": t, "width": d, "mlp": f, "heads": n},
              "device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
              "rows": rows, "gelu_max_abs_error_vs_float32": errors}
    print("max |error| vs float32 GELU:", errors)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
