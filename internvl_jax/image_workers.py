"""Image decoding and tiling in worker processes, so that the engine thread does not wait for the GIL.

With preprocessing on threads of the server's process, every JPEG decode and Pillow resize releases and
re-takes the GIL. The engine thread releases it too, around each dispatch and each large numpy copy, and then
waits its turn behind those threads: 43% of its time inside steps on one H200 (docs/PERF.md, twelfth session).
vLLM V1 took its engine out of the API server's process for the same reason; here the heavy part of
preprocessing leaves instead:

    encoded bytes --socket--> worker process: decode, resize, tile (preprocess_image)
    tiles uint8[T, 3, S, S] <-- one file in shared memory (/dev/shm), read into the server's memory and deleted

One `readinto` per image in the server's process (one GIL release), where a pipe would take a read per 64 KiB
and a copy under the GIL to unpickle. Where shared memory is missing or full (a container's default /dev/shm
is 64 MB), the tiles come back through the socket instead, with a warning.

Each worker is `python -m internvl_jax.image_workers FD`: a fresh interpreter that imports numpy and Pillow only
(not the server's JAX, threads or device handles, and not the user's `__main__`, which multiprocessing would
re-run in every worker). A worker serves one request at a time for one server thread, so when it dies (a
decoder crash on a hostile file) the image that killed it is known: it is tried once more on a fresh worker and
refused if that one dies too; no other request is touched.

Host-side only (no JAX), like `preprocess`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

from internvl_jax.preprocess import ImageError, ProcessedImage, TilingConfig, preprocess_image
from internvl_jax.shared_memory import SHARED_MEMORY, TileDirectory, read_array, write_array

log = logging.getLogger(__name__)



# ---- in the worker ---------------------------------------------------------------------------------


def _preprocess(data: bytes, tiling: TilingConfig, max_pixels: int, directory: str | None, threads: int):
    """Decode and tile (each resize on `threads` threads); the tiles go to a file under `directory` (its path is
    returned) or, when that cannot be written, back through the socket (the array itself)."""
    processed = preprocess_image(data, tiling, max_pixels=max_pixels, threads=threads)
    tiles = processed.tiles
    meta = (tiles.shape, tiles.dtype.str, processed.grid)
    return write_array(directory, tiles) or tiles, meta


def _keep_freed_memory() -> bool:
    """glibc's malloc gives the ~17 MB a 7-tile image passes through (decoded image, canvas, tiles) back to the
    kernel after each image and takes it again, zeroed page by page, for the next: ~4,000 page faults, 27 instead
    of 17 ms per image on the development machine. Large blocks from the heap (not mmap) and 64 MiB kept at its
    top: the pages stay. False where the C library has no `mallopt` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    m_top_pad, m_mmap_threshold = -2, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 256 << 20)) and bool(mallopt(m_top_pad, 64 << 20))


def _serve(fd: int) -> None:
    """The worker's loop: (bytes, tiling, max_pixels, directory, threads) in, ("ok", result) or ("error", ...)
    out, until the server closes its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server drains
    _keep_freed_memory()
    connection = Connection(fd)
    connection.send(("ready", os.getpid()))
    while True:
        try:
            request = connection.recv()
        except (EOFError, OSError):
            return
        try:
            reply = ("ok", _preprocess(*request))
        except ImageError as error:
            reply = ("error", str(error))
        except Exception as error:  # noqa: BLE001 - a bug here must reach the request, not end the worker
            reply = ("bug", f"{type(error).__name__}: {error}")
        connection.send(reply)


# ---- in the server ----------------------------------------------------------------------------------


def start_module(module: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Connection]:
    """`python -m MODULE FD`, a fresh interpreter importing this package from where this process did (installed or
    not), with `env` added to this process's environment; FD is its end of a socket pair. Returns (the process, this
    end as a Connection)."""
    ours, theirs = socket.socketpair()
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = {**os.environ, **(env or {}),
                   "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with theirs:
        process = subprocess.Popen([sys.executable, "-m", module, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                                   stdin=subprocess.DEVNULL, env=environment)
    return process, Connection(ours.detach())


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (all its threads), from /proc; None where it cannot be read (no
    /proc, or the process has been reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()  # after "pid (name)": the name may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


class WorkerDied(RuntimeError):
    """A worker's connection ended during a request: the worker crashed (or was killed)."""


class WorkerDidNotStart(RuntimeError):
    """A worker exited before it was ready (its error output is in the server's log)."""


class _Worker:
    def __init__(self) -> None:
        self.process, self.connection = start_module("internvl_jax.image_workers")
        self.started = False
        self.spent = 0.0  # CPU seconds, as last read

    def call(self, request: tuple):
        if not self.started:
            try:
                self.connection.recv()  # ("ready", pid)
            except (EOFError, OSError) as error:
                raise WorkerDidNotStart(f"an image worker could not start (exit code {self.process.wait()}); its "
                                        "error output is above in the server's log") from error
            self.started = True
        try:
            self.connection.send(request)
            return self.connection.recv()
        except (EOFError, OSError) as error:
            self.cpu_seconds()  # before poll() reaps it
            raise WorkerDied(f"image worker {self.process.pid} died (exit code {self.process.poll()})") from error

    def cpu_seconds(self) -> float:
        """The worker's user + system CPU seconds so far, from /proc while it can be read (until the process is
        reaped), then the last value read. 0 where there is no /proc."""
        spent = process_cpu_seconds(self.process.pid)
        if spent is not None:
            self.spent = spent
        return self.spent

    def close(self) -> None:
        self.cpu_seconds()
        with contextlib.suppress(OSError):
            self.connection.close()  # the worker reads EOF and exits
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _collect(result) -> ProcessedImage:
    """The worker's result -> tiles in this process's memory (the shared-memory file deleted)."""
    tiles, (shape, dtype, grid) = result
    if isinstance(tiles, str):
        tiles = read_array(tiles, shape, dtype)
    return ProcessedImage(tiles=tiles, grid=tuple(grid), num_tiles=len(tiles))


class ImageWorkers:
    """`workers` processes that turn encoded images into tiles (`preprocess_image` on bytes).

    `preprocess` is thread-safe and blocking: the server calls it from its preprocessing threads, each of which
    then waits on one worker, GIL released.

    Under light load a worker splits each resize of its image over up to `threads_per_image` threads
    (`preprocess.resize_bicubic`, the same pixels): a request alone gets its tiles sooner from idle cores
    (docs/PERF.md, fourteenth session). The threads an image gets shrink as more workers are busy, to one once
    they would outnumber `cores` less one (kept for the engine thread): a loaded host is not oversubscribed.
    """

    def __init__(self, workers: int, *, threads_per_image: int = 1, cores: int | None = None,
                 shared_memory: str | None = SHARED_MEMORY):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if threads_per_image < 1:
            raise ValueError(f"threads_per_image must be >= 1, got {threads_per_image}")
        self.workers = workers
        self.threads_per_image = threads_per_image
        self.cores = cores or len(os.sched_getaffinity(0))  # the server passes its own count (`available_cpus`)
        self._tile_directory = TileDirectory(shared_memory)
        self.directory = self._tile_directory.path
        if self.directory is None:
            log.warning("no writable shared memory at %s: image tiles come back from the workers through sockets",
                        shared_memory)
        self._warned_full = False
        self._closed = False
        self._retired_cpu_seconds = 0.0  # of workers replaced after dying
        self._all: list[_Worker] = [_Worker() for _ in range(workers)]  # they start now, not at the first request
        # Last in, first out: under light load the same few workers run, their caches and heaps warm (a worker's
        # first images are slower).
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._lock = threading.Lock()
        for worker in self._all:
            self._idle.put(worker)

    def preprocess(self, data: bytes | bytearray | memoryview, tiling: TilingConfig, *,
                   max_pixels: int) -> ProcessedImage:
        """Like `preprocess_image(data, tiling, max_pixels=...)`, in a worker. Raises ImageError as it does."""
        data = bytes(data)
        for attempt in range(2):
            worker = self._idle.get()
            threads = self.threads_for(busy=self.workers - self._idle.qsize())
            try:
                kind, result = worker.call((data, tiling, max_pixels, self.directory, threads))
            except WorkerDied as died:
                log.error("%s while decoding an image; starting another", died)
                self._replace(worker)
                if attempt == 1:
                    raise ImageError("the image crashed the decoder twice; it cannot be decoded") from None
                continue
            except WorkerDidNotStart:  # the next request tries a fresh one (no worker is lost)
                self._replace(worker)
                raise
            self._idle.put(worker)
            if kind == "error":
                raise ImageError(result)
            if kind == "bug":
                raise RuntimeError(f"the image worker failed: {result}")
            if not isinstance(result[0], str) and self.directory is not None and not self._warned_full:
                self._warned_full = True
                log.warning("shared memory at %s is full (a container's /dev/shm is 64 MB unless it runs with "
                            "--shm-size or --ipc=host): image tiles come back through sockets, slower",
                            os.path.dirname(self.directory))
            return _collect(result)
        raise AssertionError("unreachable")

    def threads_for(self, busy: int) -> int:
        """Threads for one image's resizes while `busy` workers (this one included) have an image."""
        return max(1, min(self.threads_per_image, (self.cores - 1) // max(busy, 1)))

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) of the workers since they started, replaced ones included: the image decoding
        and tiling that `process_cpu_seconds_total` of the server's own process does not count."""
        with self._lock:
            workers, retired = list(self._all), self._retired_cpu_seconds
        return retired + sum(worker.cpu_seconds() for worker in workers)

    def _replace(self, dead: _Worker) -> None:
        dead.close()
        with self._lock:
            self._retired_cpu_seconds += dead.spent
            if self._closed:
                raise ImageError("the server is shutting down; the image was not decoded")
            fresh = _Worker()
            self._all[self._all.index(dead)] = fresh
        self._idle.put(fresh)

    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self._all]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._all)
        for worker in workers:
            worker.close()
        self._tile_directory.close()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))

__all__ = ["ImageWorkers"]
