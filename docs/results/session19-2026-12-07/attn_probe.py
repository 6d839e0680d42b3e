"""Session 19 call 1 diagnostic: cuDNN flash attention at InternViT's shapes (16 heads x 64, 1,025 tokens per tile)
against aligned lengths, cuDNN with its logsumexp returned, and jax's bundled Pallas (Triton) flash attention."""
import json, sys, time, functools, traceback
import jax, jax.numpy as jnp, numpy as np
from bench import common

N, H, DEPTH = 16, 64, 8
out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": []}

def chain(attn):
    def run(q, k, v):
        for _ in range(DEPTH):
            q = attn(q, k, v).astype(q.dtype)
        return q
    return jax.jit(run)

def measure(label, attn, B, T, S, kv_len=None, useful=None):
    key = jax.random.PRNGKey(0)
    q = jax.random.normal(key, (B, T, N, H), jnp.bfloat16)
    k = jax.random.normal(jax.random.PRNGKey(1), (B, S, N, H), jnp.bfloat16)
    v = jax.random.normal(jax.random.PRNGKey(2), (B, S, N, H), jnp.bfloat16)
    fn = chain(attn)
    try:
        t = common.time_calls(lambda: fn(q, k, v), jax.block_until_ready, repeats=7)
    except Exception as e:
        print(f"{label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
        out["rows"].append({"label": label, "error": str(e)[:1000]}); return None
    us = t.seconds / DEPTH * 1e6
    ut, us_ = useful or (T, S)
    tf = 4 * B * N * H * ut * us_ / (us * 1e-6) / 1e12
    print(f"{label:60s} B={B:3d} T={T} S={S}: {us:9.1f} us per call, {tf:6.1f} useful TFLOP/s", flush=True)
    out["rows"].append({"label": label, "B": B, "T": T, "S": S, "us": us, "tflops": tf})
    return us

def cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")

def cudnn_len(n):
    def f(q, k, v):
        lens = jnp.full((q.shape[0],), n, jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lens, implementation="cudnn")
    return f

def cudnn_lse(q, k, v):
    from jax._src.cudnn import fused_attention_stablehlo as fa
    o, lse = fa.dot_product_attention(q, k, v, scale=H ** -0.5, return_residual=True)
    return o + (0 * jnp.mean(lse)).astype(o.dtype)

for B in (32, 8):
    for T, S in ((1024, 1024), (1025, 1025), (1024, 1025), (1025, 1024), (1040, 1040), (1088, 1088), (1152, 1152)):
        measure("cudnn", cudnn, B, T, S)
for T, S in ((1024, 1024), (1025, 1025)):
    measure("cudnn", cudnn, 1, T, S)
measure("cudnn kv_len 1025", cudnn_len(1025), 1, 1032, 1032, useful=(1025, 1025))
measure("cudnn kv_len 1025", cudnn_len(1025), 32, 1032, 1032, useful=(1025, 1025))
measure("cudnn + logsumexp (private api)", cudnn_lse, 32, 1024, 1024)
try:
    from jax._src.cudnn import fused_attention_stablehlo as fa
    q = jax.random.normal(jax.random.PRNGKey(0), (2, 1024, N, H), jnp.bfloat16)
    o, lse = jax.jit(lambda q: fa.dot_product_attention(q, q, q, scale=H ** -0.5, return_residual=True))(q)
    ref = jax.scipy.special.logsumexp(jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), q.astype(jnp.float32)) * H ** -0.5, axis=-1)
    print("lse shape", lse.shape, lse.dtype, "max |lse - ref|", float(jnp.abs(lse.reshape(ref.shape) - ref).max()) if lse.size == ref.size else "size differs", flush=True)
except Exception:
    traceback.print_exc()

try:
    from jax.experimental.pallas.ops.gpu import attention as pa
    for bq, bk, warps, stages in ((128, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2), (128, 64, 4, 3), (128, 128, 8, 3)):
        f = functools.partial(pa.mha, segment_ids=None, sm_scale=H ** -0.5, block_sizes=pa.BlockSizes(block_q=bq, block_k=bk), num_warps=warps, num_stages=stages)
        measure(f"pallas mha bq{bq} bk{bk} w{warps} s{stages}", lambda q, k, v, f=f: f(q, k, v), 32, 1024, 1024)
except Exception:
    traceback.print_exc()
try:
    from internvl_jax import kernels
    for bq, bk, warps, stages in ((128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (128, 128, 4, 2), (128, 32, 4, 3)):
        bl = kernels.AttentionBlocks(q=bq, k=bk, warps=warps, stages=stages)
        f = functools.partial(kernels.vision_attention, tokens=1025, blocks=bl)
        label = f"ours bq{bq} bk{bk} w{warps} s{stages}"
        measure(label, f, 32, 1025, 1025)
        measure(label, f, 1, 1032, 1032, useful=(1025, 1025))
    # accuracy against cuDNN at one tile
    qkv = [jax.random.normal(jax.random.PRNGKey(i), (4, 1025, N, H), jnp.bfloat16) * 2 for i in range(3)]
    ref = jax.jit(cudnn)(*qkv).astype(jnp.float32)
    mine = jax.jit(functools.partial(kernels.vision_attention, tokens=1025, blocks=kernels.AttentionBlocks()))(*qkv).astype(jnp.float32)
    exact = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)))(*qkv)
    print("max |ours - f32 xla|", float(jnp.abs(mine - exact).max()), " max |cudnn - f32 xla|", float(jnp.abs(ref - exact).max()), " max |f32|", float(jnp.abs(exact).max()), flush=True)
except Exception:
    traceback.print_exc()
json.dump(out, open(sys.argv[1], "w"), indent=1)
