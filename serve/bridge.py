"""The engine thread <-> asyncio bridge.

The engine steps in one dedicated thread (`Engine.run_forever`), or, with `--data-parallel-backend process`, in
engine processes whose outputs that thread reads (`EngineProcesses.run_forever`); HTTP handlers live on the event
loop. Requests go in through the engine's thread-safe `add_request` / `abort`; outputs come back
through a per-request sink that the engine calls from its thread, which hands each snapshot to the
loop with `call_soon_threadsafe`. Snapshots are cumulative (all text and tokens so far), so a slow
consumer only needs the latest one: `RequestStream` keeps that, never a growing queue.

Input processing (template, tokenizing) runs in a small thread pool, so the event loop keeps serving other
clients while a big image is tiled; the image decoding and tiling itself runs in worker processes
(`internvl_jax.image_workers`, `--preprocess-backend process`, the default), where it does not take turns at
the GIL with the engine thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from internvl_jax.engine import Engine, EngineFull, RequestError
from internvl_jax.engine_processes import EngineProcesses, RequestRefused
from internvl_jax.image_workers import ImageWorkers
from internvl_jax.inputs import PreparedPrompt
from internvl_jax.outputs import RequestOutput
from internvl_jax.programs import available_cpus
from internvl_jax.sampling import SamplingParams

log = logging.getLogger(__name__)


class ServerBusy(RuntimeError):
    """The admission queue is full, or the server is shutting down (`retry` says whether to retry)."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


class EngineDead(RuntimeError):
    """The engine thread has stopped (a bug or a device failure): nothing more will be generated."""


class RequestStream:
    """The snapshots of one engine request, consumed on the event loop."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self.latest: RequestOutput | None = None
        self.error: BaseException | None = None
        self.finished = False
        self.started = time.monotonic()
        self._ready = asyncio.Event()

    def sink(self, output: RequestOutput | RequestRefused) -> None:
        """Called by the engine thread: a snapshot, or the error of a request that cannot run after all (engine
        processes)."""
        # RuntimeError: the loop has closed (shutdown), nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._put, output)

    def _put(self, output: RequestOutput | RequestRefused) -> None:
        if isinstance(output, RequestRefused):
            self.fail(output)
            return
        self.latest = output
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._ready.set()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            await self._ready.wait()
            self._ready.clear()
            if self.error is not None:
                raise self.error
            output = self.latest
            self.finished = output.finished
            yield output

    async def final(self) -> RequestOutput:
        async for _ in self:
            pass
        return self.latest


def default_preprocess_workers() -> int:
    """The usable cores, at most 16. Image decoding and resizing release the GIL; with `-dp 2` (on the mesh) four
    threads were the queue (arena-c64: 1.1-1.7 s per request in front of them) and sixteen gave +6-7% req/s on two
    H200s (docs/PERF.md, fourth and ninth sessions); on one GPU sixteen changed nothing."""
    return min(16, available_cpus())


PREPROCESS_BACKENDS = ("process", "thread")
# Threads one image's resizes may use in its worker process while cores are idle (`ImageWorkers`). One H200 host
# (16 cores), arena-like images one at a time: preprocessing 107 ms per request on 1 thread, 67-75 on 4, 52-60
# on 8; arena-c64's req/s the same with 1, 4 and 8 (docs/PERF.md, fourteenth session).
DEFAULT_PREPROCESS_THREADS = 8


class EngineBridge:
    """`preprocess_workers` threads run input processing; with `preprocess_backend="process"` as many worker
    processes (`image_workers`) decode and tile the images, each image's resizes on up to `preprocess_threads`
    threads while cores are idle; else the threads do it themselves."""

    def __init__(self, engine: Engine | EngineProcesses, *, preprocess_workers: int | None = None,
                 preprocess_backend: str = "process", preprocess_threads: int = DEFAULT_PREPROCESS_THREADS):
        if preprocess_backend not in PREPROCESS_BACKENDS:
            raise ValueError(f"preprocess_backend must be one of {PREPROCESS_BACKENDS}, got {preprocess_backend!r}")
        self.engine = engine
        self.streams: dict[str, RequestStream] = {}
        self.draining = False
        self.dead: str | None = None  # why the engine thread stopped
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.preprocess_workers = preprocess_workers or default_preprocess_workers()
        self._pool = concurrent.futures.ThreadPoolExecutor(self.preprocess_workers, thread_name_prefix="preprocess")
        self.image_workers = None
        if preprocess_backend == "process":
            self.image_workers = ImageWorkers(self.preprocess_workers, threads_per_image=preprocess_threads,
                                              cores=available_cpus())
        self._preparing = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        # (finish reason per choice, seconds since submission): for metrics.
        self.on_finished: Callable[[list[str], float], None] | None = None

    # ---- life cycle -----------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.engine.run_forever(self._stop)
        except BaseException as error:  # noqa: BLE001 - any failure must reach the waiting clients
            log.exception("the engine thread failed; failing every request in flight")
            self.dead = f"{type(error).__name__}: {error}"
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._fail_all)

    def _fail_all(self) -> None:
        for stream in self.streams.values():
            stream.fail(EngineDead(f"the engine stopped: {self.dead}"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    def stop(self) -> None:
        self._stop.set()
        self.engine.wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if isinstance(self.engine, EngineProcesses):
            self.engine.close()  # done by its thread on the way out, or still under way after a replica died
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.image_workers is not None:
            self.image_workers.close()

    async def drain(self, timeout: float) -> None:
        """Stop admitting; give requests in flight `timeout` seconds to finish, then abort the rest
        (their clients get finish_reason "abort", not a cut connection)."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.streams:
            log.warning("shutdown: aborting %d request(s) still running after %.1f s", len(self.streams), timeout)
            for request_id in list(self.streams):
                self.engine.abort(request_id)
        # The aborted streams end at the engine's next step; a client that stops reading is not waited
        # for long (uvicorn cancels its connection at its own graceful-shutdown timeout).
        deadline = time.monotonic() + 5
        while self.streams and self.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # ---- requests ---------------------------------------------------------------------------------------
    def check_admitting(self) -> None:
        if self.draining:
            raise ServerBusy("the server is shutting down and accepts no new requests", retry=False)
        if self.dead is not None:
            raise EngineDead(f"the engine stopped: {self.dead}")
        limit = self.engine.config.max_waiting
        if self._preparing + self.engine.queued >= limit:
            raise ServerBusy(f"the server is at capacity ({limit} requests already queued); retry later", retry=True)

    async def prepare(self, function: Callable[..., PreparedPrompt], *args: Any, **kwargs: Any) -> PreparedPrompt:
        """Runs input processing (image decoding, tiling, tokenizing) on the worker pool."""
        self.check_admitting()
        self._preparing += 1  # counted against the admission bound so the pool's queue stays bounded too
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: function(*args, **kwargs))
        finally:
            self._preparing -= 1

    def submit(self, request_id: str, prompt: PreparedPrompt, params: SamplingParams) -> RequestStream:
        """Raises RequestError (cannot run), ServerBusy (full / shutting down) or EngineDead."""
        self.check_admitting()
        stream = RequestStream(request_id, asyncio.get_running_loop())
        try:
            self.engine.add_request(request_id, prompt.prompt_ids, params, prompt.images, sink=stream.sink,
                                    prompt=prompt.prompt)
        except EngineFull as error:
            raise ServerBusy(f"the server is at capacity ({error}); retry later", retry=True) from error
        self.streams[request_id] = stream
        return stream

    def finished(self, stream: RequestStream) -> None:
        """The handler is done with `stream`: abort it if the engine still runs it (client gone)."""
        if self.streams.pop(stream.request_id, None) is None:
            return  # already done with
        done = stream.latest is not None and stream.latest.finished
        if not done and stream.error is None:
            self.engine.abort(stream.request_id)
        if self.on_finished is not None:
            reasons = [c.finish_reason or "abort" for c in stream.latest.outputs] if done else ["abort"]
            self.on_finished(reasons, time.monotonic() - stream.started)


__all__ = ["EngineBridge", "EngineDead", "RequestError", "RequestStream", "ServerBusy"]
