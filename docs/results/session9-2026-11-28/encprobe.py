"""InternViT-300M pieces at 1/8/32 tiles, compiled as encode is (cuBLAS GEMMs): q/k/v as one GEMM + three slices
(the model at 74ac770) vs three GEMMs from separate weights (2-D biases here); LayerNorm two-pass (the model) vs
one-pass statistics; each with the kernel count of the compiled program."""

import json
import os
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

D, N, H, F = 1024, 16, 64, 4096
bf = jnp.bfloat16
rng = np.random.default_rng(0)
OPTS = {"xla_gpu_enable_triton_gemm": False} if os.environ.get("ATTN") is None else {}


def arr(shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, bf)


def attn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation=os.environ.get("ATTN", "cudnn"))


def fused(x, W, b, Wo, bo):
    qkv = jnp.einsum("btd,dcnh->btcnh", x, W) + b
    o = attn(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return x + jnp.einsum("btnh,nhd->btd", o, Wo) + bo


def split(x, Wq, Wk, Wv, bq, bk, bv, Wo, bo):
    q = jnp.einsum("btd,dnh->btnh", x, Wq) + bq
    k = jnp.einsum("btd,dnh->btnh", x, Wk) + bk
    v = jnp.einsum("btd,dnh->btnh", x, Wv) + bv
    o = attn(q, k, v)
    return x + jnp.einsum("btnh,nhd->btd", o, Wo) + bo


def ln_two(x, s, b):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + 1e-6) * s.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def ln_one(x, s, b):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.maximum(jnp.square(x32).mean(-1, keepdims=True) - jnp.square(mean), 0.0)
    return ((x32 - mean) * jax.lax.rsqrt(var + 1e-6) * s.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def ln_mlp(ln):
    def f(x, s, b, W1, b1, W2, b2):
        h = jnp.einsum("btd,df->btf", ln(x, s, b), W1) + b1
        h32 = h.astype(jnp.float32)
        h = (0.5 * h32 * (1.0 + jax.lax.erf(h32 * np.float32(np.sqrt(0.5))))).astype(h.dtype)
        return x + jnp.einsum("btf,fd->btd", h, W2) + b2

    return f


def bench(name, f, args, out):
    c = jax.jit(f).lower(*args).compile(compiler_options=OPTS)
    text = c.as_text()
    entry = text[text.rfind("ENTRY") :]
    kernels = len(re.findall(r"= \S+ (fusion|custom-call)\(", entry))
    jax.block_until_ready(c(*args))
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(20):
            r = c(*args)
        jax.block_until_ready(r)
        ts.append((time.perf_counter() - t) / 20 * 1e6)
    out[name] = {"us": round(float(np.median(ts)), 1), "min_us": round(min(ts), 1), "kernels": kernels}
    print(f"{name:40s} {np.median(ts):9.1f} us (min {min(ts):9.1f})  kernels {kernels}", flush=True)


out = {}
for tiles in [int(t) for t in os.environ.get("TILES", "1,8,32").split(",")]:
    T = 1025
    x = arr((tiles, T, D))
    W = arr((D, 3, N, H), 0.02)
    b = arr((3, N, H), 0.02)
    Wo = arr((N, H, D), 0.02)
    bo = arr((D,), 0.02)
    Wq, Wk, Wv = (jnp.asarray(np.asarray(W[:, i])) for i in range(3))
    bq, bk, bv = (jnp.asarray(np.asarray(b[i])) for i in range(3))
    s, lb = arr((D,), 0.1) + 1, arr((D,), 0.1)
    W1, b1, W2, b2 = arr((D, F), 0.02), arr((F,), 0.02), arr((F, D), 0.02), arr((D,), 0.02)
    for rnd in range(2):
        bench(f"t{tiles} r{rnd} attn fused qkv + slices", fused, (x, W, b, Wo, bo), out)
        bench(f"t{tiles} r{rnd} attn three qkv GEMMs", split, (x, Wq, Wk, Wv, bq, bk, bv, Wo, bo), out)
        bench(f"t{tiles} r{rnd} LN two-pass", ln_two, (x, s, lb), out)
        bench(f"t{tiles} r{rnd} LN one-pass", ln_one, (x, s, lb), out)
        bench(f"t{tiles} r{rnd} LN+MLP two-pass", ln_mlp(ln_two), (x, s, lb, W1, b1, W2, b2), out)
        bench(f"t{tiles} r{rnd} LN+MLP one-pass", ln_mlp(ln_one), (x, s, lb, W1, b1, W2, b2), out)
    if tiles == 32:
        c = jax.jit(ln_two).lower(x, s, lb).compile(compiler_options=OPTS)
        Path(os.environ.get("OUT", "."), "hlo-ln-two.txt").write_text(c.as_text())
        c = jax.jit(split).lower(x, Wq, Wk, Wv, bq, bk, bv, Wo, bo).compile(compiler_options=OPTS)
        Path(os.environ.get("OUT", "."), "hlo-split.txt").write_text(c.as_text())
Path(os.environ.get("OUT", "."), "encprobe.json").write_text(json.dumps(out, indent=1))
