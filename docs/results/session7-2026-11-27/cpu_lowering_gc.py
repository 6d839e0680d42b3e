"""Lowering time with and without Python's cyclic garbage collector (CPU, the numbers in docs/PERF.md, 7th session).

    PYTHONPATH=. python docs/results/session7-2026-11-27/cpu_lowering_gc.py \
        --model InternVL3-1B --load-format dummy --no-compilation-cache --max-num-seqs 64

Builds the server's engine without its warm-up, then lowers 2 encoder, 6 prefill and 3 decode programs
(`jax.clear_caches()` before each, so each is traced anew) with the collector on, off, and on after
`gc.freeze()`, alternating, two rounds; prints seconds per round.
"""
import gc
import sys
import time

import jax

from internvl_jax import engine as engine_module
from internvl_jax import offline
from serve import cli


def lower_all(runner, picks, mode) -> float:
    total = 0.0
    if mode == "freeze":
        gc.freeze()
    for kind, args in picks:
        jax.clear_caches()
        call = runner.step_call(kind, *args)
        if mode == "off":
            gc.disable()
        started = time.perf_counter()
        call.jitted.lower(*call.args, *call.static)
        total += time.perf_counter() - started
        gc.enable()
    gc.unfreeze()
    return total


def probe(engine, progress=True):
    runner = engine.runner
    jobs = engine._warmup_jobs(runner.decode_attention_candidates())
    picks = ([job for job in jobs if job[0] == "encode"][-2:] + [job for job in jobs if job[0] == "prefill"][:6]
             + [job for job in jobs if job[0] == "decode"][:3])
    seconds = {mode: [] for mode in ("on", "off", "freeze")}
    for _ in range(2):
        for mode in seconds:
            seconds[mode].append(round(lower_all(runner, picks, mode), 2))
    print("lowering seconds per round:", seconds, flush=True)
    raise SystemExit(0)


engine_module.Engine.warmup = probe
offline.build_engine(cli.engine_args(cli.parse_args(sys.argv[1:])), progress=False)
