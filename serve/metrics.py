"""Prometheus metrics, named after vLLM's with an `internvl:` prefix (vLLM's `vllm:` names in
docs/SERVE.md) so that dashboards port by a rename.

The engine keeps plain counters and bounded queues of latency observations (`EngineStats`); it knows
nothing about Prometheus. Gauges and counters are read from it at scrape time by a custom collector; the
latency queues are drained into histograms at scrape time and by a periodic task.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from internvl_jax.engine import Engine
from internvl_jax.engine_processes import EngineProcesses
from internvl_jax.image_workers import ImageWorkers
from internvl_jax.inputs import ProcessedImageCache

PREFIX = "internvl:"

# The `_created` timestamp series double the output and no dashboard reads them (vLLM drops them too).
disable_created_metrics()
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets: TTFT spans a cached short prompt to a long multi-image prefill behind a queue.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)


class EngineCollector(Collector):
    """Engine state read at scrape time (thread-safe snapshots of the engine's containers). Gauges and counters
    of the engine are labelled `engine` (its data-parallel engine process; "0" for an engine in the server's
    process), as vLLM V1 labels its engine cores'."""

    def __init__(self, engine: Engine | EngineProcesses, model_name: str,
                 image_cache: ProcessedImageCache | None = None, image_workers: ImageWorkers | None = None):
        self.engine = engine
        self.image_cache = image_cache
        self.image_workers = image_workers
        self.model_name = model_name

    def _family(self, kind, name: str, documentation: str, samples: list[tuple[dict[str, str], float]]):
        labels = ["model_name", *samples[0][0]] if samples else ["model_name"]
        family = kind(PREFIX + name, documentation, labels=labels)
        for extra, value in samples:
            family.add_metric([self.model_name, *extra.values()], value)
        return family

    def collect(self):
        replicas = [({"engine": str(index)}, load, stats)
                    for index, (load, stats) in enumerate(self.engine.replica_stats())]
        gauges = [
            ("num_requests_running", "Requests with at least one sequence in a decode slot.",
             lambda load, stats: load.requests_running),
            ("num_requests_waiting", "Requests queued for a decode slot.", lambda load, stats: load.requests_waiting),
            ("num_slots_running", "Decode slots in use (a request with n choices takes n).",
             lambda load, stats: load.slots_running),
            ("num_slots", "Decode slots (max_num_seqs).", lambda load, stats: load.slots),
            ("kv_cache_usage_perc", "Fraction of KV cache positions holding tokens (1 = full).",
             lambda load, stats: load.tokens_held / load.token_capacity),
        ]
        for name, documentation, value in gauges:
            yield self._family(GaugeMetricFamily, name, documentation,
                               [(labels, value(load, stats)) for labels, load, stats in replicas])
        yield self._family(GaugeMetricFamily, "engines", "Engine loops: data-parallel engine processes "
                           "(--data-parallel-backend process), else 1.", [({}, len(replicas))])
        counters = [
            ("prompt_tokens", "Prompt tokens prefilled.", "prompt_tokens"),
            ("generation_tokens", "Tokens generated.", "generation_tokens"),
            ("image_tiles_encoded", "Image tiles run through the vision encoder.", "tiles_encoded"),
            ("image_tiles_computed", "Tile rows the vision encoder ran, the padding of its calls to their tile "
             "buckets included (over image_tiles_encoded: the encoder's work per real tile).", "tiles_computed"),
            ("prefill_tokens_computed", "Token positions the prefill ran, the padding of its calls to their length "
             "and batch buckets (and to every data-parallel replica's rows) included (over prompt_tokens: the "
             "prefill's work per prompt token).", "prefill_tokens_computed"),
            ("mm_cache_queries", "Images looked up in the encoder-output cache.", "encoder_cache_queries"),
            ("mm_cache_hits", "Images found in the encoder-output cache (no encoder run).", "encoder_cache_hits"),
            ("recompiles", "Jitted steps recompiled while serving (a bug if non-zero).", "recompiles"),
            ("engine_step_seconds", "The engine thread's time inside steps (host work plus waiting for the GPU).",
             "step_seconds"),
            ("engine_device_wait_seconds", "The engine thread's time blocked on a dispatch's results (the GPU is "
             "behind the host); the rest of engine_step_seconds is host work.", "device_wait_seconds"),
            ("engine_host_cpu_seconds", "The engine thread's CPU time inside steps outside the waits on the GPU; "
             "host work beyond it is time off a core: the GIL held by other threads, or a dispatch blocked in the "
             "runtime.", "host_cpu_seconds"),
        ]
        for name, documentation, field in counters:
            yield self._family(CounterMetricFamily, name, documentation,
                               [(labels, getattr(stats, field)) for labels, load, stats in replicas])
        server_counters = [
            ("mm_processor_cache_queries", "Images sent as encoded bytes looked up in the preprocessed-image cache.",
             self.image_cache.queries if self.image_cache else 0),
            ("mm_processor_cache_hits", "Images found in the preprocessed-image cache (not decoded and tiled again).",
             self.image_cache.hits if self.image_cache else 0),
            ("image_worker_cpu_seconds", "CPU seconds of the image worker processes (image decoding, resizing, "
             "tiling), which process_cpu_seconds_total of the server's own process does not count.",
             self.image_workers.cpu_seconds() if self.image_workers else 0.0),
            ("engine_process_cpu_seconds", "CPU seconds of the engine processes (--data-parallel-backend process), "
             "which process_cpu_seconds_total of the server's own process does not count; 0 for an engine in it.",
             self.engine.cpu_seconds() if isinstance(self.engine, EngineProcesses) else 0.0),
        ]
        for name, documentation, value in server_counters:
            yield self._family(CounterMetricFamily, name, documentation, [({}, value)])
        yield self._family(CounterMetricFamily, "engine_phase_seconds", "The engine thread's time inside steps by "
                           "phase (process includes the waits on the GPU).",
                           [({**labels, "phase": phase}, value) for labels, load, stats in replicas
                            for phase, value in stats.phase_seconds.items()])


class ServerMetrics:
    def __init__(self, engine: Engine | EngineProcesses, model_name: str,
                 image_cache: ProcessedImageCache | None = None, image_workers: ImageWorkers | None = None):
        self.engine = engine
        self.model_name = model_name
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total: all the server's threads
        self.registry.register(EngineCollector(engine, model_name, image_cache, image_workers))
        labels = ["model_name"]
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from a request entering the engine to "
                              "its first token.", labels, buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between tokens of a request (a decode "
                             "dispatch's time divided by its tokens).", labels, buckets=ITL_BUCKETS,
                             registry=self.registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from admission by the server to the "
                             "end of the request.", labels, buckets=E2E_BUCKETS, registry=self.registry)
        self.success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                               labels + ["finished_reason"], registry=self.registry)
        # TTFT's parts, so a slow first token can be traced to the host, the admission queue or the GPU.
        self.preprocess = Histogram(PREFIX + "request_preprocess_time_seconds", "Time from a request's arrival at "
                                    "its HTTP handler to its hand-over to the engine (body parsing, image decoding "
                                    "and tiling, templating, tokenizing).", labels, buckets=TTFT_BUCKETS,
                                    registry=self.registry)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds", "Time a request waited in the engine for a "
                               "decode slot.", labels, buckets=TTFT_BUCKETS, registry=self.registry)
        self.prefill = Histogram(PREFIX + "request_prefill_time_seconds", "Time from a request's admission to its "
                                 "first token (encoder, prefill, and the engine step it shares).", labels,
                                 buckets=TTFT_BUCKETS, registry=self.registry)

    def drain(self) -> None:
        observations = self.engine.take_observations()
        for histogram, name in ((self.ttft, "ttft_observations"), (self.itl, "itl_observations"),
                                (self.queue, "queue_observations"), (self.prefill, "prefill_observations")):
            labelled = histogram.labels(self.model_name)
            for value in observations[name]:
                labelled.observe(value)

    def request_preprocessed(self, seconds: float) -> None:
        self.preprocess.labels(self.model_name).observe(seconds)

    def request_finished(self, finish_reasons: list[str], seconds: float) -> None:
        """A request has left the server; "abort" also counts clients that went away."""
        self.e2e.labels(self.model_name).observe(seconds)
        for reason in finish_reasons:
            self.success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        self.drain()
        return generate_latest(self.registry)
