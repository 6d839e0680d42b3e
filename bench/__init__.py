"""Benchmarks. `python -m bench <command>`: `serve` (an HTTP serving client in the manner of `vllm bench
serve`), `plot` (charts comparing saved `serve` results), `datasets` (the synthetic workloads' statistics);
GPU scripts (`encoder`, `decode`) live next to them as `bench/<command>.py` with a `main(argv)`.

Nothing in this package imports JAX: the serving client runs beside the server, not inside it.
"""
