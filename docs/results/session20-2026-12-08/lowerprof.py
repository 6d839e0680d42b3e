import cProfile, gc, pstats, sys, time
from internvl_jax import engine as E, offline

def warm(self, progress=True):
    runner = self.runner
    jobs = self._warmup_jobs(runner.decode_attention_candidates())
    res = {}
    pr = cProfile.Profile()
    gc.disable()
    for kind, args in jobs:
        call = runner.step_call(kind, *args)
        t = time.perf_counter()
        if "--prof" in sys.argv: pr.enable()
        call.jitted.lower(*call.args, *call.static)
        if "--prof" in sys.argv: pr.disable()
        res.setdefault(kind, []).append(round(time.perf_counter() - t, 3))
    for k, v in res.items():
        print(k, len(v), round(sum(v), 2), v)
    if "--prof" in sys.argv:
        pstats.Stats(pr).sort_stats("cumulative").print_stats(sys.argv[-1] if sys.argv[-1] != "--prof" else "", 60)
        pstats.Stats(pr).sort_stats("tottime").print_stats(40)
    raise SystemExit

E.Engine.warmup = warm
offline.LLM("InternVL3-1B", load_format="dummy", compilation_cache=False)
