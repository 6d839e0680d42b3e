"""Host cost of one jitted dispatch vs the number of array arguments (donated or not), and a
perfetto trace of decode dispatches of the InternVL3-1B preset:

    python -m bench.dispatch_probe --out $OUT
"""

import argparse
import glob
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np


def per_call_ms(fn, args, repeats=50):
    out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    host = time.perf_counter() - start
    jax.block_until_ready(out)
    return host / repeats * 1e3, (time.perf_counter() - start) / repeats * 1e3


def argument_scaling(results):
    rows = []
    for count in (1, 10, 100, 400, 700):
        arrays = [jnp.ones((256, 256), jnp.bfloat16) for _ in range(count)]
        plain = jax.jit(lambda xs: xs[0] * 2)
        host, total = per_call_ms(plain, (arrays,))
        rows.append({"args": count, "donated": False, "host_ms": host, "total_ms": total})
        donated = jax.jit(lambda xs: [x + 1 for x in xs], donate_argnums=0)
        state = [jnp.ones((256, 256), jnp.bfloat16) for _ in range(count)]
        state = donated(state)
        jax.block_until_ready(state)
        start = time.perf_counter()
        for _ in range(20):
            state = donated(state)
        host = (time.perf_counter() - start) / 20 * 1e3
        jax.block_until_ready(state)
        rows.append({"args": count, "donated": True, "host_ms": host,
                     "total_ms": (time.perf_counter() - start) / 20 * 1e3})
        print(rows[-2:], flush=True)
    results["argument_scaling"] = rows


def decode_trace(results, out_dir):
    from bench.common import load_config
    from internvl_jax import sharding, weights
    from internvl_jax.runner import Runner

    config, _ = load_config("InternVL3-1B")  # shapes only: no tokenizer needed
    mesh = sharding.make_mesh(1, 1)
    model = weights.dummy_model(config, jnp.bfloat16, lambda s: sharding.param_shardings(s, mesh, "data"))
    runner = Runner(model, mesh, "data", num_slots=8, max_model_len=4096, pool_tiles=1)
    active = np.ones(8, bool)
    for steps in (1, 16):
        runner.set_lengths(np.full(8, 512))
        jax.block_until_ready(runner.decode(active, steps, False, "cudnn", "greedy").tokens)
        start = time.perf_counter()
        for _ in range(10):
            output = runner.decode(active, steps, False, "cudnn", "greedy")
        host = (time.perf_counter() - start) / 10 * 1e3
        jax.block_until_ready(output.tokens)
        total = (time.perf_counter() - start) / 10 * 1e3
        results[f"decode_steps{steps}"] = {"host_ms_per_dispatch": host, "total_ms_per_dispatch": total}
        print(steps, host, total, flush=True)
    trace_dir = "/tmp/trace"
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(3):
            output = runner.decode(active, 1, False, "cudnn", "greedy")
        jax.block_until_ready(output.tokens)
    for path in glob.glob(f"{trace_dir}/**/*perfetto_trace.json.gz", recursive=True):
        shutil.copy(path, os.path.join(out_dir, "decode_trace.json.gz"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {"devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__,
               "date": time.strftime("%Y-%m-%d")}
    argument_scaling(results)
    decode_trace(results, args.out)
    with open(os.path.join(args.out, "dispatch.json"), "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
