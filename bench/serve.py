r"""`python -m bench serve`: load an OpenAI-compatible server and report what `vllm bench serve` reports.

    python -m bench serve --backend openai-chat --endpoint /v1/chat/completions --model M \
        --dataset-name arena-like --num-prompts 1000 --max-concurrency 64 --seed 12345 --save-result

    dataset (bench/datasets.py) -> request bodies (JSON, serialised before the clock starts)
      -> arrival times (all at t=0 for --request-rate inf, else gamma gaps: Poisson at --burstiness 1)
      -> streaming POSTs under a --max-concurrency semaphore (aiohttp, SSE)
      -> per request: TTFT, chunk gaps (ITL), E2EL, token counts from the server's `usage`
      -> the vLLM result block, a JSON file (--save-result), charts (--plot)

Metric definitions follow vLLM's client (`vllm/benchmarks/serve.py`, `lib/endpoint_request_func.py`):
- TTFT: request sent -> first SSE chunk that carries a choice. One deviation: a leading chunk with neither
  text nor finish_reason (the `{"role": "assistant"}` announcement) is not a token, since a server may send
  it before prefill. vLLM's own server sends it with the first token, where the two rules agree.
- ITL: the gap between consecutive token chunks, one value per chunk. A chunk carrying k tokens gives one
  gap, not k: vLLM does not spread them, so with multi-token chunks mean ITL exceeds TPOT.
- TPOT (excl. 1st token): (E2EL - TTFT) / (output_tokens - 1), only for requests with > 1 output token.
- E2EL: request sent -> last token chunk (the trailing usage chunk does not count).
- output tokens and input tokens: `usage.completion_tokens` / `usage.prompt_tokens` of the final chunk
  (`stream_options.include_usage`); input tokens therefore include the chat template and image tokens.
  Without usage, the output count falls back to the number of token chunks (the JSON says how many).
- Peak output token throughput: the most token chunks in one 1 s bucket; peak concurrent requests: a
  sweep over [sent, last token) intervals. Both over successful requests only, as in vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import json
import math
import os
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm

from bench.datasets import SampleRequest, add_dataset_args, get_samples, request_tiles

BACKENDS = {"openai-chat": "/v1/chat/completions", "openai": "/v1/completions"}
METRICS = {  # name -> (short name, section header), in the order vLLM prints them
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
    "client_queue_time": ("Client Queue Time", "Client-side Queueing"),
}
TIMEOUT = aiohttp.ClientTimeout(total=6 * 60 * 60)


@dataclass
class RequestOutput:
    success: bool = False
    error: str = ""
    prompt_len: int = 0  # the dataset's estimate until the server's usage.prompt_tokens arrives
    output_tokens: int = 0
    usage_reported: bool = False
    ttft: float = 0.0  # seconds, like every time here
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0  # time.perf_counter() when the request was sent
    client_queue_time: float = 0.0  # waiting for the --max-concurrency semaphore
    generated_text: str = ""


# ---- one request -----------------------------------------------------------------------------


class SSEDecoder:
    """Turns the bytes of a text/event-stream into the `data` of each complete event."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""
        self._carriage_return = False  # a chunk ended in "\r": its "\n" may open the next chunk

    def feed(self, chunk: bytes) -> list[str]:
        text = self._utf8.decode(chunk)
        if self._carriage_return and text.startswith("\n"):
            text = text[1:]
        self._carriage_return = text.endswith("\r")
        self._buffer += text.replace("\r\n", "\n").replace("\r", "\n")
        events = []
        while "\n\n" in self._buffer:
            event, self._buffer = self._buffer.split("\n\n", 1)
            events += self._data(event)
        return events

    def close(self) -> list[str]:
        """The last event, when the stream ended without its blank line."""
        event, self._buffer = self._buffer, ""
        return self._data(event)

    @staticmethod
    def _data(event: str) -> list[str]:
        lines = [line[5:].removeprefix(" ") for line in event.split("\n") if line.startswith("data:")]
        return ["\n".join(lines)] if lines else []  # comments (":ping") and other fields carry no data


def build_body(request: SampleRequest, backend: str, model: str, ignore_eos: bool, extra_body: dict) -> bytes:
    """The JSON body of one streaming request (vLLM's payloads, images after the text)."""
    if backend == "openai-chat":
        content = [{"type": "text", "text": request.prompt}] + [image.content_part() for image in request.images]
        payload: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}],
                                   "max_completion_tokens": request.expected_output_len}
    else:
        if request.images:
            raise ValueError("--backend openai (/v1/completions) takes text only; use --backend openai-chat")
        payload = {"model": model, "prompt": request.prompt, "max_tokens": request.expected_output_len}
    payload |= {"stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        payload["ignore_eos"] = True
    return json.dumps(payload | extra_body).encode()


class _StreamError(Exception):
    pass


async def send_request(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
                       prompt_len: int, chat: bool) -> RequestOutput:
    """POST one streaming request and time it. Never raises: a failure is an output with `error` set."""
    output = RequestOutput(prompt_len=prompt_len)
    output.start_time = last_token = time.perf_counter()
    texts: list[str] = []

    def on_event(data: str, now: float) -> None:
        nonlocal last_token
        if data.strip() == "[DONE]":
            return
        message = json.loads(data)
        if "error" in message:
            error = message["error"]
            raise _StreamError(f"error event: {error.get('message', error) if isinstance(error, dict) else error}")
        if usage := message.get("usage"):
            if usage.get("completion_tokens") is not None:
                output.output_tokens, output.usage_reported = int(usage["completion_tokens"]), True
            if usage.get("prompt_tokens") is not None:
                output.prompt_len = int(usage["prompt_tokens"])
        if not (choices := message.get("choices")):
            return  # the trailing usage chunk: no token
        choice = choices[0]
        text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
        if not texts and not text and choice.get("finish_reason") is None:
            return  # role announcement before any token (see the module docstring)
        if not texts:
            output.ttft = now - output.start_time
        else:
            output.itl.append(now - last_token)
        last_token = now
        texts.append(text or "")

    try:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                detail = (await response.text()).strip()
                raise _StreamError(f"HTTP {response.status} {response.reason}: {detail[:500]}")
            decoder = SSEDecoder()
            async for chunk in response.content.iter_any():
                now = time.perf_counter()  # one arrival time for every event in this read
                for data in decoder.feed(chunk):
                    on_event(data, now)
            for data in decoder.close():
                on_event(data, time.perf_counter())
        if not texts:
            raise _StreamError("the stream ended without a token chunk")
        output.success = True
    except Exception as error:  # any failure of one request is that request's error, never the run's
        output.error = str(error) if isinstance(error, _StreamError) else f"{type(error).__name__}: {error}"
    output.latency = last_token - output.start_time
    output.generated_text = "".join(texts)
    if output.success and not output.usage_reported:
        output.output_tokens = len(texts)
    return output


# ---- load shape ------------------------------------------------------------------------------


def sample_intervals(num: int, request_rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Gaps between arrivals: gamma(shape=burstiness, scale=1/(rate*burstiness)), mean 1/rate and
    coefficient of variation 1/sqrt(burstiness); burstiness 1 is a Poisson process."""
    if not burstiness > 0:
        raise ValueError(f"--burstiness must be > 0, got {burstiness}")
    if not request_rate > 0:
        raise ValueError(f"--request-rate must be > 0, got {request_rate}")
    if math.isinf(request_rate):
        return np.zeros(num)
    if math.isinf(burstiness):
        return np.full(num, 1.0 / request_rate)
    return rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num)


def arrival_offsets(num: int, request_rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send times from the start (s). As vLLM, the cumulative gaps are rescaled so the last request goes out
    at exactly num / rate: runs with different seeds then offer the same average load."""
    offsets = np.cumsum(sample_intervals(num, request_rate, burstiness, rng))
    if offsets[-1] > 0:
        offsets *= (num / request_rate) / offsets[-1]
    return offsets


# ---- metrics ---------------------------------------------------------------------------------


def _summary(name: str, values: list[float], percentiles: list[float]) -> dict[str, float]:
    """mean/median/std/pXX of `values` (seconds) in ms, as vLLM names them; zeros when there are none."""
    data = np.asarray(values if values else [0.0]) * 1000
    stats = {f"mean_{name}_ms": float(np.mean(data)), f"median_{name}_ms": float(np.median(data)),
             f"std_{name}_ms": float(np.std(data))}
    for p in percentiles:
        stats[f"p{percentile_word(p)}_{name}_ms"] = float(np.percentile(data, p))
    return stats


def percentile_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def token_times(output: RequestOutput) -> np.ndarray:
    """Arrival time of each token chunk: first at start + TTFT, then one per ITL gap."""
    return output.start_time + output.ttft + np.concatenate([[0.0], np.cumsum(output.itl)])


def peak_output_throughput(outputs: list[RequestOutput]) -> float:
    """The most token chunks arriving within one 1 s bucket from the first request's start (vLLM)."""
    done = [o for o in outputs if o.success]
    if not done:
        return 0.0
    origin = min(o.start_time for o in done)
    seconds = np.concatenate([token_times(o) for o in done]) - origin
    return float(np.bincount(seconds.astype(int)).max())


def peak_concurrency(outputs: list[RequestOutput]) -> int:
    """The most requests in flight at once over half-open [start, start + latency) intervals (vLLM)."""
    events = sorted([(o.start_time, 1) for o in outputs if o.success] +
                    [(o.start_time + o.latency, -1) for o in outputs if o.success])
    level = peak = 0
    for _time, step in events:  # at equal times the -1 sorts first: an end frees its place first
        level += step
        peak = max(peak, level)
    return peak


def calculate_metrics(outputs: list[RequestOutput], duration: float, percentiles: list[float]) -> dict[str, Any]:
    done = [o for o in outputs if o.success]
    if not done:
        warnings.warn("All requests failed. This is likely due to a misconfiguration on the benchmark arguments.",
                      stacklevel=2)
    total_input = sum(o.prompt_len for o in done)
    total_output = sum(o.output_tokens for o in done)
    tpots = [(o.latency - o.ttft) / (o.output_tokens - 1) for o in done if o.output_tokens > 1]
    metrics: dict[str, Any] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(outputs) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "max_output_tokens_per_s": peak_output_throughput(outputs),
        "max_concurrent_requests": peak_concurrency(outputs),
    }
    metrics |= _summary("ttft", [o.ttft for o in done], percentiles)
    metrics |= _summary("tpot", tpots, percentiles)
    metrics |= _summary("itl", [gap for o in done for gap in o.itl], percentiles)
    metrics |= _summary("e2el", [o.latency for o in done], percentiles)
    metrics |= _summary("client_queue_time", [o.client_queue_time for o in done], percentiles)
    return metrics


def format_result(metrics: dict[str, Any], *, selected_metrics: list[str], percentiles: list[float],
                  max_concurrency: int | None, request_rate: float) -> str:
    """vLLM's result block, line for line."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: Any, spec: str = "") -> None:
        lines.append(f"{label:<40} {value:<10{spec}}")

    row("Successful requests:", metrics["completed"])
    row("Failed requests:", metrics["failed"])
    if max_concurrency is not None:
        row("Maximum request concurrency:", max_concurrency)
    if not math.isinf(request_rate):
        row("Request rate configured (RPS):", request_rate, ".2f")
    row("Benchmark duration (s):", metrics["duration"], ".2f")
    row("Total input tokens:", metrics["total_input_tokens"])
    row("Total generated tokens:", metrics["total_output_tokens"])
    row("Request throughput (req/s):", metrics["request_throughput"], ".2f")
    row("Output token throughput (tok/s):", metrics["output_throughput"], ".2f")
    row("Peak output token throughput (tok/s):", metrics["max_output_tokens_per_s"], ".2f")
    row("Peak concurrent requests:", metrics["max_concurrent_requests"], ".2f")
    row("Total token throughput (tok/s):", metrics["total_token_throughput"], ".2f")
    for name in METRICS:
        if name not in selected_metrics:
            continue
        short, header = METRICS[name]
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        row(f"Mean {short} (ms):", metrics[f"mean_{name}_ms"], ".2f")
        row(f"Median {short} (ms):", metrics[f"median_{name}_ms"], ".2f")
        for p in percentiles:
            row(f"P{percentile_word(p)} {short} (ms):", metrics[f"p{percentile_word(p)}_{name}_ms"], ".2f")
    lines.append("=" * 50)
    return "\n".join(lines)


# ---- the run ---------------------------------------------------------------------------------


def _headers(args: argparse.Namespace) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key := args.api_key or os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


async def first_model(session: aiohttp.ClientSession, base_url: str, headers: dict[str, str]) -> str:
    url = f"{base_url}/v1/models"
    try:
        async with session.get(url, headers=headers) as response:
            response.raise_for_status()
            models = (await response.json()).get("data") or []
    except (aiohttp.ClientError, json.JSONDecodeError, OSError) as error:
        raise SystemExit(f"bench serve: no --model given and {url} failed: {error}") from error
    if not models:
        raise SystemExit(f"bench serve: {url} lists no models")
    return models[0]["id"]


async def wait_until_ready(session, url, body, headers, prompt_len, chat, timeout_s: float) -> RequestOutput:
    """Send the first request until it succeeds or `timeout_s` passes (the server may still be starting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        output = await send_request(session, url, body, headers, prompt_len, chat)
        if output.success or time.monotonic() > deadline:
            return output
        await asyncio.sleep(1.0)


async def benchmark(args: argparse.Namespace, requests: list[SampleRequest], bodies: list[bytes], api_url: str,
                    headers: dict[str, str]) -> dict[str, Any]:
    chat = args.backend == "openai-chat"
    # Unique per run, as vLLM's `bench-{uuid}-{i}`: servers key requests by x-request-id and may refuse a
    # duplicate in flight (warmups are concurrent copies of one request).
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or 0, limit_per_host=args.max_concurrency or 0,
                                     keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT, trust_env=True) as session:
        def first(request_id: str) -> tuple:
            return (session, api_url, bodies[0], headers | {"x-request-id": f"{run_id}-{request_id}"},
                    requests[0].prompt_len, chat)

        if args.ready_check_timeout_sec > 0:
            print("Starting initial single prompt test run...")
            output = await wait_until_ready(*first("ready-check"), args.ready_check_timeout_sec)
            if not output.success:
                raise SystemExit("Initial test run failed - Please make sure benchmark arguments are correctly "
                                 f"specified. Error: {output.error}")
            print("Initial test run completed.")
        else:
            print("Skipping endpoint ready check.")

        semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()
        if args.num_warmups > 0:
            print(f"Warming up with {args.num_warmups} requests...")
            with tqdm(total=args.num_warmups, disable=args.disable_tqdm) as bar:
                async def warmup(index: int) -> None:
                    async with semaphore:
                        await send_request(*first(f"warmup-{index}"))
                    bar.update(1)

                await asyncio.gather(*(warmup(index) for index in range(args.num_warmups)))
            print("Warmup run completed.")

        print("Starting main benchmark run...")
        distribution = "Poisson process" if args.burstiness == 1.0 else "Gamma distribution"
        print(f"Traffic request rate: {args.request_rate}")
        print(f"Burstiness factor: {args.burstiness} ({distribution})")
        print(f"Maximum request concurrency: {args.max_concurrency}")
        offsets = arrival_offsets(len(requests), args.request_rate, args.burstiness, np.random.default_rng(args.seed))
        bar = tqdm(total=len(requests), disable=args.disable_tqdm)

        async def limited(index: int, arrival: float) -> RequestOutput:
            async with semaphore:
                output = await send_request(session, api_url, bodies[index],
                                            headers | {"x-request-id": f"{run_id}-{requests[index].request_id}"},
                                            requests[index].prompt_len, chat)
            output.client_queue_time = output.start_time - arrival
            bar.update(1)
            return output

        start, start_cpu = time.perf_counter(), time.process_time()
        tasks = []
        for index, offset in enumerate(offsets):
            if (delay := start + offset - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(index, time.perf_counter())))
        outputs: list[RequestOutput] = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        # This process's CPU seconds (all threads) over the run: near one per second, the client itself (one event
        # loop) may be what bounds the measured rate.
        client_cpu = time.process_time() - start_cpu
        bar.close()

    failed = [o for o in outputs if not o.success]
    if failed:
        print("Failed requests during benchmark run detected (capping to 10):")
        for i, output in enumerate(failed[:10]):
            print(f"Error {i}: {output.error}")
    metrics = calculate_metrics(outputs, duration, args.percentiles) | {"client_cpu_s": client_cpu}
    print(format_result(metrics, selected_metrics=args.selected_metrics, percentiles=args.percentiles,
                        max_concurrency=args.max_concurrency, request_rate=args.request_rate))
    origin = min(o.start_time for o in outputs)
    return metrics | {
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": [o.output_tokens if o.success else 0 for o in outputs],
        "ttfts": [o.ttft for o in outputs],
        "latencies": [o.latency for o in outputs],
        "errors": [o.error for o in outputs],
        "output_tokens_from_usage": sum(o.usage_reported for o in outputs if o.success),
        "itls": [o.itl for o in outputs],
        "start_times": [o.start_time - origin for o in outputs],
        "queue_times": [o.client_queue_time for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
    }


DETAILED_FIELDS = ("itls", "start_times", "queue_times", "generated_texts")


def result_filename(args: argparse.Namespace, model_id: str, date: str) -> Path:
    """vLLM's default name: {label}-{rate}qps[-concurrency{N}]-{model}-{date}.json, under --result-dir."""
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
    name = args.result_filename or \
        f"{args.label or args.backend}-{args.request_rate}qps{concurrency}-{model_id.split('/')[-1]}-{date}.json"
    return Path(args.result_dir or ".") / name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backend", choices=list(BACKENDS), default="openai-chat")
    parser.add_argument("--base-url", default=None, help="Server URL, instead of --host and --port.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--endpoint", default=None, help="API path; by default the backend's own.")
    parser.add_argument("--model", default=None, help="Model name; by default the first of /v1/models.")
    parser.add_argument("--api-key", default=None, help="Sent as 'Authorization: Bearer KEY' "
                        "(default: $OPENAI_API_KEY).")
    parser.add_argument("--label", default=None, help="Name of this run in the result file and in plots.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="Requests per second; inf sends all at once.")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="Gamma shape of the arrival gaps: 1 is Poisson, < 1 burstier, > 1 more even.")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="Send ignore_eos (always on for the synthetic datasets, as vLLM's random ones).")
    parser.add_argument("--num-warmups", type=int, default=0)
    parser.add_argument("--ready-check-timeout-sec", type=int, default=0,
                        help="Retry the first request this long before starting; 0 skips the check.")
    parser.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                        help=f"Comma-separated, of: {','.join(METRICS)}.")
    parser.add_argument("--metric-percentiles", default="99", help='Comma-separated, e.g. "25,50,75,99".')
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--extra-body", type=json.loads, default=None, help="JSON merged into every request.")
    parser.add_argument("--disable-tqdm", action="store_true")
    parser.add_argument("--save-result", action="store_true", help="Write the result JSON.")
    parser.add_argument("--save-detailed", action="store_true",
                        help="Also keep per-request ITLs, start and queue times and texts in the JSON.")
    parser.add_argument("--result-dir", default=None)
    parser.add_argument("--result-filename", default=None)
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="Chart this run (and --plot-compare results): TTFT percentiles, latency, throughput.")
    parser.add_argument("--plot-compare", nargs="+", default=[], metavar="RESULT.json",
                        help="Saved results drawn beside this run in --plot.")
    add_dataset_args(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.endpoint = args.endpoint or BACKENDS[args.backend]
    if not args.endpoint.endswith(BACKENDS[args.backend].removeprefix("/v1")):
        parser.error(f"--backend {args.backend} posts to .../{BACKENDS[args.backend].split('/', 2)[2]}, "
                     f"not {args.endpoint}")
    if args.dataset_name != "random" and args.backend != "openai-chat":
        parser.error(f"--dataset-name {args.dataset_name} sends images: it needs --backend openai-chat")
    if args.max_concurrency is not None and args.max_concurrency <= 0:
        parser.error("--max-concurrency must be > 0")
    args.selected_metrics = [name.strip() for name in args.percentile_metrics.split(",") if name.strip()]
    if unknown := [name for name in args.selected_metrics if name not in METRICS]:
        parser.error(f"--percentile-metrics: unknown {unknown}; allowed: {', '.join(METRICS)}")
    try:
        args.percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    except ValueError:
        parser.error(f"--metric-percentiles must be comma-separated numbers, got {args.metric_percentiles!r}")
    if not all(0 <= p <= 100 for p in args.percentiles):
        parser.error("--metric-percentiles must lie in [0, 100]")
    if args.request_rate <= 0 or args.burstiness <= 0:
        parser.error("--request-rate and --burstiness must be > 0")
    if args.dataset_name in ("random", "random-mm", "arena-like"):
        # As vLLM for its random datasets: generation runs to the sampled length, so every server (and
        # every encoder mode) is given the same work, whatever random weights would say.
        args.ignore_eos = True
    return args


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the dataset, run the benchmark, save and plot. Returns the result JSON as a dict."""
    print({key: ("<redacted>" if key == "api_key" and value else value) for key, value in vars(args).items()})
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    api_url = base_url + args.endpoint
    headers = _headers(args)
    if args.model is None:
        print("Model not specified, fetching first model from server...")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            args.model = await first_model(session, base_url, headers)
        print(f"First model name: {args.model}")

    generation_start = time.perf_counter()
    requests = get_samples(args, progress=not args.disable_tqdm)
    extra_body = {key: value for key, value in {"temperature": args.temperature, "top_p": args.top_p,
                                                "top_k": args.top_k}.items() if value is not None}
    extra_body |= args.extra_body or {}
    bodies = [build_body(request, args.backend, args.model, args.ignore_eos, extra_body) for request in requests]
    tiles = request_tiles(requests)
    num_images = sum(len(request.images) for request in requests)
    print(f"Dataset {args.dataset_name}: {len(requests)} requests, {num_images} images "
          f"(~{sum(tiles)} InternVL tiles at 1..12 + thumbnail), {sum(map(len, bodies)) / 1e6:.1f} MB of requests, "
          f"made in {time.perf_counter() - generation_start:.1f} s")

    result = await benchmark(args, requests, bodies, api_url, headers)
    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    result = {
        "date": date, "endpoint_type": args.backend, "backend": args.backend, "label": args.label,
        "model_id": args.model, "tokenizer_id": None, "num_prompts": args.num_prompts,
        "dataset_name": args.dataset_name, "seed": args.seed,
        "request_rate": args.request_rate if not math.isinf(args.request_rate) else "inf",
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "percentile_metrics": args.selected_metrics, "metric_percentiles": args.percentiles,
        "num_images": num_images, "estimated_image_tiles": sum(tiles),
        "expected_output_lens": [request.expected_output_len for request in requests],
    } | result
    if not args.save_detailed:
        for name in DETAILED_FIELDS:
            result.pop(name)
    if args.save_result:
        path = result_filename(args, args.model, date)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
        print(f"Saved the result to {path}")
    if args.plot:
        from bench.plot import load_result, plot_results

        plot_results([result] + [load_result(path) for path in args.plot_compare], args.plot)
        print(f"Saved the plot to {args.plot}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
