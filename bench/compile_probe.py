"""What a cold start's compiling costs per program kind, under per-step XLA options, and how fast the programs run:

    python -m bench.compile_probe --out $OUT/compile.json -- --model InternVL3-1B --load-format dummy
    python -m bench.compile_probe --options '{"prefill": {"xla_gpu_enable_triton_gemm": true}}' --out ... -- ...

Builds the server's engine (the flags after `--` are `python -m serve`'s; the compilation cache and program
store are always off, so everything is compiled here), then, instead of the full warm-up, compiles a subset
of its programs on the warm-up's threads (every encoder bucket, every third prefill shape, the greedy and
random decode programs of each attention; `--all` for every program) with `Runner.compiler_options` updated
by `--options` ({step: {XLA option: value}}), and runs each program 5 times: the first run (kernel loading)
and the fastest and median of the other 4. Prints and writes seconds of lowering and compiling per kind.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax

from bench import common
from internvl_jax import engine as engine_module
from internvl_jax import offline
from internvl_jax.runner import Runner


def _subset(jobs: list[tuple[str, tuple]]) -> list[tuple[str, tuple]]:
    encode = [job for job in jobs if job[0] == "encode"]
    prefill = [job for job in jobs if job[0] == "prefill"][::3]
    # decode args: (active, steps, want_top, attention, sampling mode)
    decode = [job for job in jobs if job[0] == "decode" and not job[1][2] and job[1][4] in ("greedy", "random")]
    return encode + prefill + decode


def probe(engine, every_program: bool) -> dict:
    """Compiles (a subset of) the engine's programs, then times each; the engine's warm-up stand-in."""
    runner = engine.runner
    candidates = runner.decode_attention_candidates()
    jobs = engine._warmup_jobs(candidates)
    jobs = jobs if every_program else _subset(jobs)
    started = time.monotonic()
    report = engine._compile(jobs, progress=True)
    compile_wall = time.monotonic() - started
    rows = []
    for step, args in jobs:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            jax.block_until_ready((getattr(runner, step)(*args), runner.pool, runner.caches))
            times.append(time.perf_counter() - started)
        rows.append({"step": step, "key": repr(runner.step_call(step, *args).key), "first_ms": times[0] * 1e3,
                     "min_ms": min(times[1:]) * 1e3, "median_ms": statistics.median(times[1:]) * 1e3})
    runner.decode_attention = candidates[0]
    engine.warmup_report, engine.first_run_seconds = report, {}
    engine._compiled_sizes = engine._cache_sizes()
    return {"compiler_options": {step: runner.compiler_options(step) for step in report},
            "compile_wall_s": compile_wall, "programs": {kind: n for kind, (n, _) in report.items()},
            "compile_seconds": {kind: s for kind, (_, s) in report.items()}, "runs": rows}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, serve_flags = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--options", default="{}", help="JSON {step: {XLA option: value}} added to the step's own")
    parser.add_argument("--all", action="store_true", help="every program of the warm-up, not a subset")
    parser.add_argument("--out", default="compile_probe.json")
    args = parser.parse_args(ours)
    try:
        options = json.loads(args.options)
        if not all(step in ("encode", "prefill", "decode") and isinstance(o, dict) for step, o in options.items()):
            raise ValueError("expected {step: {option: value}} with steps encode, prefill, decode")
    except ValueError as error:
        parser.error(f"--options {args.options!r}: {error}")

    from serve import cli  # the server's flags and defaults

    engine_args = cli.engine_args(cli.parse_args([*serve_flags, "--no-compilation-cache"]))
    # For the one engine built here: the steps' options extended, and the probe in place of the warm-up.
    own_options, own_warmup = Runner.compiler_options, engine_module.Engine.warmup
    Runner.compiler_options = lambda runner, step: {**own_options(runner, step), **options.get(step, {})}
    result: dict = {}
    engine_module.Engine.warmup = lambda engine, progress=True: result.update(probe(engine, args.all)) or 0.0
    started = time.monotonic()
    try:
        offline.build_engine(engine_args, progress=True)
    finally:
        Runner.compiler_options, engine_module.Engine.warmup = own_options, own_warmup
    meta = {**common.run_metadata(argv, "bench.compile_probe"), **common.jax_device_info()}
    result = {"benchmark": "compile_probe", "meta": meta, "options": options,
              "build_s": time.monotonic() - started, **result}
    print(f"options {json.dumps(options)}: engine built in {result['build_s']:.1f} s, compiling "
          f"{result['compile_wall_s']:.1f} s wall")
    for kind, seconds in result["compile_seconds"].items():
        runs = [row for row in result["runs"] if row["step"] == kind]
        print(f"{kind:8s} {result['programs'][kind]:3d} programs, {seconds:7.1f} s lowering + compiling (threads' "
              f"time), runs: {sum(row['min_ms'] for row in runs):9.2f} ms (sum of the fastest)")
    print(common.format_table(["program", "first ms", "min ms", "median ms"],
                              [[row["key"], f"{row['first_ms']:.1f}", f"{row['min_ms']:.3f}", f"{row['median_ms']:.3f}"]
                               for row in result["runs"]]))
    with open(args.out, "w") as file:
        json.dump(result, file, indent=1)
    print(f"JSON {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
