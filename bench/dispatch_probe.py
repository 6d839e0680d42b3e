"""Where a dispatch's host time goes, and whether fewer, stacked weight arguments would cost device time:

    PYTHONPATH=. python -m bench.dispatch_probe --out $OUT

1. Argument scaling: host ms per call of a program that reads one element of each of N weight-sized arrays
   (N from 1 to 700), with and without CUDA graphs (XLA command buffers).
2. Stacked vs separate weights: a 24-layer MLP chain at InternVL3-1B's decoder sizes, its weights passed as
   one array per layer and matrix (72 arguments) or stacked per matrix ([24, ...], 3 arguments, each layer
   reading its static slice). Host ms and device ms per call for few rows (decode) and many (prefill), with
   Triton GEMMs and with cuBLAS; the compiled HLO of each goes to --out (a slice XLA cannot fuse into its
   GEMM is a copy of that layer's weights on every call).
3. A host trace of the serving steps (`Runner.encode` / `prefill` / `decode`, InternVL3-1B, dummy weights):
   the host-side events of a few calls of each, summed by name.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.profiler import capture_trace, complete_events

NO_GRAPHS = {"xla_gpu_enable_command_buffer": ""}


def host_and_device_ms(fn, args, calls: int = 30) -> dict:
    """Host ms per call (the call's return, device idle before each; median) and device ms per call
    (calls back to back)."""
    jax.block_until_ready(fn(*args))
    host = []
    for _ in range(calls):
        started = time.perf_counter()
        out = fn(*args)
        host.append((time.perf_counter() - started) * 1e3)
        jax.block_until_ready(out)
    started = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return {"host_ms": statistics.median(host), "back_to_back_ms": (time.perf_counter() - started) / calls * 1e3}


def argument_scaling(results: dict) -> None:
    rows = []
    arrays = [jnp.full((896, 896), i, jnp.bfloat16) for i in range(700)]
    for count in (1, 50, 150, 350, 700):
        for graphs in (True, False):
            fn = jax.jit(lambda xs: sum(x[0, :8].astype(jnp.float32) for x in xs),
                         compiler_options=None if graphs else NO_GRAPHS)
            row = {"args": count, "cuda_graphs": graphs, **host_and_device_ms(fn, (arrays[:count],))}
            rows.append(row)
            print(row, flush=True)
    results["argument_scaling"] = rows


def mlp_chain(x, gates, ups, downs, index):
    """24 SwiGLU MLP blocks with residuals; `index(ws, i)` is layer i's matrix."""
    for i in range(24):
        g, u, d = index(gates, i), index(ups, i), index(downs, i)
        x = x + (jax.nn.silu(x @ g) * (x @ u)) @ d
    return x


def stacked_vs_separate(results: dict, out_dir: str) -> None:
    hidden, inner = 896, 4864
    key = jax.random.key(0)
    gates = jax.random.normal(key, (24, hidden, inner), jnp.bfloat16) * 0.02
    ups = gates * 0.5
    downs = jax.random.normal(key, (24, inner, hidden), jnp.bfloat16) * 0.02
    separate = [list(ws) for ws in (gates, ups, downs)]
    jax.block_until_ready(separate)
    options = {"triton": {}, "cublas": {"xla_gpu_enable_triton_gemm": False},
               "cublas+dynamic_slice_fusion": {"xla_gpu_enable_triton_gemm": False,
                                               "xla_gpu_enable_dynamic_slice_fusion": True}}
    rows = []
    for rows_m in (8, 2048):
        x = jnp.ones((rows_m, hidden), jnp.bfloat16)
        for name, opts in options.items():
            for layout, weights in (("separate", separate), ("stacked", (gates, ups, downs))):
                def chain(x, gates, ups, downs):
                    return mlp_chain(x, gates, ups, downs, lambda ws, i: ws[i])
                fn = jax.jit(chain, compiler_options=opts or None)
                try:
                    compiled = fn.lower(x, *weights).compile()
                except Exception as error:  # an option this XLA does not have
                    rows.append({"rows": rows_m, "gemms": name, "layout": layout, "error": str(error)[:300]})
                    print(rows[-1], flush=True)
                    continue
                text = compiled.as_text()
                with open(os.path.join(out_dir, f"hlo-chain-{rows_m}-{name}-{layout}.txt"), "w") as handle:
                    handle.write(text)
                row = {"rows": rows_m, "gemms": name, "layout": layout,
                       "slice_ops": text.count(" slice("), "copy_ops": text.count(" copy("),
                       **host_and_device_ms(compiled, (x, *weights))}
                rows.append(row)
                print(row, flush=True)
    results["stacked_vs_separate"] = rows


def host_events(trace: dict, calls: int) -> list[dict]:
    """Host-side events of a perfetto trace, summed by name: us per call and count per call."""
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for event in complete_events(trace, gpu=False):
        totals[event["name"][:100]][0] += 1
        totals[event["name"][:100]][1] += event.get("dur", 0)
    ranked = sorted(totals.items(), key=lambda item: -item[1][1])[:40]
    return [{"event": name, "per_call": n / calls, "us_per_call": us / calls} for name, (n, us) in ranked]


def runner_host_trace(results: dict, calls: int) -> None:
    from bench.common import load_config
    from bench.decode import new_requests
    from internvl_jax import sharding, weights
    from internvl_jax.runner import Runner

    config, _ = load_config("InternVL3-1B")  # shapes only: no tokenizer needed
    mesh = sharding.make_mesh(1, 1)
    model = weights.dummy_model(config, jnp.bfloat16, lambda s: sharding.param_shardings(s, mesh, "data"))
    runner = Runner(model, mesh, "data", num_slots=32, max_model_len=4096, pool_tiles=64)
    size = config.vision.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (8, 3, size, size), dtype=np.uint8)
    rows = np.arange(8, dtype=np.int32)
    new = new_requests(2048, config.text.vocab_size, config.image_token_id, np.random.default_rng(0), batch=1)
    active = np.ones(32, bool)
    runner.set_lengths(np.full(32, 1024))
    steps = {"encode": lambda: runner.encode(pixels, rows) or runner.pool,
             "prefill": lambda: runner.prefill(new, False).tokens,
             "decode": lambda: runner.decode(active, 8, False, "cudnn", "greedy").tokens}
    for step, fn in steps.items():
        jax.block_until_ready(fn())
        runner.set_lengths(np.full(32, 1024))
        trace = capture_trace(lambda fn=fn: jax.block_until_ready(fn()), calls)  # each call synced alone
        results[f"host_events_{step}"] = host_events(trace, calls) if trace is not None else []
        print(step, json.dumps(results[f"host_events_{step}"][:15], indent=0), flush=True)
    # The steps' own input transfers, alone.
    timings = {}
    for name, fn in (("put_active", lambda: jax.device_put(active, runner.slot_sharding)),
                     ("put_pixels", lambda: jax.device_put(pixels, runner.tile_sharding))):
        jax.block_until_ready(fn())
        host = []
        for _ in range(calls):
            started = time.perf_counter()
            jax.block_until_ready(fn())
            host.append((time.perf_counter() - started) * 1e3)
        timings[name] = statistics.median(host)
    results["input_transfers_ms"] = timings
    print(timings, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--trace-calls", type=int, default=5)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {"devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__,
               "date": time.strftime("%Y-%m-%d")}
    for part in (argument_scaling, lambda r: stacked_vs_separate(r, args.out),
                 lambda r: runner_host_trace(r, args.trace_calls)):
        part(results)
        with open(os.path.join(args.out, "dispatch.json"), "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
