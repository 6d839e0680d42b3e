r"""`python -m bench e2e`: the seed pull request's serving experiments against real servers, in one command.

    python -m bench e2e --gpus 2 --presets InternVL3-1B --result-dir results/e2e --time-limit 500

For each preset and each server configuration of the plan (`--gpus 2`: tp2-weights, tp2-data, dp2, dp2-mesh):

    python -m serve --model PRESET --load-format dummy <config args> <--server-args> --host 127.0.0.1 --port P
      -> wait for /health (start-up time; a server that does not come up fails its config, not the run)
      -> per workload: /metrics, `python -m bench serve ... --save-result`, /metrics again (the difference:
         tiles encoded, encoder cache hits / queries, recompiles, which must stay 0)
      -> SIGTERM, wait for the exit (SIGKILL after --stop-timeout)

and at the end (also after every run, so a run stopped at its time limit still leaves its results):

    RESULT_DIR/e2e-summary.json   plan, commands, GPUs, every server's start-up and every run's numbers
    RESULT_DIR/e2e-summary.md     the same as tables (config x workload), warnings first
    RESULT_DIR/e2e-PRESET.png     per preset: one `bench/plot.py` chart per workload comparing configs, stacked
    RESULT_DIR/e2e-raw.tar.gz     per-run result JSONs, server and client logs, the per-workload PNGs

Few files on purpose: the device tool returns at most 8. `--collect A.tar.gz B.tar.gz` merges the tarballs of
several calls (a plan split over calls) into one summary. The client is a child process rather than a call
into `bench.serve`, so a run still going at `--time-limit` can be stopped and the partial plan written out.
Details and the device-tool commands: docs/BENCH_E2E.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.common import DEMO, ROOT, preset_choices, run_metadata, write_json

# ---- the plan -------------------------------------------------------------------------------------

# Server configurations: name -> `python -m serve` flags. `--gpus N` picks the default plan; `--configs`
# takes names from here or `NAME:FLAGS`. The first config of a plan is the baseline of the "vs" column.
CONFIGS = {
    "single": "",
    "tp2-weights": "-tp 2 --mm-encoder-tp-mode weights",
    "tp2-data": "-tp 2 --mm-encoder-tp-mode data",
    # Data-parallel replicas as engine processes (the server's default with -dp > 1 on GPUs), the backend spelled
    # out: results from before the eighteenth session name the mesh `dpN`.
    "dp2": "-dp 2 --data-parallel-backend process",
    "tp4-weights": "-tp 4 --mm-encoder-tp-mode weights",
    "tp4-data": "-tp 4 --mm-encoder-tp-mode data",
    "dp4": "-dp 4 --data-parallel-backend process",
    "tp8-weights": "-tp 8 --mm-encoder-tp-mode weights",
    "tp8-data": "-tp 8 --mm-encoder-tp-mode data",
    "dp8": "-dp 8 --data-parallel-backend process",
    "dp2-tp4": "-dp 2 -tp 4 --data-parallel-backend process",
    # The one engine in a process of its own; the replicas as one engine over a (data, model) mesh.
    "single-proc": "--data-parallel-backend process",
    "dp2-mesh": "-dp 2 --data-parallel-backend mesh",
    "dp4-mesh": "-dp 4 --data-parallel-backend mesh",
    "dp8-mesh": "-dp 8 --data-parallel-backend mesh",
}
PLANS = {1: ["single"], 2: ["tp2-weights", "tp2-data", "dp2", "dp2-mesh"],
         4: ["tp4-weights", "tp4-data", "dp4", "dp4-mesh"],
         8: ["tp8-weights", "tp8-data", "dp8", "dp8-mesh", "dp2-tp4"]}


@dataclass(frozen=True)
class Workload:
    args: str  # `python -m bench serve` flags
    quick: str = ""  # appended under --quick (after QUICK_ARGS)


# The seed PR's runs and issue 5's list. Each workload has its own seed: the server caches encoder outputs by
# pixel content, so two workloads drawing the same images would turn the second into a cache-hit benchmark.
WORKLOADS = {
    # VisionArena-shaped closed loop at the PR's concurrency 64, then 8 (where the PR saw TTFT gains)
    "arena-c64": Workload("--dataset-name arena-like --num-prompts 1000 --max-concurrency 64 --seed 12345",
                          "--num-prompts 16"),
    "arena-c8": Workload("--dataset-name arena-like --num-prompts 1000 --max-concurrency 8 --seed 12346",
                         "--num-prompts 8"),
    # the AMD ROCm blog's random-mm row "512px x 3" (256 words in, 128 out, concurrency 64): 3 tiles a request
    "randommm-3img": Workload("--dataset-name random-mm --random-mm-base-items-per-request 3 "
                              "--random-mm-num-mm-items-range-ratio 0 --random-input-len 256 --random-output-len 128 "
                              "--random-mm-bucket-config '{(512, 512, 1): 1.0}' --num-prompts 500 "
                              "--max-concurrency 64 --seed 12347",
                              "--num-prompts 8 --random-mm-bucket-config '{(128, 128, 1): 1.0}'"),
    # the reviewer's open loop: Poisson arrivals at 1.8 req/s
    "rate-1.8": Workload("--dataset-name arena-like --num-prompts 128 --request-rate 1.8 --seed 12348",
                         "--num-prompts 8"),
    # issue 7 (8 GPUs): 10 images of 512 px a request, 10 tiles, as randommm-3img otherwise
    "randommm-10img": Workload("--dataset-name random-mm --random-mm-base-items-per-request 10 "
                               "--random-mm-num-mm-items-range-ratio 0 --random-input-len 256 --random-output-len 128 "
                               "--random-mm-bucket-config '{(512, 512, 1): 1.0}' --num-prompts 500 "
                               "--max-concurrency 64 --seed 12350",
                               "--num-prompts 8 --random-mm-bucket-config '{(128, 128, 1): 1.0}'"),
    # issue 6's TTFT target, one request at a time: a 7-tile image (1344 x 896: a 3 x 2 grid + thumbnail),
    # 90 words, 1 output token (TTFT as a client sees it: HTTP, image decode and tiling included)
    "ttft-7tile": Workload("--dataset-name random-mm --random-mm-base-items-per-request 1 "
                           "--random-mm-num-mm-items-range-ratio 0 --random-input-len 90 --random-output-len 1 "
                           "--random-mm-bucket-config '{(896, 1344, 1): 1.0}' --num-prompts 64 --max-concurrency 1 "
                           "--seed 12351",
                           "--num-prompts 4 --random-mm-bucket-config '{(128, 128, 1): 1.0}'"),
    # not in the default plan: the blog's encoder-heavy row, 1024 px x 3 = 30 tiles a request
    "randommm-3x1024": Workload("--dataset-name random-mm --random-mm-base-items-per-request 3 "
                                "--random-mm-num-mm-items-range-ratio 0 --random-input-len 256 "
                                "--random-output-len 128 --random-mm-bucket-config '{(1024, 1024, 1): 1.0}' "
                                "--num-prompts 256 --max-concurrency 64 --seed 12349",
                                "--num-prompts 8 --random-mm-bucket-config '{(128, 128, 1): 1.0}'"),
}
DEFAULT_WORKLOADS = ["arena-c64", "arena-c8", "randommm-3img", "rate-1.8"]
# --quick: small images, few words, short outputs (each workload also cuts its prompts)
QUICK_ARGS = "--arena-image-scale 0.25 --arena-input-len 16 --arena-output-len 8 --random-input-len 16 " \
             "--random-output-len 8"
# Before the workload's flags, so a workload or --client-args may change them.
CLIENT_DEFAULTS = "--percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99"

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # file names the device tool brings back
SERVER_COUNTERS = {  # summary key -> /metrics counter (summed over labels)
    "tiles_encoded": "internvl:image_tiles_encoded_total",
    "tiles_computed": "internvl:image_tiles_computed_total",
    "prefill_computed": "internvl:prefill_tokens_computed_total",
    "mm_cache_queries": "internvl:mm_cache_queries_total",
    "mm_cache_hits": "internvl:mm_cache_hits_total",
    "recompiles": "internvl:recompiles_total",
    "prompt_tokens": "internvl:prompt_tokens_total",
    "generation_tokens": "internvl:generation_tokens_total",
}
# An engine step's phases (internvl_jax.engine.STEP_PHASES; not imported: the client needs no JAX).
ENGINE_PHASES = ("schedule", "encode", "prefill", "decode", "process")
# The engine thread's seconds (counters, floats): inside steps, blocked on the GPU's results, on a core outside
# those waits, and per phase of a step ('name{label="value"}' sums only that label's series).
SERVER_SECONDS = {
    "engine_step_s": "internvl:engine_step_seconds_total",
    "engine_wait_s": "internvl:engine_device_wait_seconds_total",
    "engine_cpu_s": "internvl:engine_host_cpu_seconds_total",
    "process_cpu_s": "process_cpu_seconds_total",  # every thread of the server (HTTP, preprocessing, XLA)
    "worker_cpu_s": "internvl:image_worker_cpu_seconds_total",  # its image worker processes
    "engine_process_cpu_s": "internvl:engine_process_cpu_seconds_total",  # its engine processes, if any
    **{f"engine_{phase}_s": f'internvl:engine_phase_seconds_total{{phase="{phase}"}}' for phase in ENGINE_PHASES},
}
# Gauges read at the end of a run (not differenced).
SERVER_GAUGES = {"engines": "internvl:engines"}  # engine threads whose counters the engine_* seconds add up
# The server's per-request phases (histograms): a run's mean of each is (sum, count) after minus before.
SERVER_PHASES = {
    "preprocess": "internvl:request_preprocess_time_seconds",
    "queue": "internvl:request_queue_time_seconds",
    "prefill": "internvl:request_prefill_time_seconds",
    "ttft": "internvl:time_to_first_token_seconds",
}
RESULT_KEYS = ("completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
               "total_input_tokens", "total_output_tokens", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
               "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms",
               "max_concurrent_requests", "num_images", "estimated_image_tiles", "client_cpu_s")
NOT_RUN = ("skipped", "interrupted")  # run statuses that a merge never lets replace a measured run


class Interrupted(BaseException):
    """SIGTERM or SIGINT (Ctrl-C): stop the client and the server, write what was measured."""


def parse_named(specs: list[str], catalog: dict[str, Any], what: str) -> dict[str, str | None]:
    """`NAME` (from the catalog) or `NAME:FLAGS` -> {name: flags or None for the catalog's}."""
    named: dict[str, str | None] = {}
    for spec in specs:
        name, sep, flags = spec.partition(":")
        name = name.strip()
        if not NAME.fullmatch(name):
            raise ValueError(f"{what} {spec!r}: the name must be letters, digits, '.', '_' or '-'")
        if not sep and name not in catalog:
            raise ValueError(f"{what} {name!r} is not known ({', '.join(catalog)}); give its flags as "
                             f"'{name}:FLAGS'")
        if name in named:
            raise ValueError(f"{what} {name!r} is given twice")
        named[name] = flags if sep else None
    return named


def client_flags(name: str, custom: str | None, quick: bool, client_args: str) -> list[str]:
    """The `bench serve` flags of a workload, before the run's own (address, result file, label). Later flags
    win: a catalog workload is shrunk by --quick, a custom one (`NAME:FLAGS`) keeps its flags; --client-args last."""
    quick_args = QUICK_ARGS if quick else ""
    if custom is None:
        workload = WORKLOADS[name]
        text = [CLIENT_DEFAULTS, workload.args, quick_args, workload.quick if quick else ""]
    else:
        text = [CLIENT_DEFAULTS, quick_args, custom]
    return [flag for part in [*text, client_args] for flag in shlex.split(part)]


def model_flags(preset: str) -> list[str]:
    return [] if preset == DEMO else ["--model", preset, "--load-format", "dummy"]


# ---- a server -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


def parse_counters(text: str) -> dict[str, float]:
    """Our counters, and the phase histograms' `_sum` and `_count`, out of Prometheus text, summed over
    label sets (a server that predates a histogram reports 0 for it)."""
    series = {**SERVER_COUNTERS, **SERVER_SECONDS, **SERVER_GAUGES}
    for key, metric in SERVER_PHASES.items():
        series[f"{key}_sum"], series[f"{key}_count"] = metric + "_sum", metric + "_count"
    totals = dict.fromkeys(series.values(), 0.0)
    for line in text.splitlines():
        match = re.match(r"([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not match:
            continue
        name, labels, value = match.groups()
        for key in [name] + [f"{name}{{{pair}}}" for pair in re.findall(r'\w+="[^"]*"', labels or "")]:
            if key in totals:
                totals[key] += float(value)
    return {key: totals[metric] for key, metric in series.items()}


def tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def last_line(path: Path) -> str:
    lines = [line for line in re.split(r"[\r\n]", tail(path)) if line.strip()]
    return lines[-1].strip() if lines else "(empty)"


class Server:
    """`python -m serve` in a child process (same process group: the device tool's clean-up reaches it)."""

    def __init__(self, command: list[str], port: int, log_path: Path):
        self.log_path, self.url = log_path, f"http://127.0.0.1:{port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "w")  # noqa: SIM115 - open for the server's lifetime
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=os.environ | {"PYTHONUNBUFFERED": "1"})

    def wait_healthy(self, timeout: float) -> float:
        """Seconds from the process start to /health 200; raises RuntimeError if it exits or times out."""
        deadline = self.started + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode} before /health answered "
                                   f"(its log ends: {last_line(self.log_path)})\n{tail(self.log_path)}")
            try:
                if http_get(self.url + "/health", timeout=2)[0] == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"/health not ok {timeout:.0f} s after start (its log ends: "
                                   f"{last_line(self.log_path)})\n{tail(self.log_path)}")
            time.sleep(0.5)

    def counters(self) -> dict[str, float] | None:
        try:
            status, text = http_get(self.url + "/metrics", timeout=10)
        except OSError:
            return None
        return parse_counters(text) if status == 200 else None

    def stop(self, timeout: float) -> dict[str, Any]:
        """SIGTERM, then SIGKILL after `timeout` s. Returns how it ended."""
        stopped_by = "already exited"
        if self.process.poll() is None:
            started = time.monotonic()
            self.process.send_signal(signal.SIGTERM)
            stopped_by = "SIGTERM"
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                stopped_by = "SIGKILL"
            stop_s = time.monotonic() - started
        else:
            stop_s = 0.0
        self.log.close()
        return {"exit_code": self.process.returncode, "stopped_by": stopped_by, "stop_s": round(stop_s, 2)}


def compile_seconds(log_path: Path) -> float | None:
    match = re.search(r"compiled .* buckets in ([0-9.]+) s", tail(log_path, 200_000))
    return float(match.group(1)) if match else None


# ---- one workload ---------------------------------------------------------------------------------


def run_client(command: list[str], log_path: Path, timeout: float | None) -> tuple[int | None, float]:
    """The `bench serve` child; returns (exit code or None when stopped at `timeout`, seconds)."""
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env=os.environ | {"PYTHONUNBUFFERED": "1"})
        try:
            return process.wait(timeout), time.monotonic() - started
        except subprocess.TimeoutExpired:
            return None, time.monotonic() - started
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def summarise_result(result: dict[str, Any]) -> dict[str, Any]:
    from bench.plot import ttft_percentiles

    summary = {key: result.get(key) for key in RESULT_KEYS}
    if summary["p99_ttft_ms"] is None:  # a workload that changed --metric-percentiles: from the samples
        summary["p99_ttft_ms"] = float(ttft_percentiles(result, [99])[0])
    return summary


def counter_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any] | None:
    if before is None or after is None:
        return None
    delta = {key: round(after[key] - before[key]) for key in SERVER_COUNTERS}
    delta["recompiles_total"] = round(after["recompiles"])  # since the server started
    for key in SERVER_GAUGES:
        delta[key] = after.get(key) or None  # a server that predates the gauge: None
    for key in SERVER_SECONDS:
        delta[key] = round(after.get(key, 0) - before.get(key, 0), 3)
    for key in SERVER_PHASES:
        count = after.get(f"{key}_count", 0) - before.get(f"{key}_count", 0)
        seconds = after.get(f"{key}_sum", 0) - before.get(f"{key}_sum", 0)
        delta[f"{key}_ms"] = round(seconds / count * 1e3, 2) if count else None  # mean per request
    return delta


# ---- outputs --------------------------------------------------------------------------------------


def _cell(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _padding(server: dict[str, Any]) -> str:
    """'tiles / prefill': computed rows over real ones; '-' where the server does not count them (older trees)."""
    def ratio(computed, real):
        value = server.get(computed)
        return "-" if not value or not server.get(real) else f"{value / server[real]:.2f}"
    return f"{ratio('tiles_computed', 'tiles_encoded')} / {ratio('prefill_computed', 'prompt_tokens')}"


def recompile_warnings(summary: dict[str, Any]) -> list[str]:
    return [f"{run['preset']} {run['config']} {run['workload']}: {run['server']['recompiles']} recompile(s) while "
            f"serving ({run['server']['recompiles_total']} since start)"
            for run in summary["runs"] if run.get("server") and run["server"]["recompiles_total"]]


def runs_of(summary: dict[str, Any], preset: str, workload: str) -> list[dict[str, Any]]:
    """One workload's runs in the plan's config order (tables and chart colours agree across calls)."""
    order = list(summary["plan"]["configs"])
    return sorted((r for r in summary["runs"] if r["preset"] == preset and r["workload"] == workload),
                  key=lambda r: order.index(r["config"]) if r["config"] in order else len(order))


def markdown(summary: dict[str, Any]) -> str:
    meta = summary["meta"]
    lines = [f"# bench e2e: {', '.join(summary['plan']['presets'])}", "",
             f"- date: {meta.get('date')}; git commit: {meta.get('git_commit')}"
             f"{' (with uncommitted changes)' if meta.get('git_uncommitted') else ''}; source sha256: "
             f"{meta.get('source_sha256')}; host: {meta.get('host')}",
             f"- GPUs: {'; '.join(meta.get('gpus') or ['none found (nvidia-smi)'])}",
             f"- command: `{meta.get('command')}`", ""]
    if warnings := recompile_warnings(summary):
        lines += ["> **RECOMPILES WHILE SERVING (must be 0):**", *[f"> - {w}" for w in warnings], ""]
    if bad := [r for r in summary["runs"] if r["status"] != "ok"]:
        lines += ["**Runs that did not complete:**", "",
                  *[f"- {r['preset']} {r['config']} {r['workload']}: {r['status']}: "
                    f"{(r.get('error') or '').splitlines()[0] if r.get('error') else ''}" for r in bad], ""]
    lines += ["## Servers", "", "| preset | config | flags | start-up to /health (s) | compile (s) | status | exit |",
              "|---|---|---|---:|---:|---|---|"]
    for server in summary["servers"]:
        error = f": {server['error'].splitlines()[0]}" if server.get("error") else ""
        lines.append(f"| {server['preset']} | {server['config']} | `{server['flags'] or '-'}` | "
                     f"{_cell(server.get('startup_s'))} | {_cell(server.get('compile_s'))} | {server['status']}{error} "
                     f"| {server.get('stopped_by', '-')}, code {server.get('exit_code')} |")
    order = list(summary["plan"]["configs"])
    lines += ["", "## Results", "",
              f"TTFT and TPOT in ms; `vs`: req/s against {order[0] if order else '-'} (the plan's first config); "
              "`tiles`, `padding`, `cache` and `recompiles` come from the server's /metrics (difference over the run); "
              "`padding`: the encoder's tile rows per tile and the prefill's positions per prompt token (1.00: no "
              "padding to buckets).", ""]
    header = ("| preset | workload | config | status | req/s | vs | out tok/s | TTFT mean | TTFT median | TTFT P99 "
              "| TPOT mean | ok | failed | tiles | padding tiles / prefill | cache hits/queries | recompiles |")
    lines += [header, "|" + "---|" * 3 + "---|" + "---:|" * 13]
    for preset in summary["plan"]["presets"]:
        for workload in summary["plan"]["workloads"]:
            runs = runs_of(summary, preset, workload)
            first = runs[0] if runs and runs[0]["config"] == order[0] else {}
            baseline = (first.get("result") or {}).get("request_throughput")
            for run in runs:
                result, server = run.get("result") or {}, run.get("server") or {}
                ratio = (result["request_throughput"] / baseline if result and baseline else None)
                cache = f"{server['mm_cache_hits']}/{server['mm_cache_queries']}" if server else "-"
                lines.append("| " + " | ".join([
                    preset, workload, run["config"], run["status"], _cell(result.get("request_throughput"), 2),
                    f"{ratio:.2f}x" if ratio else "-", _cell(result.get("output_throughput"), 0),
                    _cell(result.get("mean_ttft_ms")), _cell(result.get("median_ttft_ms")),
                    _cell(result.get("p99_ttft_ms")), _cell(result.get("mean_tpot_ms"), 2),
                    _cell(result.get("completed")), _cell(result.get("failed")), _cell(server.get("tiles_encoded")),
                    _padding(server), cache, _cell(server.get("recompiles"))]) + " |")
    phased = [run for run in summary["runs"] if (run.get("server") or {}).get("ttft_ms") is not None]
    if phased:
        lines += ["", "## Where the first token's time goes (server side)", "",
                  "Means per request over the run, ms, from the server's histograms: `preprocess` (HTTP handler to "
                  "engine: parsing, image decoding and tiling, tokenizing), `queue` (waiting for a slot), `prefill` "
                  "(admitted to first token: encoder, prefill, the shared engine step), `engine TTFT` (queue + "
                  "prefill). The client's TTFT adds `preprocess`, HTTP and streaming. The engine thread's share of "
                  "the run's duration: `host CPU` (on a core: scheduling, building inputs, dispatching, "
                  "detokenizing), `off-CPU` (inside a step, neither on a core nor waiting for a result: the GIL "
                  "held by the HTTP or preprocessing threads, or a dispatch blocked in the runtime, e.g. a "
                  "multi-device launch), `waits on GPU` (blocked on a dispatch's results); the rest it was idle. "
                  "High host shares mean the GPUs wait on the host. "
                  "`server cores`: the CPU seconds of the server process (all threads), of its image worker "
                  "processes and of its engine processes (if any) per second of the run; with engine processes the "
                  "engine thread's shares are per engine. `API process`: the server process's alone (HTTP, "
                  "templating, tokenizing; the engine thread too without engine processes); `client`: the "
                  "benchmark client's. Either near 1.00 is one interpreter's GIL at its limit: that process may "
                  "bound the rate.",
                  "",
                  "| preset | workload | config | client TTFT | preprocess | queue | prefill | engine TTFT "
                  "| host CPU | off-CPU | waits on GPU | server cores | API process | client |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for run in phased:
            server, result = run["server"], run.get("result") or {}
            duration = result.get("duration")
            step, wait, cpu = (server.get(k) for k in ("engine_step_s", "engine_wait_s", "engine_cpu_s"))
            # Per engine thread: with engine processes the counters add up every replica's.
            threads = duration * (server.get("engines") or 1) if duration else None
            shares = (["-"] * 4 if not duration or step is None else
                      [f"{cpu / threads:.0%}" if cpu else "-",
                       f"{(step - wait - cpu) / threads:.0%}" if cpu else f"{(step - wait) / threads:.0%} (all host)",
                       f"{wait / threads:.0%}",
                       _cell((server["process_cpu_s"] + (server.get("worker_cpu_s") or 0)
                              + (server.get("engine_process_cpu_s") or 0)) / duration, 2)
                       if server.get("process_cpu_s") else "-"])
            cores = [_cell(seconds / duration, 2) if duration and seconds is not None else "-"
                     for seconds in (server.get("process_cpu_s"), result.get("client_cpu_s"))]
            lines.append("| " + " | ".join([
                run["preset"], run["workload"], run["config"], _cell(result.get("mean_ttft_ms")),
                _cell(server.get("preprocess_ms")), _cell(server.get("queue_ms")), _cell(server.get("prefill_ms")),
                _cell(server.get("ttft_ms")), *shares, *cores]) + " |")
        lines += ["", "The engine thread's seconds per step phase over the run (summed over engine processes, if "
                  "any): `schedule` (requests in, slots), "
                  "`encode` (tiles to the device, encoder dispatch), `prefill` (building and dispatching prefills), "
                  "`decode` (dispatch), `process` (reading tokens back, detokenizing, emitting; includes the waits on "
                  "the GPU, shown apart).", "",
                  "| preset | workload | config | duration s | " + " | ".join(ENGINE_PHASES)
                  + " | of which GPU waits |",
                  "|---|---|---|---:|" + "---:|" * (len(ENGINE_PHASES) + 1)]
        for run in phased:
            server, result = run["server"], run.get("result") or {}
            lines.append("| " + " | ".join([
                run["preset"], run["workload"], run["config"], _cell(result.get("duration"), 1),
                *(_cell(server.get(f"engine_{phase}_s"), 2) for phase in ENGINE_PHASES),
                _cell(server.get("engine_wait_s"), 2)]) + " |")
    lines += ["", "## Plan", "", "| config | server flags |", "|---|---|"]
    lines += [f"| {name} | `{flags or '-'}` |" for name, flags in summary["plan"]["configs"].items()]
    lines += ["", "| workload | `bench serve` flags |", "|---|---|"]
    lines += [f"| {name} | `{' '.join(map(shlex.quote, flags))}` |"
              for name, flags in summary["plan"]["workload_flags"].items()]
    lines += ["", "Every server: `python -m serve --model PRESET --load-format dummy` (demo: neither flag) + the "
              f"config's flags + `{summary['plan']['server_args'] or ''}` + `--host 127.0.0.1 --port P`.", ""]
    return "\n".join(lines)


def plot_presets(summary: dict[str, Any], work_dir: Path, result_dir: Path) -> list[Path]:
    """Per workload one `plot_results` chart comparing configs; per preset the charts stacked in one PNG."""
    from PIL import Image

    from bench.plot import load_result, plot_results

    written = []
    for preset in summary["plan"]["presets"]:
        panels = []
        for workload in summary["plan"]["workloads"]:
            runs = [r for r in runs_of(summary, preset, workload)
                    if r.get("result_file") and (work_dir / r["result_file"]).is_file()]
            if not runs:
                continue
            results = []
            for run in runs:
                result = load_result(work_dir / run["result_file"])
                result["label"] = run["config"]
                results.append(result)
            first = results[0]
            load = (f"concurrency {first['max_concurrency']}" if first.get("max_concurrency")
                    else f"{first.get('request_rate')} req/s")
            title = f"{preset}, {workload}: {first.get('dataset_name')}, {first.get('num_prompts')} prompts, {load}"
            panels.append(plot_results(results, work_dir / "plots" / f"{preset}-{workload}.png", title))
        if panels:
            images = [Image.open(path).convert("RGB") for path in panels]
            canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
            top = 0
            for image in images:
                canvas.paste(image, (0, top))
                top += image.height
            path = result_dir / f"e2e-{preset}.png"
            canvas.save(path, optimize=True)
            written.append(path)
    return written


def write_outputs(summary: dict[str, Any], work_dir: Path, result_dir: Path, plots: bool) -> None:
    """Summary JSON + markdown, the plots (when asked: they take seconds) and the tarball of the raw files."""
    result_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        summary["plots"] = [path.name for path in plot_presets(summary, work_dir, result_dir)]
    write_json(work_dir / "e2e-summary.json", summary)
    write_json(result_dir / "e2e-summary.json", summary)
    (result_dir / "e2e-summary.md").write_text(markdown(summary))
    partial = result_dir / ".e2e-raw.tar.gz.tmp"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(work_dir, arcname="e2e-raw")
    partial.replace(result_dir / "e2e-raw.tar.gz")


# ---- the orchestration ----------------------------------------------------------------------------


def gpu_names() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


class Orchestrator:
    def __init__(self, args: argparse.Namespace, argv: list[str], work_dir: Path):
        self.args, self.work_dir, self.result_dir = args, work_dir, Path(args.result_dir)
        self.deadline = time.monotonic() + args.time_limit if args.time_limit else None
        configs = parse_named(args.configs or PLANS[args.gpus], CONFIGS, "config")
        workloads = parse_named(args.workloads, WORKLOADS, "workload")
        self.configs = {name: flags if flags is not None else CONFIGS[name] for name, flags in configs.items()}
        self.workloads = {name: client_flags(name, custom, args.quick, args.client_args)
                          for name, custom in workloads.items()}
        self.summary: dict[str, Any] = {
            "meta": run_metadata(argv, "bench e2e") | {"command": shlex.join(["python", "-m", "bench", "e2e", *argv]),
                                                        "gpus": gpu_names()},
            "plan": {"presets": args.presets, "configs": self.configs, "workloads": list(self.workloads),
                     "workload_flags": self.workloads, "server_args": args.server_args, "quick": args.quick,
                     "time_limit_s": args.time_limit},
            "servers": [], "runs": [],
        }

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def out_of_time(self) -> bool:
        remaining = self.remaining()
        return remaining is not None and remaining <= 0

    def server_command(self, preset: str, flags: str, port: int) -> list[str]:
        return [sys.executable, "-m", "serve", *model_flags(preset), *shlex.split(flags),
                *shlex.split(self.args.server_args), "--host", "127.0.0.1", "--port", str(port)]

    def client_command(self, url: str, config: str, flags: list[str], result_dir: Path, filename: str) -> list[str]:
        return [sys.executable, "-m", "bench", "serve", *flags, "--base-url", url, "--backend", "openai-chat",
                "--ignore-eos", "--disable-tqdm", "--save-result", "--result-dir", str(result_dir),
                "--result-filename", filename, "--label", config]

    def record_run(self, preset: str, config: str, workload: str, status: str, **fields: Any) -> dict[str, Any]:
        run = {"preset": preset, "config": config, "workload": workload, "status": status} | fields
        self.summary["runs"].append(run)
        return run

    def run(self) -> None:
        plan = [(p, c) for p in self.args.presets for c in self.configs]
        bar = tqdm(total=len(plan) * len(self.workloads), desc="bench e2e", unit="run", dynamic_ncols=True)
        try:
            for preset, config in plan:
                self.run_config(preset, config, bar)
                write_outputs(self.summary, self.work_dir, self.result_dir, plots=True)
        except Interrupted:
            for signum in (signal.SIGTERM, signal.SIGINT):  # let the clean-up below finish
                signal.signal(signum, signal.SIG_IGN)
            tqdm.write("bench e2e: interrupted: writing what was measured")
            self.summary["interrupted"] = True
        finally:
            bar.close()
            done = {(r["preset"], r["config"], r["workload"]) for r in self.summary["runs"]}
            status, why = (("interrupted", "not run or not finished: a signal") if self.summary.get("interrupted")
                           else ("skipped", "not run: --time-limit"))
            for preset, config in plan:
                for workload in self.workloads:
                    if (preset, config, workload) not in done:
                        self.record_run(preset, config, workload, status, error=why)
            write_outputs(self.summary, self.work_dir, self.result_dir, plots=True)

    def run_config(self, preset: str, config: str, bar: tqdm) -> None:
        if self.out_of_time():
            return
        flags = self.configs[config]
        record = {"preset": preset, "config": config, "flags": flags, "status": "starting"}
        self.summary["servers"].append(record)
        port = free_port()
        command = self.server_command(preset, flags, port)
        record["command"] = " ".join(map(shlex.quote, ["python", *command[1:]]))
        record["log"] = f"logs/{preset}/{config}-server.log"
        bar.set_description(f"{preset} {config}: starting")
        tqdm.write(f"== {preset} {config}: {record['command']}")
        server = Server(command, port, self.work_dir / record["log"])
        record["pid"] = server.process.pid
        try:
            timeout = self.args.startup_timeout
            if (remaining := self.remaining()) is not None:
                timeout = min(timeout, remaining)
            try:
                record["startup_s"] = round(server.wait_healthy(timeout), 2)
            except RuntimeError as error:
                if self.out_of_time():  # cut short by --time-limit: its runs are recorded as skipped
                    record |= {"status": "timed out", "error": str(error)}
                    return
                record |= {"status": "failed", "error": str(error)}
                tqdm.write(f"!! {preset} {config}: server did not come up: {str(error).splitlines()[0]}")
                for workload in self.workloads:
                    self.record_run(preset, config, workload, "failed", error="server did not come up")
                    bar.update()
                return
            record |= {"status": "ok", "compile_s": compile_seconds(server.log_path)}
            tqdm.write(f"   up in {record['startup_s']:.1f} s (compile {_cell(record['compile_s'])} s)")
            for workload in self.workloads:
                self.run_workload(preset, config, workload, server, bar)
                write_outputs(self.summary, self.work_dir, self.result_dir, plots=False)
        finally:
            if record["status"] == "starting":  # SIGTERM while it started
                record["status"] = "interrupted"
            record |= server.stop(self.args.stop_timeout)
            record["compile_s"] = record.get("compile_s") or compile_seconds(server.log_path)
            tqdm.write(f"   server stopped: {record['stopped_by']}, exit code {record['exit_code']}")

    def run_workload(self, preset: str, config: str, workload: str, server: Server, bar: tqdm) -> None:
        bar.set_description(f"{preset} {config} {workload}")
        if self.out_of_time():
            return
        if server.process.poll() is not None:
            self.record_run(preset, config, workload, "failed",
                            error=f"server exited with code {server.process.returncode}")
            bar.update()
            return
        filename = f"{config}-{workload}.json"
        result_file = f"runs/{preset}/{filename}"
        client_log = f"logs/{preset}/{config}-{workload}-client.log"
        command = self.client_command(server.url, config, self.workloads[workload], self.work_dir / "runs" / preset,
                                      filename)
        (self.work_dir / client_log).parent.mkdir(parents=True, exist_ok=True)
        before = server.counters()
        code, seconds = run_client(command, self.work_dir / client_log, self.remaining())
        after = server.counters()
        fields = {"wall_s": round(seconds, 2), "client_log": client_log,
                  "command": " ".join(map(shlex.quote, ["python", *command[1:]])),
                  "server": counter_delta(before, after)}
        path = self.work_dir / result_file
        if code == 0 and path.is_file():
            result = summarise_result(json.loads(path.read_text()))
            status = "ok" if not result["failed"] else "requests failed"
            run = self.record_run(preset, config, workload, status, result=result, result_file=result_file, **fields)
            tqdm.write(self.one_line(run))
        else:
            error = "stopped at --time-limit" if code is None else f"bench serve exited with code {code}"
            self.record_run(preset, config, workload, "timed out" if code is None else "failed",
                            error=f"{error}:\n{tail(self.work_dir / client_log)}", **fields)
            tqdm.write(f"!! {preset} {config} {workload}: {error}")
        bar.update()

    @staticmethod
    def one_line(run: dict[str, Any]) -> str:
        result, server = run["result"], run["server"] or {}
        text = (f"   {run['config']} {run['workload']}: {result['completed']} ok, {result['failed']} failed in "
                f"{result['duration']:.1f} s; {result['request_throughput']:.2f} req/s, "
                f"{result['output_throughput']:.0f} out tok/s; TTFT mean {result['mean_ttft_ms']:.0f} ms, "
                f"P99 {result['p99_ttft_ms']:.0f} ms; TPOT mean {_cell(result['mean_tpot_ms'], 2)} ms")
        if server:
            text += (f"; tiles {server['tiles_encoded']}, cache {server['mm_cache_hits']}/"
                     f"{server['mm_cache_queries']}, recompiles {server['recompiles']}")
            if server.get("ttft_ms") is not None:
                text += (f"; server ms: preprocess {_cell(server['preprocess_ms'])}, "
                         f"queue {_cell(server['queue_ms'])}, prefill {_cell(server['prefill_ms'])}")
            if server["recompiles_total"]:
                text += "  <-- RECOMPILES WHILE SERVING (must be 0)"
        return text


# ---- --collect: merge the tarballs of several calls -----------------------------------------------


def collect(tarballs: list[str], work_dir: Path) -> dict[str, Any]:
    """One summary out of several calls' `e2e-raw.tar.gz`: later tarballs win for the same preset/config/run."""
    merged: dict[str, Any] | None = None
    servers: dict[tuple, dict] = {}
    runs: dict[tuple, dict] = {}
    for path in tarballs:
        with tempfile.TemporaryDirectory() as scratch, tarfile.open(path) as tar:
            tar.extractall(scratch, filter="data")
            root = Path(scratch) / "e2e-raw"
            summary = json.loads((root / "e2e-summary.json").read_text())
            shutil.copytree(root, work_dir, dirs_exist_ok=True)
        if merged is None:
            merged = summary | {"sources": []}
        else:
            plan = merged["plan"]
            plan["presets"] += [p for p in summary["plan"]["presets"] if p not in plan["presets"]]
            plan["configs"] |= summary["plan"]["configs"]
            plan["workloads"] += [w for w in summary["plan"]["workloads"] if w not in plan["workloads"]]
            plan["workload_flags"] |= summary["plan"]["workload_flags"]
            merged["meta"]["gpus"] = sorted(set(merged["meta"]["gpus"]) | set(summary["meta"]["gpus"]))
        merged["sources"].append({"tarball": str(path), "meta": summary["meta"]})
        servers |= {(s["preset"], s["config"]): s for s in summary["servers"]}
        runs |= {(r["preset"], r["config"], r["workload"]): r for r in summary["runs"]
                 if r["status"] not in NOT_RUN or (r["preset"], r["config"], r["workload"]) not in runs}
    merged["servers"], merged["runs"] = list(servers.values()), list(runs.values())
    return merged


# ---- command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench e2e", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="configs: " + ", ".join(f"{k} ({v or 'no flags'})" for k, v in
                                                                    CONFIGS.items())
                                     + "\nworkloads: " + ", ".join(WORKLOADS))
    parser.add_argument("--presets", "--preset", dest="presets", default="InternVL3-1B",
                        help="Comma-separated presets served with --load-format dummy; 'demo' is the built-in "
                             "demo model (no --model). Default: InternVL3-1B.")
    parser.add_argument("--gpus", type=int, choices=sorted(PLANS), default=2,
                        help="Default configs: 1 single, 2 tp2-weights tp2-data dp2 dp2-mesh, 4 tp4-weights tp4-data "
                             "dp4 dp4-mesh, 8 tp8-weights tp8-data dp8 dp8-mesh dp2-tp4.")
    parser.add_argument("--configs", nargs="+", default=None, metavar="NAME[:FLAGS]",
                        help="Server configs: names from the list below or 'NAME:serve flags' (first = baseline).")
    parser.add_argument("--workloads", nargs="+", default=DEFAULT_WORKLOADS, metavar="NAME[:FLAGS]",
                        help="Workloads: names from the list below or 'NAME:bench serve flags'. "
                             f"Default: {' '.join(DEFAULT_WORKLOADS)}.")
    parser.add_argument("--quick", action="store_true", help="Few prompts, small images, short outputs (smoke test).")
    parser.add_argument("--server-args", default="", help="Flags added to every server, e.g. '--max-num-seqs 64'.")
    parser.add_argument("--client-args", default="", help="Flags added to every `bench serve` run (they win).")
    parser.add_argument("--result-dir", default="results/e2e", help="Where the summary, PNGs and tarball go.")
    parser.add_argument("--work-dir", default=None,
                        help="Per-run JSONs and logs (kept); default: a temporary folder, removed once tarred.")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="Stop after S seconds: the run in progress is stopped, the rest skipped, all written.")
    parser.add_argument("--startup-timeout", type=float, default=600, metavar="S", help="Per server, to /health.")
    parser.add_argument("--stop-timeout", type=float, default=60, metavar="S",
                        help="After SIGTERM, SIGKILL once this passes.")
    parser.add_argument("--collect", nargs="+", default=None, metavar="E2E-RAW.tar.gz",
                        help="Run nothing: merge these tarballs of earlier calls into one summary and plots.")
    parser.add_argument("--dry-run", action="store_true", help="Print the plan's commands and exit.")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if unknown := [p for p in args.presets if p not in preset_choices()]:
        parser.error(f"--presets: unknown {unknown}; known: {', '.join(preset_choices())}")
    keep = args.work_dir is not None
    work_dir = Path(args.work_dir) if keep else Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        if args.collect:
            summary = collect(args.collect, work_dir)
            write_outputs(summary, work_dir, Path(args.result_dir), plots=True)
        else:
            try:
                orchestrator = Orchestrator(args, argv, work_dir)
            except ValueError as error:
                parser.error(str(error))
            if args.dry_run:
                for preset in args.presets:
                    for config, flags in orchestrator.configs.items():
                        print(" ".join(map(shlex.quote, orchestrator.server_command(preset, flags, 0))))
                        for workload, client in orchestrator.workloads.items():
                            print("   ", " ".join(map(shlex.quote, orchestrator.client_command(
                                "http://127.0.0.1:0", config, client, work_dir / "runs" / preset,
                                f"{config}-{workload}.json"))))
                return 0

            def interrupt(signum, frame):
                raise Interrupted

            previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
            try:
                orchestrator.run()
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
            summary = orchestrator.summary
    finally:
        if not keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(markdown(summary))
    for warning in recompile_warnings(summary):
        print(f"!!! RECOMPILES WHILE SERVING: {warning}", file=sys.stderr)
    print(f"bench e2e: wrote {', '.join(sorted(p.name for p in Path(args.result_dir).glob('e2e-*')))} "
          f"in {args.result_dir}")
    ok = all(run["status"] == "ok" for run in summary["runs"]) and not recompile_warnings(summary)
    return 0 if ok and summary["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
