"""Compiled serving programs kept on disk between starts (serialized XLA executables).

JAX's persistent compilation cache keeps XLA's compile of a program, not the tracing and lowering that come
first: every start still traces each of the engine's ~45 programs through the unrolled layers in Python,
0.5-1.4 s each in one thread, most of a cached start (docs/PERF.md). The store keeps the executables
themselves (`jax.experimental.serialize_executable`), so a start that finds its programs loads each one
instead of tracing, lowering and compiling it, as vLLM reuses its compiled graphs from `~/.cache/vllm`.

Only executables compiled in this process are stored: one that XLA's persistent cache (still on, for what
the store cannot hold) handed back does not always serialize whole again (on CPU it lost kernels). Programs
that cannot be serialized at all (those with a `custom_partitioning`, e.g. cuDNN attention on a mesh of
several devices) stay with XLA's cache.

An executable is only right for the exact runner it was built for, so entries live under a fingerprint of
everything that decides a program: the model config, the shapes, dtypes and shardings of the runner's
state (weights, KV cache, slots, feature pool), its flags, the mesh's devices, the source files of this
package, the JAX packages' versions, the backend and `XLA_FLAGS`. Within it, an entry is named by the
program's key (step, bucket shape, static flags). An entry that cannot be read is removed and the program
compiled again. Entries are pickles: like any cache directory, only point it at files you wrote. Beside them,
`choices.json` keeps what the warm-up measured for this fingerprint (the faster decode attention), so a later
start builds only the chosen programs.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import gc
import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import jax
from jax.experimental import serialize_executable

log = logging.getLogger(__name__)

SUFFIX = ".jaxexec"
CHOICES_FILE = "choices.json"  # choices measured at a warm-up (the faster decode attention), per fingerprint
_PACKAGE = Path(__file__).parent
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_compiling = threading.local()  # per compiling thread: did XLA's persistent cache answer its last compile?


def _note_cache_hit(event: str, **_) -> None:
    if event == _CACHE_HIT:
        _compiling.hit = True


jax.monitoring.register_event_listener(_note_cache_hit)


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity and cgroup cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _lower_priority() -> None:
    """Runs in each compile thread: nice 10 for it (Linux threads have their own), so the thread that lowers
    the next programs (Python, one at a time: the start-up's critical path once compiling is spread over the
    cores) is scheduled first. It still lowered 2x slower next to 16 compiles on an H100 host than alone
    (docs/PERF.md, eighth session): what they contend for is not only the cores."""
    with contextlib.suppress(AttributeError, OSError):  # not on Linux, or not permitted: same priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def compile_workers(requested: int | None = None) -> int:
    """Threads compiling programs at once: `requested`, else min(16, usable cores)."""
    return requested or min(16, available_cpus())


def compile_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """`workers` threads that compile lowered programs at once (XLA's compiler releases the GIL)."""
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="compile", initializer=_lower_priority)


@contextlib.contextmanager
def _no_garbage_collection():
    """Python's cyclic garbage collector off for a while, then one collection. Tracing allocates objects by the
    hundred thousand, and each collection of the oldest generation walks every live object of the process
    (the model's, JAX's): lowering serving programs took 22-31% less time without it on the development
    machine, 10-21% on an H100 host (docs/PERF.md, seventh and eighth sessions)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
            gc.collect()


class Built(NamedTuple):
    """A program `build_programs` put together, and what it cost."""

    program: jax.stages.Compiled
    loaded: bool  # read from the program store (else lowered and compiled here)
    seconds: float  # its share of the store's loading, or its lowering plus compiling (one thread's time)
    lowering: float  # of `seconds`: tracing and lowering, in the calling thread


def build_programs(jobs: list[tuple[tuple, Callable[[], jax.stages.Lowered]]], store: ProgramStore | None,
                   workers: int, on_done: Callable[[], Any] = lambda: None) -> list[Built]:
    """The program of each (key, lower) job: loaded from `store` by `workers` threads (reading and linking
    kernels happen mostly outside Python), else `lower()`ed in this thread, one after the other (tracing is
    Python), and compiled by the threads at once, each as soon as it is lowered, then stored. `on_done` is
    called as each program is ready (a progress bar). On an error or Ctrl-C the compiles still queued are
    dropped rather than waited for."""
    built: list[Built | None] = [None] * len(jobs)
    pool = compile_pool(workers)
    try:
        if store is not None:
            started = time.monotonic()
            loaded = list(pool.map(lambda job: store.load(job[0]), jobs))
            # the loads overlap: their time is shared out evenly over the programs found
            share = (time.monotonic() - started) / max(sum(program is not None for program in loaded), 1)
            for index, program in enumerate(loaded):
                if program is not None:
                    built[index] = Built(program, True, share, 0.0)
                    on_done()

        def compile_one(index: int, lowered: jax.stages.Lowered) -> tuple[int, jax.stages.Compiled, float]:
            started = time.monotonic()
            compiled, fresh = compile_here(lowered)
            if store is not None and fresh:
                store.save(jobs[index][0], compiled)
            return index, compiled, time.monotonic() - started

        futures, lowering = [], {}
        with _no_garbage_collection():
            for index, (_, lower) in enumerate(jobs):
                if built[index] is None:
                    started = time.monotonic()
                    lowered = lower()
                    lowering[index] = time.monotonic() - started
                    futures.append(pool.submit(compile_one, index, lowered))
        for future in concurrent.futures.as_completed(futures):
            index, compiled, spent = future.result()
            built[index] = Built(compiled, False, lowering[index] + spent, lowering[index])
            on_done()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return built


def compile_here(lowered: jax.stages.Lowered) -> tuple[jax.stages.Compiled, bool]:
    """(the executable, whether it was compiled in this process rather than read from XLA's cache)."""
    _compiling.hit = False
    compiled = lowered.compile()
    return compiled, not _compiling.hit


@functools.cache  # the same for every store of the process
def _source_digest() -> str:
    """sha256 over this package's Python files: any code change may change a traced program."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(_PACKAGE).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.cache
def _jax_versions() -> tuple[str, ...]:
    """jax, jaxlib and the CUDA plugin: their compiler built the executable and their runtime loads it."""
    names = {}
    for distribution in importlib.metadata.distributions():
        name = (distribution.metadata["Name"] or "").lower()
        if name.startswith("jax"):
            names[name] = distribution.version
    return tuple(sorted(f"{name}=={version}" for name, version in names.items()))


def _describe(array: Any) -> list[str]:
    sharding = getattr(array, "sharding", None)
    return [str(array.shape), str(array.dtype), str(getattr(sharding, "spec", sharding))]


def fingerprint(devices: list[jax.Device], **parts: Any) -> str:
    """Hex digest of `parts` (JSON-able) and of what decides every program: the devices, the JAX packages,
    the backend, XLA_FLAGS and this package's source."""
    client = devices[0].client
    parts |= {
        "jax": _jax_versions(),
        "backend": [client.platform, client.platform_version],
        "devices": [[device.id, device.device_kind] for device in devices],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "source": _source_digest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def runner_fingerprint(runner) -> str:
    """Everything that decides the runner's programs besides their keys."""
    state = [*runner.encoder_leaves, *runner.text_leaves, *jax.tree.leaves(runner.caches),
             *jax.tree.leaves(runner.slots), runner.pool]
    return fingerprint(
        list(runner.mesh.devices.flat),
        mesh={str(name): int(size) for name, size in runner.mesh.shape.items()},
        config=runner.config.to_dict(),
        runner=[runner.num_slots, runner.max_model_len, runner.pool_tiles, runner.encoder_mode, runner.cuda_graphs,
                runner.vision_gelu],
        state=[_describe(array) for array in state])


class ProgramStore:
    """Serialized executables under `root / <fingerprint>`: a runner's serving programs (`for_runner`), or
    programs whose keys name their shapes and shardings (`for_devices`, the dummy weights')."""

    def __init__(self, root: str | Path, runner_fingerprint: str, devices: list[jax.Device]):
        self.directory = Path(root) / runner_fingerprint[:32]
        self._warned = False  # one warning per store for programs that cannot be stored, the rest at debug
        # The devices the executables run on, in mesh order. Without them the loader would spread a program
        # over every device of the backend (a one-device program on a host with 8 would expect 8 shards).
        self.devices = devices

    @classmethod
    def for_runner(cls, root: str | Path, runner) -> ProgramStore:
        return cls(root, runner_fingerprint(runner), list(runner.mesh.devices.flat))

    @classmethod
    def for_devices(cls, root: str | Path, devices: list[jax.Device]) -> ProgramStore:
        """A store for programs whose keys name everything else they depend on (shapes, dtypes, shardings)."""
        return cls(root, fingerprint(devices), devices)

    def path(self, key: tuple) -> Path:
        return self.directory / (hashlib.sha256(repr(key).encode()).hexdigest()[:32] + SUFFIX)

    def load(self, key: tuple) -> jax.stages.Compiled | None:
        """The stored executable of `key`, loaded onto the devices; None if there is none or it is unusable."""
        path = self.path(key)
        try:
            with path.open("rb") as file:
                stored_key, serialized, in_tree, out_tree = pickle.load(file)
            if stored_key != repr(key):  # a hash collision, or a file from elsewhere: not this program
                return None
            return serialize_executable.deserialize_and_load(serialized, in_tree, out_tree,
                                                         execution_devices=self.devices)
        except FileNotFoundError:
            return None
        except Exception as error:  # truncated, from another jaxlib, ...: removed, compiled again
            log.warning("compiled program %s could not be loaded (%s: %s); compiling it again", path,
                        type(error).__name__, error)
            path.unlink(missing_ok=True)
            return None

    def _choices(self) -> dict[str, Any]:
        try:
            choices = json.loads((self.directory / CHOICES_FILE).read_text())
        except (OSError, ValueError):  # none yet, or unreadable: measured again and rewritten
            return {}
        return choices if isinstance(choices, dict) else {}

    def choice(self, name: str) -> Any:
        """A choice an earlier start measured for this fingerprint (e.g. "decode_attention"), or None."""
        return self._choices().get(name)

    def save_choice(self, name: str, value: Any) -> None:
        """Records a measured choice for the next start (atomically; a failure only costs the next start a
        measurement)."""
        path = self.directory / CHOICES_FILE
        choices = json.dumps(self._choices() | {name: value}).encode()
        try:
            _write_atomically(path, lambda file: file.write(choices))
        except OSError as error:
            log.warning("the %s choice was not stored in %s (%s: %s)", name, path, type(error).__name__, error)

    def save(self, key: tuple, compiled: jax.stages.Compiled) -> bool:
        """Writes `compiled` for `key` (atomically: a reader never sees half a file). False when the
        executable cannot be serialized or written; serving goes on without the entry."""
        path = self.path(key)
        try:
            serialized, in_tree, out_tree = serialize_executable.serialize(compiled)
            entry = (repr(key), serialized, in_tree, out_tree)
            _write_atomically(path, lambda file: pickle.dump(entry, file, protocol=pickle.HIGHEST_PROTOCOL))
            return True
        except Exception as error:  # a full disk or a program XLA cannot serialize must not stop the server
            log.log(logging.DEBUG if self._warned else logging.WARNING,
                    "compiled program %s not stored (%s: %s); it stays with XLA's persistent cache%s", path,
                    type(error).__name__, error, "" if self._warned else " (further ones logged at debug level)")
            self._warned = True
            return False


def _write_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Writes `path` through a sibling file renamed into place: a reader never sees half a file, and a failed
    write leaves nothing behind."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("wb") as file:
            write(file)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
