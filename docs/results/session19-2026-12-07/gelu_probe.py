"""Session 19 call 2 diagnostic: InternViT's MLP with the tanh-approximate GELU, which XLA can fold into fc1's
cuBLASLt call as its epilogue (exact erf GELU it cannot), against the exact GELU (XLA's fusion, the Pallas kernel):
tiles/s at 8 and 32 tiles, and each variant's features against a float32 run of the same (bf16-rounded) weights."""
import json, os, sys, functools
import jax, jax.numpy as jnp, numpy as np
from bench import common, encoder as bench_encoder
from internvl_jax import kernels
from internvl_jax.vision import LayerKernels

args = bench_encoder.parse_args([ "--preset", os.environ.get("PRESET", "InternVL3-1B"), "--devices", "1", "--modes", "data", "--batches", os.environ.get("BATCHES", "8,32"),
                                  "--baseline", "none", "--repeats", "7", "--no-copy", "--out", "/dev/null"])
config, _ = common.load_config(args.preset)
flops = common.encoder_flops_per_tile(config)["total"]
setup = bench_encoder.Setup("data", "data", 1)
runner, padded, _ = bench_encoder.build_runner(config, setup, args)
plain = runner._layer_kernels
tanh = functools.partial(jax.nn.gelu, approximate=True)

def layer_kernels(impl):
    if impl == "tanh":
        return plain("pallas")._replace(gelu=tanh)
    if impl == "tanh-xla":
        return LayerKernels(None, tanh)
    return plain(impl)
runner._layer_kernels = layer_kernels

rows, features = [], {}
impls = ["xla", "pallas", "tanh", "tanh-xla"]
for tiles in args.batches:
    for impl in impls:
        runner.encoder_kernels = impl
        row = bench_encoder.measure_batch(runner, setup, tiles, padded[tiles], args, flops, 989.0)
        features[(impl, tiles)] = np.asarray(runner.pool[:tiles], np.float32)
        print(f"{impl:9s} {tiles:3d} tiles: {row['tiles_per_s']:7.1f} tiles/s, {row['ms_per_call']:.2f} ms", flush=True)
        rows.append({"impl": impl, "tiles": tiles, "tiles_per_s": row["tiles_per_s"], "ms": row["ms_per_call"]})
# the compiled encode programs: is a GELU epilogue in them?
for impl in impls:
    runner.encoder_kernels = impl
    call = runner._encode_call(np.zeros((8, 3, config.vision.image_size, config.vision.image_size), np.uint8), np.arange(8))
    text = runner._encode_jit.lower(*call.args, *call.static).compile().as_text()
    print(f"{impl:9s}: 'GELU' in compiled HLO {text.count('GELU')} times; cublas calls {text.count('__cublas')}", flush=True)
# float32 reference: the same weights (bf16 values) in float32, full-precision matmuls (no TF32)
jax.config.update("jax_default_matmul_precision", "highest")
args32 = bench_encoder.parse_args([ "--preset", os.environ.get("PRESET", "InternVL3-1B"), "--devices", "1", "--modes", "data", "--batches", os.environ.get("BATCHES", "8,32"),
                                    "--dtype", "float32", "--baseline", "none", "--repeats", "3", "--no-copy", "--out", "/dev/null"])
runner32, _, _ = bench_encoder.build_runner(config, setup, args32)
runner32.encoder_leaves = jax.tree.map(lambda a: a.astype(jnp.float32), runner.encoder_leaves)
runner32.encoder_kernels = "xla"
for tiles in args.batches:
    bench_encoder.measure_batch(runner32, setup, tiles, padded[tiles], args32, flops, 989.0)
    ref = np.asarray(runner32.pool[:tiles], np.float32)
    scale, mean = float(np.abs(ref).max()), float(np.abs(ref).mean())
    for impl in impls:
        diff = np.abs(features[(impl, tiles)] - ref)
        print(f"{tiles:3d} tiles {impl:9s}: max |f - f32| / max {diff.max() / scale:.4f}, mean |f - f32| / mean |f32| {diff.mean() / mean:.4f}", flush=True)
        rows.append({"impl": impl, "tiles": tiles, "max_err_over_max": float(diff.max() / scale), "mean_err_over_mean": float(diff.mean() / mean)})
json.dump(rows, open(sys.argv[1], "w"), indent=1)
