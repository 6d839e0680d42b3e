"""Arrays handed between processes as files in shared memory (/dev/shm): one write, one `readinto`, both with the
GIL released, where a pipe would take a read per 64 KiB and a copy under the GIL to unpickle.

Image tiles travel this way from the image workers to the server (`image_workers`) and from the server to its
engine processes (`engine_processes`). Each process that receives arrays owns a directory of its own, removed when
it closes; the reader of a file deletes it.

Host-side only (no JAX).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
import uuid

import numpy as np

log = logging.getLogger(__name__)

SHARED_MEMORY = "/dev/shm"

# A server killed with SIGKILL cannot remove its directory, nor the arrays it was reading: memory in /dev/shm until
# the machine restarts. Each directory is held with a lock on its ".owner" file (released by the kernel when its
# process dies, whatever the PID namespace of a container sharing /dev/shm), so the next server removes the ones
# nobody holds. A directory younger than ABANDONED_AFTER_S may be one whose owner is between creating it and taking
# the lock: left alone.
TILE_DIRECTORY_PREFIX = "internvl-jax-tiles-"
ABANDONED_AFTER_S = 60.0


class TileDirectory:
    """A directory of this process under `shared_memory`; `path` is None where there is no writable one."""

    def __init__(self, shared_memory: str | None = SHARED_MEMORY):
        self.path: str | None = None
        self._owner: int | None = None
        if shared_memory is not None and os.path.isdir(shared_memory) and os.access(shared_memory, os.W_OK):
            _remove_abandoned(shared_memory)
            self.path = tempfile.mkdtemp(prefix=TILE_DIRECTORY_PREFIX, dir=shared_memory)
            self._owner = _hold(self.path)

    def close(self) -> None:
        if self.path is not None:
            # The lock file last: a directory without one is judged by its age alone (`_remove_abandoned`).
            with contextlib.suppress(OSError):  # gone already (removed by hand, or by another process)
                for name in os.listdir(self.path):
                    if name != ".owner":
                        with contextlib.suppress(OSError):
                            os.unlink(os.path.join(self.path, name))
            shutil.rmtree(self.path, ignore_errors=True)
        if self._owner is not None:
            os.close(self._owner)
            self._owner = None


def write_array(directory: str | None, array: np.ndarray) -> str | None:
    """`array`'s bytes in a new file under `directory`: its path, or None where it cannot be written (no directory,
    ENOSPC on a small /dev/shm, or the directory is gone because its owner is closing)."""
    if directory is None:
        return None
    path = os.path.join(directory, uuid.uuid4().hex)
    try:
        with open(path, "wb") as file:
            file.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        return path
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None


def read_array(path: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The array `write_array` wrote to `path`, in this process's memory; the file is deleted."""
    try:
        array = np.empty(shape, np.dtype(dtype))
        view = memoryview(array).cast("B")
        with open(path, "rb", buffering=0) as file:
            filled = 0
            while filled < len(view):  # a regular file reads in one call; loop all the same
                count = file.readinto(view[filled:])
                if not count:
                    raise RuntimeError(f"the array file {path} ended after {filled} of {len(view)} bytes")
                filled += count
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return array


def _hold(directory: str) -> int:
    fd = os.open(os.path.join(directory, ".owner"), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _remove_abandoned(shared_memory: str) -> None:
    now = time.time()
    for name in os.listdir(shared_memory):
        path = os.path.join(shared_memory, name)
        if not name.startswith(TILE_DIRECTORY_PREFIX):
            continue
        try:
            if now - os.stat(path).st_mtime < ABANDONED_AFTER_S:
                continue
            fd = os.open(os.path.join(path, ".owner"), os.O_RDWR)
        except FileNotFoundError:  # no lock file and old enough to have taken one: left by a closing owner
            log.warning("removing %s: left in shared memory half removed", path)
            shutil.rmtree(path, ignore_errors=True)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its server is alive
            continue
        finally:
            os.close(fd)
        log.warning("removing %s: left in shared memory by a server that did not shut down", path)
        shutil.rmtree(path, ignore_errors=True)


__all__ = ["SHARED_MEMORY", "TileDirectory", "read_array", "write_array"]
