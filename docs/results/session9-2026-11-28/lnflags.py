"""LayerNorm (the model's two-pass form) and LN + fc1 + GELU at 32 tiles, under XLA options that may turn off its
Triton normalization fusion (none of them is a compile option of jax 0.11.2's XLA: each is reported as an error)."""

import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.layers import _gelu_erf

bf = jnp.bfloat16
rng = np.random.default_rng(0)
D, F, T = 1024, 4096, int(os.environ.get("LN_T", 32 * 1025))
x = jnp.asarray(rng.normal(size=(T, D)), bf)
s = jnp.asarray(1 + 0.1 * rng.normal(size=(D,)), bf)
b = jnp.asarray(0.1 * rng.normal(size=(D,)), bf)
W1 = jnp.asarray(0.02 * rng.normal(size=(D, F)), bf)
b1 = jnp.asarray(0.02 * rng.normal(size=(F,)), bf)


def ln(x, s, b):  # the model's LayerNorm.__call__
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + 1e-6) * s.astype(jnp.float32) + b.astype(jnp.float32)
    return y.astype(x.dtype)


def ln_fc1(x, s, b, W1, b1):
    return _gelu_erf(ln(x, s, b) @ W1 + b1)


base = {"xla_gpu_enable_triton_gemm": False}
variants = {
    "default": {},
    "softmax_fusion off": {"xla_gpu_enable_triton_softmax_fusion": False},
    "priority softmax off": {"xla_gpu_experimental_enable_triton_softmax_priority_fusion": False},
    "triton_fusion_level 1": {"xla_gpu_triton_fusion_level": 1},
}
out = {}
for name, f, args in (("LN", ln, (x, s, b)), ("LN+fc1+GELU", ln_fc1, (x, s, b, W1, b1))):
    for vname, opts in variants.items():
        try:
            c = jax.jit(f).lower(*args).compile(compiler_options={**base, **opts})
        except Exception as e:
            print(name, vname, "error", str(e)[:200])
            continue
        text = c.as_text()
        triton = text.count('"kind":"__triton"')
        jax.block_until_ready(c(*args))
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(20):
                r = c(*args)
            jax.block_until_ready(r)
            ts.append((time.perf_counter() - t) / 20 * 1e6)
        out[f"{name} {vname}"] = {"us": float(np.median(ts)), "triton_fusions": triton}
        print(f"{name:12s} {vname:22s} {np.median(ts):8.1f} us  triton fusions {triton}", flush=True)
Path(os.environ.get("OUT", "."), "lnflags.json").write_text(json.dumps(out, indent=1))
