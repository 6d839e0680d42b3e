"""Lower every warm-up program of the server with no compile threads running (collector off, as
programs.build_programs does): how long lowering alone takes on this host."""
import collections
import gc
import sys
import time

from internvl_jax import engine as engine_module
from internvl_jax import offline
from serve import cli


def probe(engine, progress=True):
    runner = engine.runner
    jobs = engine._warmup_jobs(runner.decode_attention_candidates())
    seconds = collections.Counter()
    count = collections.Counter()
    gc.disable()
    started = time.perf_counter()
    for kind, args in jobs:
        t = time.perf_counter()
        call = runner.step_call(kind, *args)
        call.jitted.lower(*call.args, *call.static)
        seconds[kind] += time.perf_counter() - t
        count[kind] += 1
    total = time.perf_counter() - started
    gc.enable()
    gc.collect()
    print(f"LOWERALL {len(jobs)} programs in {total:.1f} s:",
          {k: (count[k], round(v, 1)) for k, v in seconds.items()}, flush=True)
    raise SystemExit(0)


engine_module.Engine.warmup = probe
offline.build_engine(cli.engine_args(cli.parse_args(sys.argv[1:])), progress=False)
