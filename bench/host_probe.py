"""Host cost of dispatching each serving step, with and without CUDA graphs (XLA command buffers).

    PYTHONPATH=. python -m bench.host_probe --out $OUT

For InternVL3-1B (dummy weights, one device) and each `--cuda-graphs` mode of the runner, times every
step through the serving path (`Runner.encode` / `prefill` / `decode`: fresh inputs put on the device
each call, donated caches): the call's own duration and its thread's CPU time (the call returns once the
work is queued, so this is the host cost the engine thread pays), and the device time per call when
calls run back to back. Then the engine's order within one step (encode, prefill, decode, queued back
to back) to see whether a dispatch waits for the one before it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def timed_call(fn):
    started, cpu = time.perf_counter(), time.thread_time()
    out = fn()
    return out, (time.perf_counter() - started) * 1e3, (time.thread_time() - cpu) * 1e3


def measure(fn, block, calls: int) -> dict:
    """fn() dispatches one call; block(out) waits for it. Host ms and CPU ms per call with the device
    idle before each call; device ms per call back to back."""
    block(fn())  # compiled and run once
    host, cpu = [], []
    for _ in range(calls):
        out, wall, used = timed_call(fn)
        block(out)
        host.append(wall)
        cpu.append(used)
    started = time.perf_counter()
    for _ in range(calls):
        out = fn()
    block(out)
    back_to_back = (time.perf_counter() - started) / calls * 1e3
    return {"host_ms": statistics.median(host), "host_cpu_ms": statistics.median(cpu),
            "back_to_back_ms": back_to_back}


def probe_mode(model, mesh, mode: str, args) -> dict:
    from internvl_jax.engine import Engine, EngineConfig
    from internvl_jax.runner import Runner

    runner = Runner(model, mesh, "data", num_slots=args.slots, max_model_len=4096, pool_tiles=64,
                    cuda_graphs=mode)
    engine = Engine(runner, None, EngineConfig(max_num_seqs=args.slots))
    size = runner.config.vision.image_size
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (args.tiles, 3, size, size), dtype=np.uint8)
    rows = np.arange(args.tiles, dtype=np.int32)

    def new_requests():
        new = engine._new_requests(args.batch, args.tokens)
        new.ids[:] = rng.integers(0, 1000, new.ids.shape)
        new.lengths[:] = args.tokens - 7
        new.slots[:] = np.arange(args.batch)
        return new

    active = np.ones(args.slots, bool)
    impl = runner.decode_attention_candidates()[-1]  # cuDNN on the GPU, XLA elsewhere
    steps = {
        "encode": (lambda: runner.encode(pixels, rows), lambda _: jax.block_until_ready(runner.pool)),
        "prefill": (lambda: runner.prefill(new_requests(), False), lambda out: jax.block_until_ready(out.tokens)),
        "decode": (lambda: runner.decode(active, args.decode_steps, False, impl, "greedy"),
                   lambda out: jax.block_until_ready(out.tokens)),
        "decode_random": (lambda: runner.decode(active, args.decode_steps, False, impl, "random"),
                          lambda out: jax.block_until_ready(out.tokens)),
    }
    result = {}
    for step, (fn, block) in steps.items():
        if step.startswith("decode"):
            runner.set_lengths(np.full(args.slots, 1024))
        row = measure(fn, block, args.calls)
        result[step] = row
        print(mode, step, {k: round(v, 3) for k, v in row.items()}, flush=True)
    # The engine's order: encode, prefill and decode queued back to back, then the previous decode read.
    sequence = {"encode": [], "prefill": [], "decode": []}
    out = None
    for _ in range(args.calls):
        _, wall, _ = timed_call(lambda: runner.encode(pixels, rows))
        sequence["encode"].append(wall)
        _, wall, _ = timed_call(lambda: runner.prefill(new_requests(), False))
        sequence["prefill"].append(wall)
        if out is not None:
            jax.block_until_ready(out.tokens)
        out, wall, _ = timed_call(lambda: runner.decode(active, args.decode_steps, False, impl, "greedy"))
        sequence["decode"].append(wall)
    jax.block_until_ready(out.tokens)
    result["engine_order_host_ms"] = {k: statistics.median(v) for k, v in sequence.items()}
    print(mode, "engine order, host ms per call:", result["engine_order_host_ms"], flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--preset", default="InternVL3-1B")
    parser.add_argument("--modes", default="all,none", help="runner cuda_graphs modes, comma-separated")
    parser.add_argument("--tiles", type=int, default=8, help="encoder call: tiles")
    parser.add_argument("--batch", type=int, default=1, help="prefill call: prompts")
    parser.add_argument("--tokens", type=int, default=2048, help="prefill call: bucket length")
    parser.add_argument("--slots", type=int, default=32, help="decode: slots, all active")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()

    from bench.common import load_config
    from internvl_jax import sharding, weights

    config, _ = load_config(args.preset)
    mesh = sharding.make_mesh(1, 1)
    model = weights.dummy_model(config, jnp.bfloat16, lambda s: sharding.param_shardings(s, mesh, "data"))
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
               "preset": args.preset, "args": vars(args), "modes": {}}
    for mode in args.modes.split(","):
        results["modes"][mode] = probe_mode(model, mesh, mode, args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "host-probe.json")
    with open(path, "w") as handle:
        json.dump(results, handle, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
