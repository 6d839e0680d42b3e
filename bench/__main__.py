"""`python -m bench <command> [args]`: runs `bench.<command>.main(args)`.

A command is any module `bench/<command>.py` with a `main(argv) -> int | None`, so a new benchmark script
needs no change here; `COMMANDS` only lists them in the help. `MODULES` names the exceptions.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "serve": "benchmark a running OpenAI-compatible server (flags and report as `vllm bench serve`)",
    "plot": "TTFT percentiles and latency/throughput bars comparing saved `serve` results",
    "datasets": "statistics of the synthetic workloads (arena-like sizes and InternVL tile counts)",
    "encoder": "vision encoder + projector tiles/s vs tile batch, encoder data vs weights (GPU)",
    "decode": "decode step time vs batch and context, prefill vs prompt length (GPU)",
    "profile": "device time of one encoder call or decode dispatch, by model block (GPU trace)",
    "e2e": "the seed PR's serving experiments: servers x workloads, summary tables and plots",
}
# Commands whose module has another name: a bench/profile.py would shadow the standard library's `profile`
# (which transformers imports through cProfile) whenever a script in bench/ runs by path.
MODULES = {"profile": "profiler"}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m bench <command> [args]   (python -m bench <command> --help)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if not command.isidentifier():
        print(f"bench: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    name = MODULES.get(command, command)
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as error:
        # Only a missing bench/<command>.py is "unknown"; a missing dependency inside it must surface.
        if error.name != f"bench.{name}":
            raise
        known = f" (listed, but bench/{name}.py is not written yet)" if command in COMMANDS else ""
        print(f"bench: unknown command {command!r}{known}\n\n{usage()}", file=sys.stderr)
        return 2
    if not callable(getattr(module, "main", None)):
        print(f"bench: bench/{name}.py has no main(argv)", file=sys.stderr)
        return 2
    code = module.main(rest)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
