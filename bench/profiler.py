"""Profile one serving step and say where its device time goes, by model block.

    PYTHONPATH=. python -m bench profile --what decode --preset InternVL3-1B --slots 8 --out $OUT
    PYTHONPATH=. python -m bench profile --what encode --tiles 32 --out $OUT
    PYTHONPATH=. python -m bench profile --what prefill --tokens 4096 --batch 2 --out $OUT

Captures a perfetto trace of a few calls of the jitted step (`jax.profiler`), maps every GPU kernel to
the HLO instruction it runs (kernel names are the instruction names with '.' -> '_') and that
instruction to the `jax.named_scope` path it came from (the model's blocks: `decoder_layer_N/mlp`,
`vision_layer_N/attention`, `cache_insert`...), folds the layer index, and prints microseconds per call
by block, plus the top kernels. Writes `profile-<what>.json`, the raw trace and the compiled program's HLO
text (`hlo-<what>.txt`: the fusions, layouts and copies the kernels come from) to --out.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KERNEL_FAMILIES = (("cudnn", "attention kernel (cuDNN)"), ("nvjet", "GEMM (cuBLAS)"), ("cutlass", "GEMM (cuBLAS)"),
                   ("Memcpy", "memory copy"), ("memcpy", "memory copy"))


def scope_of(op_name: str) -> str:
    """'jit(decode)/while/body/decoder_layer_7/mlp/dot_general' -> 'decoder_layer_*/mlp' (at most three
    named scopes: 'vision/vision_layer_*/attention')."""
    parts = [p for p in op_name.split("/") if p and not p.startswith(("jit(", "while", "body", "closed_call",
                                                                        "checkpoint", "remat", "cond", "branch"))]
    parts = [re.sub(r"_\d+$", "_*", p) for p in parts]
    named = [p for p in parts[:-1] if not p.startswith(("vmap", "pjit"))]  # the last part is the primitive
    return "/".join(named[:3]) or "(top level)"


def instruction_scopes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name (as a kernel name: '.' -> '_') -> named-scope path of its metadata."""
    scopes = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]+)\"", line)
        if match:
            scopes.setdefault(match.group(1).replace(".", "_").replace("-", "_"), scope_of(match.group(2)))
    return scopes


def capture_trace(call, calls: int, keep: str | None = None) -> dict[str, Any] | None:
    """The perfetto trace (chrome JSON) of `call()` run `calls` times, chained, under `jax.profiler`; None when
    none was written. `keep`: a path to copy the raw trace file to."""
    directory = tempfile.mkdtemp(prefix="bench-trace-")
    try:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(calls):
                out = call()
            jax.block_until_ready(out)
        paths = glob.glob(f"{directory}/**/*perfetto_trace.json.gz", recursive=True)
        if not paths:
            return None
        if keep:
            shutil.copy(paths[0], keep)
        with gzip.open(paths[0]) as handle:
            return json.load(handle)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def complete_events(trace: dict[str, Any] | list, *, gpu: bool) -> list[dict[str, Any]]:
    """The trace's complete ("X") events of the GPU's streams (`gpu`) or of the host's threads."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    return [e for e in events if e.get("ph") == "X" and ("GPU" in str(processes.get(e["pid"], ""))) == gpu]


def summarize_trace(trace: dict[str, Any], scopes: dict[str, str], calls: int) -> dict[str, Any]:
    """Device time per call by scope and by kernel from a perfetto trace (chrome JSON format)."""
    kernels = complete_events(trace, gpu=True)
    by_scope: collections.Counter = collections.Counter()
    by_kernel: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for event in kernels:
        name = event["name"]
        scope = scopes.get(name.split("(")[0].strip()) or scopes.get(str(event.get("args", {}).get("hlo_op", "")))
        if scope is None:
            scope = next((label for key, label in KERNEL_FAMILIES if key in name), "(unattributed)")
        by_scope[scope] += event.get("dur", 0)
        by_kernel[name[:80]][0] += 1
        by_kernel[name[:80]][1] += event.get("dur", 0)
    total = sum(by_scope.values())
    return {
        "calls": calls, "kernels_per_call": len(kernels) / max(calls, 1), "device_us_per_call": total / max(calls, 1),
        "by_scope_us_per_call": {k: v / calls for k, v in by_scope.most_common()},
        "top_kernels": [{"kernel": k, "per_call": n / calls, "us_per_call": t / calls, "us_each": t / n}
                        for k, (n, t) in sorted(by_kernel.items(), key=lambda item: -item[1][1])[:25]],
    }


def build(args):
    from bench.common import load_config
    from internvl_jax import sharding, weights
    from internvl_jax.runner import Runner

    config, _ = load_config(args.preset)  # shapes only: no tokenizer
    if args.layers:
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, num_layers=args.layers))
    mesh = sharding.make_mesh(1, 1)
    model = weights.dummy_model(config, weights.DTYPES[args.dtype], lambda s: sharding.param_shardings(s, mesh, "data"))
    return Runner(model, mesh, "data", num_slots=args.slots, max_model_len=args.max_model_len,
                  pool_tiles=max(args.tiles, 1))


def step_function(runner, args):
    """(call() running one step, lowered jit for its HLO)."""
    if args.what == "encode":
        size = runner.config.vision.image_size
        pixels = np.random.default_rng(0).integers(0, 256, (args.tiles, 3, size, size), dtype=np.uint8)
        pixels_device = jax.device_put(pixels, runner.tile_sharding)
        rows = jnp.arange(args.tiles, dtype=jnp.int32)

        runner.encoder_kernels = args.kernels

        def call():
            runner.pool = runner._encode_jit(runner.encoder_leaves, runner.pool, pixels_device, rows, args.kernels)
            return runner.pool
        return call, lambda: runner._encode_jit.lower(runner.encoder_leaves, runner.pool, pixels_device, rows,
                                                      args.kernels)
    if args.what == "prefill":
        from bench.decode import new_requests

        config = runner.config
        new = new_requests(args.tokens, config.text.vocab_size, config.image_token_id, np.random.default_rng(0),
                           batch=args.batch)
        return lambda: runner.prefill(new, False).tokens, lambda: runner.lower("prefill", new, False)
    active = np.ones(runner.num_slots, bool)

    def call(impl):
        runner.set_lengths(np.full(runner.num_slots, args.context))
        return runner.decode(active, args.steps, False, impl, "greedy").tokens

    impl = args.attention or fastest_decode_attention(runner, args.context, args.steps)
    print(f"decode attention: {impl}")
    return functools.partial(call, impl), lambda: runner.lower("decode", active, args.steps, False, impl, "greedy")


def fastest_decode_attention(runner, context: int, steps: int) -> str:
    """The runner's decode attention candidate (cuDNN, XLA) that runs faster at this shape, timed as the server's
    warm-up times them (`Runner.time_decode_attentions`): the one it would keep."""
    timings = runner.time_decode_attentions(runner.decode_attention_candidates(), context, steps, "greedy")
    return min(timings, key=timings.get)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=("encode", "prefill", "decode"), default="decode")
    parser.add_argument("--preset", default="InternVL3-1B", help="a preset name or 'demo'")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=None, help="override the decoder depth")
    parser.add_argument("--tiles", type=int, default=32)
    parser.add_argument("--kernels", choices=("xla", "pallas"), default="xla",
                        help="encode: the vision layers' LayerNorm and GELU kernels (Runner.encoder_kernels)")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024, help="prefill: prompt length (text tokens)")
    parser.add_argument("--batch", type=int, default=1, help="prefill: prompts per call (<= --slots)")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--attention", choices=("xla", "cudnn"), default=None,
                        help="decode attention kernel (default: the faster of the runner's candidates)")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    if args.what == "prefill" and not (1 <= args.batch <= args.slots and 1 <= args.tokens <= args.max_model_len):
        parser.error(f"prefill needs 1 <= --batch ({args.batch}) <= --slots ({args.slots}) and "
                     f"1 <= --tokens ({args.tokens}) <= --max-model-len ({args.max_model_len})")
    os.makedirs(args.out, exist_ok=True)
    runner = build(args)
    call, lower = step_function(runner, args)
    jax.block_until_ready(call())
    started = time.perf_counter()
    for _ in range(args.calls):
        out = call()
    jax.block_until_ready(out)
    wall_ms = (time.perf_counter() - started) / args.calls * 1e3
    hlo = lower().compile().as_text()
    with open(os.path.join(args.out, f"hlo-{args.what}.txt"), "w") as handle:
        handle.write(hlo)
    scopes = instruction_scopes(hlo)
    trace = capture_trace(call, args.calls, keep=os.path.join(args.out, f"trace-{args.what}.json.gz"))
    summary: dict[str, Any] = {"what": args.what, "args": vars(args), "wall_ms_per_call": wall_ms,
                               "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                               "date": time.strftime("%Y-%m-%d")}
    if trace is not None:
        summary.update(summarize_trace(trace, scopes, args.calls))
    with open(os.path.join(args.out, f"profile-{args.what}.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    print(f"{args.what} on {summary['device']}: {wall_ms:.3f} ms per call (wall)")
    if summary.get("kernels_per_call"):
        print(f"device time {summary['device_us_per_call']:.1f} us per call, "
              f"{summary['kernels_per_call']:.0f} kernels per call")
        for scope, micros in summary["by_scope_us_per_call"].items():
            print(f"  {micros:10.1f} us  {scope}")
    else:
        print("no device trace (CPU backend?): only the wall time was measured")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
