"""The engine in processes of its own, one per data-parallel replica: vLLM V1's engine cores.

In the server's process the engine thread takes turns at the GIL with the HTTP loop and the preprocessing
threads; with `-dp 2` on one mesh it spent 46% of its time off a core, waiting for that turn, and two H200s
served 47.37 arena-c64 requests/s where one served 32.90 (docs/PERF.md, twelfth and fifteenth sessions). Here each
replica is a process of its own (`python -m internvl_jax.engine_processes FD`): its own devices, model, KV cache
and scheduler, and an engine thread that shares the GIL only with the thread taking its requests in. The server's
process keeps HTTP, templating, tokenizing and the image workers, and routes each request to the replica with the
fewest requests in flight.

    server: EngineProcesses.add_request --socket--> replica: Engine.add_request
            tiles uint8[T, 3, S, S] --> one file in shared memory (`shared_memory`), read by the replica and deleted
            sink(RequestOutput) <-- what each request gained in a step (new tokens, text, finish), rebuilt into
                                    cumulative snapshots; the replica's counters every STATS_INTERVAL_S

`EngineProcesses` answers what the server asks of an `Engine` (add_request, abort, validate, queued,
replica_stats, run_forever); its `run_forever` is the server's thread that reads the replicas' outputs. A replica
that dies stops the whole, as a failed engine thread does (`/health` 503, requests 500 `engine_dead`): requests in
flight on it cannot be finished elsewhere. `--max-num-seqs` and `--max-waiting` stay the server's totals, split over
the replicas.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import multiprocessing.connection
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import NoReturn

import numpy as np

from internvl_jax.engine import (
    EngineConfig,
    EngineFull,
    EngineLoad,
    EngineStats,
    ImageInput,
    RequestError,
    RequestLimits,
)
from internvl_jax.image_workers import process_cpu_seconds, start_module
from internvl_jax.outputs import CompletionOutput, RequestMetrics, RequestOutput
from internvl_jax.sampling import SamplingParams
from internvl_jax.shared_memory import TileDirectory, read_array, write_array

log = logging.getLogger(__name__)

# How often a replica sends its counters and latency observations (for /metrics), also while idle.
STATS_INTERVAL_S = 0.25
PROCESS_BACKENDS = ("mesh", "process")


def visible_gpus() -> list[str] | None:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries, read without initialising a device (the
    server's process must not: JAX would take most of every GPU's memory); None where there are none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [entry.strip() for entry in visible.split(",") if entry.strip()] or None
    try:
        count = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return None
    return [str(index) for index in range(count)] or None


def replica_devices(replicas: int, tensor_parallel: int) -> list[str | None]:
    """Each replica's CUDA_VISIBLE_DEVICES (consecutive GPUs, `tensor_parallel` each), or None per replica where
    there are no GPUs (each replica then takes the host platform's devices)."""
    gpus = visible_gpus()
    if gpus is None:
        return [None] * replicas
    needed = replicas * tensor_parallel
    if needed > len(gpus):
        raise ValueError(f"{replicas} engine processes x {tensor_parallel} GPUs each (-dp {replicas} -tp "
                         f"{tensor_parallel}) need {needed} GPUs; {len(gpus)} visible ({','.join(gpus)})")
    return [",".join(gpus[i * tensor_parallel:(i + 1) * tensor_parallel]) for i in range(replicas)]


# ---- the wire ------------------------------------------------------------------------------------------
# server -> replica: ("add", request_id, prompt_ids, params, [image], prompt) with image = (key, num_tiles, path,
#   shape, dtype, pixels, embeddings) (`path` a file in shared memory, else `pixels` inline); ("abort",
#   request_id); ("stop",).
# replica -> server: ("ready", info) or ("failed", message) once; then ("outputs", [update], stats or None) per
#   engine step with news, update = (request_id, finished, metrics tuple, [(new token ids, text kept, new text,
#   finish_reason, stop_reason, new logprobs)] per choice); ("refused", request_id, message).


def _send_image(directory: str | None, image: ImageInput) -> tuple:
    if image.pixels is None:
        return image.key, image.num_tiles, None, None, None, None, image.embeddings
    path = write_array(directory, image.pixels)
    if path is None:
        return image.key, image.num_tiles, None, None, None, image.pixels, image.embeddings
    return image.key, image.num_tiles, path, image.pixels.shape, image.pixels.dtype.str, None, image.embeddings


def _receive_image(wire: tuple) -> ImageInput:
    key, num_tiles, path, shape, dtype, pixels, embeddings = wire
    if path is not None:
        pixels = read_array(path, shape, dtype)
    return ImageInput(key, num_tiles, pixels, embeddings)


class _Delta:
    """What a request's outputs gained since the last update sent (tokens only grow; a stop string may cut text)."""

    def __init__(self, choices: int):
        self.sent = [(0, "")] * choices  # (tokens, text) per choice

    def update(self, output: RequestOutput) -> tuple:
        choices = []
        for index, choice in enumerate(output.outputs):
            tokens, text = self.sent[index]
            kept = len(text) if choice.text.startswith(text) else 0
            logprobs = choice.logprobs[tokens:] if choice.logprobs is not None else None
            choices.append((choice.token_ids[tokens:], kept, choice.text[kept:], choice.finish_reason,
                            choice.stop_reason, logprobs))
            self.sent[index] = (len(choice.token_ids), choice.text)
        metrics = dataclasses.astuple(output.metrics) if output.metrics is not None else None
        return output.request_id, output.finished, metrics, choices


# ---- in the replica's process ----------------------------------------------------------------------------


class _Replica:
    """One engine process: the engine steps in the main thread, which alone sends to the server; a second thread
    takes requests in (and so never blocks on a full socket: it always reads the server's "stop")."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self.engine = None
        self.stop = threading.Event()
        self._latest: dict[str, RequestOutput] = {}  # request id -> newest snapshot since the last flush
        self._deltas: dict[str, _Delta] = {}
        self._refused: collections.deque[tuple[str, str]] = collections.deque()  # appended by the input thread
        self._stats_sent = 0.0

    def send(self, message: tuple) -> None:
        try:
            self.connection.send(message)
        except OSError:  # the server has gone: nothing to report to; stop
            self.stop.set()

    def serve(self, args, progress: bool) -> int:
        from internvl_jax.offline import build_engine

        threading.Thread(target=self._receive, name="engine-inbox", daemon=True).start()
        try:
            loaded = build_engine(args, progress=progress)
        except Exception as error:  # noqa: BLE001 - the server reports it and exits
            log.exception("the engine could not start")
            self.send(("failed", f"{type(error).__name__}: {error}"))
            return 2
        self.engine = engine = loaded.engine
        self.send(("ready", dict(config=engine.config, limits=engine.limits, encoder_mode=loaded.encoder_mode,
                                 warmup_seconds=loaded.warmup_seconds, pid=os.getpid())))
        while not self.stop.is_set():
            if engine.has_work:
                engine.step()
            else:
                engine.wakeup.wait(0.05)
                engine.wakeup.clear()
            self._flush()
        self._flush(stats=True)
        return 0

    def _receive(self) -> None:
        while True:
            try:
                message = self.connection.recv()
            except (EOFError, OSError):
                message = ("stop",)  # the server has gone
            if message[0] == "stop":
                if self.engine is None:  # still loading: nothing to finish
                    os._exit(0)
                self.stop.set()
                self.engine.wakeup.set()
                return
            if message[0] == "add":
                _, request_id, prompt_ids, params, images, prompt = message
                try:
                    self.engine.add_request(request_id, prompt_ids, params, [_receive_image(i) for i in images],
                                            sink=self._sink, prompt=prompt, bounded=False)
                except Exception as error:  # noqa: BLE001 - refuse this request, keep serving the others
                    log.exception("request %s refused", request_id)
                    self._refused.append((request_id, f"{type(error).__name__}: {error}"))
                    self.engine.wakeup.set()
            elif message[0] == "abort":
                self.engine.abort(message[1])

    def _sink(self, output: RequestOutput) -> None:  # the engine thread
        self._latest[output.request_id] = output

    def _flush(self, stats: bool = False) -> None:  # the engine thread
        while self._refused:
            self.send(("refused", *self._refused.popleft()))
        updates = []
        for request_id, output in self._latest.items():
            delta = self._deltas.get(request_id) or self._deltas.setdefault(request_id, _Delta(len(output.outputs)))
            updates.append(delta.update(output))
            if output.finished:
                del self._deltas[request_id]
        self._latest.clear()
        now = time.monotonic()
        counters = None
        if stats or now - self._stats_sent >= STATS_INTERVAL_S:
            self._stats_sent = now
            engine_stats = self.engine.stats
            counters = (engine_stats.counters(), dict(engine_stats.phase_seconds), self.engine.load(),
                        engine_stats.take_observations(), process_cpu_seconds(os.getpid()))
        if updates or counters is not None:
            self.send(("outputs", updates, counters))


def _replica_main(fd: int) -> NoReturn:
    # Ctrl-C (and `timeout`, or a service manager stopping the whole group) signals every process: the server
    # drains, then stops its replicas; a server gone without doing so is seen as the end of this connection.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.set_inheritable(fd, False)  # not into the compilers this process starts: its end must close with it
    connection = Connection(fd)
    index, args, progress, level = connection.recv()
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s %(name)s [engine {index}]: %(message)s",
                        stream=sys.stderr)
    status = _Replica(connection).serve(args, progress)
    # Out at once, without the interpreter's teardown: with a model, its compiled programs and a KV cache on the
    # device, that teardown held a 2-GPU server's stop 4.5-9 s after the replicas' last step (the in-process engine
    # stops in 1.4 s; docs/PERF.md, eighteenth session). Nothing is left to write: the last outputs are sent, the
    # compiled programs were stored at start-up, the tiles read were deleted on reading.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# ---- in the server's process -----------------------------------------------------------------------------


class EngineDied(RuntimeError):
    """An engine process exited while serving."""


class RequestRefused(RuntimeError):
    """A request the server accepted could not run in its engine process: the hand-over of its tiles raised, or the
    replica rejected it (a bug either way: the server checks what the replica checks, and tiles that do not fit in
    shared memory travel inline). Handed to the request's sink in place of an output; its client gets a 500."""


@dataclasses.dataclass
class _Tracked:
    replica: int
    prompt: str | None
    prompt_ids: list[int]
    num_tiles: int
    sink: Callable[[RequestOutput | RequestRefused], None] | None
    outputs: list[CompletionOutput]


class _Process:
    """One engine process as the server sees it. What the server sends it goes through a queue to a thread of its
    own, in order: a request's tiles are written to shared memory there, not on the caller's thread (the event
    loop), and no caller ever blocks on the socket."""

    def __init__(self, index: int, devices: str | None, tiles: str | None):
        self.process, self.connection = start_module(
            "internvl_jax.engine_processes", {"CUDA_VISIBLE_DEVICES": devices} if devices is not None else None)
        self.index = index
        self.in_flight = 0
        self.load: EngineLoad | None = None
        self.stats = EngineStats()
        self.cpu_seconds = 0.0
        self._tiles = tiles
        self.on_refused: Callable[[str, str], None] | None = None  # (request id, why): a request it could not send
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name=f"engine-{index}-outbox", daemon=True)
        self._sender.start()

    def send(self, message: tuple) -> None:
        """Queued; sent in order by the process's own thread."""
        self._outbox.put(message)

    def _send_loop(self) -> None:
        while True:
            message = self._outbox.get()
            if message[0] == "add":
                kind, request_id, prompt_ids, params, images, prompt = message
                try:
                    message = (kind, request_id, prompt_ids, params, [_send_image(self._tiles, i) for i in images],
                               prompt)
                except Exception as error:  # noqa: BLE001 - this request fails, the others go on
                    log.exception("the tiles of request %s could not be handed over", request_id)
                    if self.on_refused is not None:
                        self.on_refused(request_id, f"{type(error).__name__}: {error}")
                    continue
            try:
                self.connection.send(message)
            except OSError:  # the process has gone: the reading thread reports it
                return
            if message[0] == "stop":
                return

    def exited(self) -> str:
        status = self.process.poll()
        return f"engine process {self.index} (pid {self.process.pid}) " + (
            "is still running" if status is None else f"exited with status {status}")

    def kill(self) -> None:
        if self.process.poll() is None:
            log.warning("engine process %d did not stop in time; killing it", self.index)
            self.process.kill()
        self.process.wait()
        with contextlib.suppress(OSError):
            self.connection.close()


def _stop_all(processes: list[_Process], timeout: float) -> None:
    """Asks every process to stop, reads (and drops) what they still send so that none blocks on a full socket
    while finishing its step, and kills those not gone after `timeout` seconds."""
    start = time.monotonic()
    for process in processes:
        process.send(("stop",))
    deadline = start + timeout
    open_ = {p.connection: p for p in processes}
    while open_ and time.monotonic() < deadline:
        for connection in multiprocessing.connection.wait(list(open_), timeout=0.1):
            try:
                connection.recv()
            except (EOFError, OSError):
                with contextlib.suppress(subprocess.TimeoutExpired):  # killed below
                    open_.pop(connection).process.wait(max(0.0, deadline - time.monotonic()))
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.process.wait(max(0.0, deadline - time.monotonic()))
        process.kill()
    log.info("engine processes stopped in %.1f s (exit statuses %s)", time.monotonic() - start,
             ", ".join(str(process.process.returncode) for process in processes))


class EngineProcesses:
    """`replicas` engine processes behind the interface the server uses of an `Engine`. Start with `start`."""

    def __init__(self, processes: list[_Process], config: EngineConfig, limits: RequestLimits, tokenizer,
                 tiles: TileDirectory):
        self._processes = processes
        self.replicas = len(processes)
        # The whole: every replica's slots and queue.
        self.config = dataclasses.replace(config, max_num_seqs=config.max_num_seqs * self.replicas,
                                          max_waiting=config.max_waiting * self.replicas)
        self.replica_config = config
        self.limits = limits
        self.tokenizer = tokenizer
        self.wakeup = threading.Event()
        self.stats = EngineStats()  # the latency observations of every replica (counters: `replica_stats`)
        self._tiles = tiles
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._closed = False
        for process in processes:
            process.on_refused = self._refused

    @classmethod
    def start(cls, args, replicas: int, tokenizer, *, progress: bool = True,
              log_level: int | None = None) -> tuple[EngineProcesses, dict]:
        """Starts `replicas` processes each building `args`'s engine on `args.tensor_parallel_size` GPUs of its own,
        with its share of the decode slots and of the admission queue (`max_num_seqs` and `max_waiting` are the
        whole server's, as with one engine over a mesh), and waits until every one has compiled; returns the engine
        and replica 0's start-up report."""
        devices = replica_devices(replicas, args.tensor_parallel_size)
        if replicas > 1 and devices[0] is None:
            log.warning("no NVIDIA GPU found: each of the %d engine processes uses all of JAX's default devices",
                        replicas)
        args = dataclasses.replace(args, data_parallel_size=1, max_num_seqs=-(-args.max_num_seqs // replicas),
                                   max_waiting=-(-args.max_waiting // replicas))
        level = log_level if log_level is not None else logging.getLogger().getEffectiveLevel()
        processes: list[_Process] = []
        tiles = TileDirectory()
        try:
            for index, visible in enumerate(devices):
                processes.append(_Process(index, visible, tiles.path))
                # One progress bar: the replicas compile the same programs side by side.
                processes[-1].send((index, args, progress and index == 0, level))
                log.info("engine process %d: pid %d%s", index, processes[-1].process.pid,
                         f", CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "")
            reports = cls._wait_ready(processes)
        except BaseException:
            _stop_all(processes, timeout=5)
            tiles.close()
            raise
        report = reports[0]
        return cls(processes, report["config"], report["limits"], tokenizer, tiles), report

    @staticmethod
    def _wait_ready(processes: list[_Process]) -> list[dict]:
        """Every process's start-up report; the first that fails (or exits) raises at once."""
        reports: dict[int, dict] = {}
        waiting = {p.connection: p for p in processes}
        while waiting:
            for connection in multiprocessing.connection.wait(list(waiting)):
                process = waiting.pop(connection)
                try:
                    kind, payload = connection.recv()
                except (EOFError, OSError):
                    process.process.wait()
                    raise EngineDied(f"{process.exited()} while starting; its error output is above") from None
                if kind == "failed":
                    raise ValueError(f"engine process {process.index}: {payload}")
                reports[process.index] = payload
        return [reports[p.index] for p in processes]

    # ---- what the server asks of an engine -------------------------------------------------------------
    def validate(self, prompt_ids: list[int], images: list[ImageInput], params: SamplingParams) -> np.ndarray:
        return self.limits.check(prompt_ids, images, params)

    @property
    def queued(self) -> int:
        """Requests in flight not yet running, as last reported."""
        with self._lock:
            return sum(max(0, p.in_flight - (p.load.requests_running if p.load else 0)) for p in self._processes)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    images: list[ImageInput] | None = None,
                    sink: Callable[[RequestOutput | RequestRefused], None] | None = None,
                    prompt: str | None = None) -> None:
        """Thread-safe; never blocks on an engine process. Raises RequestError (bad request) or EngineFull (every
        replica's queue is full). `sink` gets the outputs, as `Engine.add_request`'s, or a `RequestRefused` when
        the request cannot run after all (nothing follows it)."""
        images = images or []
        self.validate(prompt_ids, images, params)
        bound = self.replica_config.max_waiting + self.replica_config.max_num_seqs
        with self._lock:
            if self._closed:
                raise EngineFull("the engine processes are stopping")
            if request_id in self._tracked:
                raise RequestError(f"request id {request_id!r} is already running")
            process = min(self._processes, key=lambda p: p.in_flight)
            if process.in_flight >= bound:
                raise EngineFull(f"every engine process has {bound} requests in flight")
            process.in_flight += 1
            outputs = [CompletionOutput(index, "", [], logprobs=[] if params.logprobs is not None else None)
                       for index in range(params.n)]
            self._tracked[request_id] = _Tracked(process.index, prompt, list(prompt_ids),
                                                 sum(image.num_tiles for image in images), sink, outputs)
            # Queued under the lock: an abort of this request (which looks it up under the lock) comes after it.
            process.send(("add", request_id, list(prompt_ids), params, images, prompt))

    def abort(self, request_id: str) -> None:
        """Thread-safe: the request's slots are freed at its replica's next step."""
        with self._lock:
            tracked = self._tracked.get(request_id)
            if tracked is not None:
                self._processes[tracked.replica].send(("abort", request_id))

    def replica_stats(self) -> list[tuple[EngineLoad, EngineStats]]:
        empty = EngineLoad(0, 0, 0, self.replica_config.max_num_seqs, 0,
                           self.replica_config.max_num_seqs * self.replica_config.max_model_len)
        return [(p.load or empty, p.stats) for p in self._processes]

    def take_observations(self) -> dict[str, list[float]]:
        return self.stats.take_observations()

    def cpu_seconds(self) -> float:
        """CPU seconds of the engine processes so far (as last reported)."""
        return sum(p.cpu_seconds for p in self._processes)

    # ---- the server's thread reading the replicas -------------------------------------------------------
    def run_forever(self, stop: threading.Event) -> None:
        """Delivers the replicas' outputs to their sinks until `stop`; raises EngineDied when a replica exits.
        Stops the replicas on the way out."""
        connections = {p.connection: p for p in self._processes}
        while not stop.is_set():
            for connection in multiprocessing.connection.wait(list(connections), timeout=0.1):
                process = connections[connection]
                try:
                    message = connection.recv()
                except (EOFError, OSError):
                    process.process.wait()
                    # The server fails its requests now; the other replicas stop meanwhile.
                    threading.Thread(target=self.close, name="engine-processes-close", daemon=True).start()
                    raise EngineDied(process.exited()) from None
                if message[0] == "outputs":
                    self._deliver(process, message[1], message[2])
                elif message[0] == "refused":
                    self._refused(message[1], message[2])
        self.close()

    def _deliver(self, process: _Process, updates: list[tuple], counters) -> None:
        for request_id, finished, metrics, choices in updates:
            with self._lock:
                tracked = self._tracked.get(request_id)
            if tracked is None:
                continue
            for output, (tokens, kept, text, finish_reason, stop_reason, logprobs) in zip(tracked.outputs, choices,
                                                                                          strict=True):
                output.token_ids.extend(tokens)
                output.text = output.text[:kept] + text
                output.finish_reason, output.stop_reason = finish_reason, stop_reason
                if logprobs is not None:
                    output.logprobs.extend(logprobs)
            if finished:
                self._forget(request_id)
            if tracked.sink is not None:
                snapshot = RequestOutput(
                    request_id, tracked.prompt, tracked.prompt_ids,
                    [dataclasses.replace(o, token_ids=list(o.token_ids),
                                         logprobs=list(o.logprobs) if o.logprobs is not None else None)
                     for o in tracked.outputs],
                    finished, RequestMetrics(*metrics) if metrics is not None else None, tracked.num_tiles)
                try:
                    tracked.sink(snapshot)
                except Exception:
                    log.exception("the output sink of request %s failed; it gets no more outputs", request_id)
                    tracked.sink = None
        if counters is not None:
            values, phases, load, observations, cpu = counters
            for name, value in values.items():
                setattr(process.stats, name, value)
            process.stats.phase_seconds = phases
            process.load = load
            if cpu is not None:
                process.cpu_seconds = cpu
            for name, values in observations.items():
                getattr(self.stats, name).extend(values)

    def _refused(self, request_id: str, message: str) -> None:
        """A request the server had accepted could not run in its engine process (`RequestRefused`): its sink gets
        the error, so that its client is told why, not an empty answer."""
        log.error("engine process refused request %s: %s", request_id, message)
        with self._lock:
            tracked = self._tracked.get(request_id)
        if tracked is None:
            return
        self._forget(request_id)
        if tracked.sink is not None:
            with contextlib.suppress(Exception):
                tracked.sink(RequestRefused(f"request {request_id} could not run in engine process {tracked.replica}: "
                                            f"{message}"))

    def _forget(self, request_id: str) -> None:
        with self._lock:
            tracked = self._tracked.pop(request_id, None)
            if tracked is not None:
                self._processes[tracked.replica].in_flight -= 1

    def close(self, timeout: float = 30) -> None:
        """Stops the replicas (each finishes its step and exits) and removes the tile directory. Idempotent."""
        with self._close_lock:  # a second caller returns once the first has finished
            with self._lock:
                if self._closed:
                    return
                self._closed = True
            _stop_all(self._processes, timeout)
            self._tiles.close()


if __name__ == "__main__":
    _replica_main(int(sys.argv[1]))

__all__ = ["PROCESS_BACKENDS", "EngineDied", "EngineProcesses", "RequestRefused", "replica_devices", "visible_gpus"]
