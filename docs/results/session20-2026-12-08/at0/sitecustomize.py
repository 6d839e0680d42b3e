# session 20 diagnostic: XLA's autotuning off (cuBLAS's heuristic algorithm) for the encode and prefill programs only.
try:
    from internvl_jax import runner as _runner
except Exception:  # not every process here has jax
    _runner = None
if _runner is not None:
    _options = _runner.Runner.compiler_options

    def compiler_options(self, step):
        options = _options(self, step)
        if step in ("encode", "prefill"):
            options["xla_gpu_autotune_level"] = 0
        return options

    _runner.Runner.compiler_options = compiler_options
