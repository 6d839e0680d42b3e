"""Image decoding in worker processes (`internvl_jax.image_workers`): the same tiles as in-process, errors
that name the image's problem, a dead worker replaced without losing the request, nothing left in /dev/shm."""

from __future__ import annotations

import io
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from internvl_jax.image_workers import SHARED_MEMORY, ImageWorkers, _keep_freed_memory
from internvl_jax.preprocess import ImageError, TilingConfig, preprocess_image


def encoded(width: int, height: int, mode: str = "RGB", fmt: str = "JPEG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


IMAGES = [encoded(1344, 896), encoded(300, 500, "RGBA", "PNG", 1), encoded(448, 448, "L", "PNG", 2),
          encoded(2000, 300, seed=3)]


@pytest.fixture(scope="module")
def workers():
    pool = ImageWorkers(2)
    yield pool
    pool.close()


@pytest.mark.parametrize("tiling", [TilingConfig(), TilingConfig(max_patches=4, use_thumbnail=False)])
def test_tiles_equal_in_process_preprocessing(workers, tiling):
    for data in IMAGES:
        expected = preprocess_image(data, tiling)
        got = workers.preprocess(data, tiling, max_pixels=64_000_000)
        assert got.grid == expected.grid and got.num_tiles == expected.num_tiles
        assert got.tiles.dtype == np.uint8 and got.tiles.flags.c_contiguous and got.tiles.flags.writeable
        np.testing.assert_array_equal(got.tiles, expected.tiles)
        assert got.content_hash == expected.content_hash
    if workers.directory is not None:  # every tile file read back was deleted
        assert os.listdir(workers.directory) == [".owner"]


def test_an_image_alone_gets_threads_and_a_loaded_host_none():
    """Threads per image: up to `threads_per_image` while few workers are busy, fewer as more are, one once the
    busy workers alone would fill the cores (one kept for the engine thread); and the tiles are the same."""
    pool = ImageWorkers(1, threads_per_image=4, cores=16)
    try:
        assert [pool.threads_for(busy) for busy in (1, 3, 4, 5, 7, 8, 16)] == [4, 4, 3, 3, 2, 1, 1]
        assert pool.threads_for(busy=0) == 4
        pool.cores = 2
        assert pool.threads_for(1) == 1
        pool.cores = 16
        for data in IMAGES:
            np.testing.assert_array_equal(pool.preprocess(data, TilingConfig(), max_pixels=64_000_000).tiles,
                                          preprocess_image(data, TilingConfig()).tiles)
    finally:
        pool.close()
    with pytest.raises(ValueError, match="threads_per_image must be >= 1, got 0"):
        ImageWorkers(1, threads_per_image=0)


def test_image_errors_come_back_as_image_errors(workers):
    with pytest.raises(ImageError, match="not a recognised image format"):
        workers.preprocess(b"garbage", TilingConfig(), max_pixels=1000)
    with pytest.raises(ImageError, match="over the limit"):
        workers.preprocess(IMAGES[0], TilingConfig(), max_pixels=1000)
    # the workers survive errors
    assert workers.preprocess(IMAGES[1], TilingConfig(), max_pixels=64_000_000).num_tiles > 0


def test_threads_share_the_workers(workers):
    """More threads than workers: each waits for a free one; every result is right."""
    expected = [preprocess_image(data, TilingConfig()).tiles for data in IMAGES]
    results: dict[int, np.ndarray] = {}

    def work(index: int) -> None:
        results[index] = workers.preprocess(IMAGES[index % len(IMAGES)], TilingConfig(), max_pixels=64_000_000).tiles

    threads = [threading.Thread(target=work, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == list(range(8))
    for index, tiles in results.items():
        np.testing.assert_array_equal(tiles, expected[index % len(IMAGES)])


def test_a_dead_worker_is_replaced_and_its_request_retried(caplog):
    """...and the CPU seconds the workers report keep the dead one's."""
    pool = ImageWorkers(1)
    try:
        assert pool.preprocess(IMAGES[2], TilingConfig(), max_pixels=64_000_000).num_tiles == 1
        spent = pool.cpu_seconds()
        assert spent > 0  # at least its start: Python, numpy, Pillow
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pool._all[0].process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        with caplog.at_level(logging.ERROR, logger="internvl_jax.image_workers"):
            tiles = pool.preprocess(IMAGES[0], TilingConfig(), max_pixels=64_000_000).tiles
        np.testing.assert_array_equal(tiles, preprocess_image(IMAGES[0], TilingConfig()).tiles)
        assert pool.pids() != [pid]
        assert f"image worker {pid} died (exit code -9)" in caplog.text
        assert pool.cpu_seconds() - pool._all[0].cpu_seconds() == pytest.approx(spent)  # the dead one's, kept
    finally:
        pool.close()


def test_without_shared_memory_tiles_come_through_the_socket(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="internvl_jax.image_workers"):
        pool = ImageWorkers(1, shared_memory=str(tmp_path / "missing"))
    try:
        assert pool.directory is None and "no writable shared memory" in caplog.text
        got = pool.preprocess(IMAGES[0], TilingConfig(), max_pixels=64_000_000)
        np.testing.assert_array_equal(got.tiles, preprocess_image(IMAGES[0], TilingConfig()).tiles)
    finally:
        pool.close()


def test_a_full_shared_memory_falls_back_to_the_socket(tmp_path, caplog):
    """A tile file that cannot be written (here: its directory is gone, as ENOSPC on a 64 MB /dev/shm) comes back
    through the socket, with one warning that says how to give the container more shared memory."""
    pool = ImageWorkers(1, shared_memory=str(tmp_path))
    try:
        shutil.rmtree(pool.directory)
        with caplog.at_level(logging.WARNING, logger="internvl_jax.image_workers"):
            for _ in range(2):
                got = pool.preprocess(IMAGES[3], TilingConfig(), max_pixels=64_000_000)
                np.testing.assert_array_equal(got.tiles, preprocess_image(IMAGES[3], TilingConfig()).tiles)
        assert caplog.text.count("--shm-size") == 1
    finally:
        pool.close()


def test_close_stops_the_workers_and_removes_the_tile_directory():
    pool = ImageWorkers(2)
    processes = [worker.process for worker in pool._all]
    directory = pool.directory
    pool.close()
    assert all(process.poll() is not None for process in processes)
    if directory is not None:
        assert not os.path.exists(directory)
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        ImageWorkers(0)


def test_a_killed_servers_tile_directory_is_removed_by_the_next(tmp_path, monkeypatch, caplog):
    """A server killed with SIGKILL leaves its tile directory (and the tiles it was reading) in shared memory; the
    next one removes it, but never one whose server is alive, nor one too young to have taken its lock."""
    from internvl_jax import shared_memory

    script = ("import sys, time; from internvl_jax.image_workers import ImageWorkers; "
              "pool = ImageWorkers(1, shared_memory=sys.argv[1]); print(pool.directory, flush=True); time.sleep(120)")
    server = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    killed = server.stdout.readline().strip()
    alive = ImageWorkers(1, shared_memory=str(tmp_path))
    try:
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        with open(os.path.join(killed, "tiles"), "wb") as leftover:
            leftover.write(bytes(1000))
        half_removed = tmp_path / (shared_memory.TILE_DIRECTORY_PREFIX + "half")  # its owner died mid-close
        half_removed.mkdir()
        (half_removed / "tiles").write_bytes(bytes(10))
        ImageWorkers(1, shared_memory=str(tmp_path)).close()  # too young to judge: all left alone
        assert os.path.exists(killed) and os.path.exists(alive.directory) and half_removed.exists()
        monkeypatch.setattr(shared_memory, "ABANDONED_AFTER_S", 0.0)
        with caplog.at_level(logging.WARNING, logger="internvl_jax.shared_memory"):
            fresh = ImageWorkers(1, shared_memory=str(tmp_path))
        fresh.close()
        assert not os.path.exists(killed) and "did not shut down" in caplog.text
        assert not half_removed.exists() and "half removed" in caplog.text
        assert os.path.exists(alive.directory)  # its server holds it
        assert alive.preprocess(IMAGES[1], TilingConfig(), max_pixels=64_000_000).num_tiles > 0
    finally:
        alive.close()
        server.kill()
        server.wait()


def test_the_default_uses_dev_shm_where_there_is_one():
    pool = ImageWorkers(1)
    try:
        if os.access(SHARED_MEMORY, os.W_OK):
            assert pool.directory is not None and os.path.dirname(pool.directory) == SHARED_MEMORY
    finally:
        pool.close()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_workers_keep_freed_memory_on_glibc():
    """Without it a worker faults its ~17 MB per 7-tile image in again every image (+8 ms on one H200)."""
    assert _keep_freed_memory()


def test_a_worker_that_cannot_start_is_an_error_not_a_hang(monkeypatch):
    """A broken worker command (here: an interpreter path that exits at once) fails the request with a message
    that points at the log, and the next request gets a fresh worker instead of waiting for a lost one."""
    import internvl_jax.image_workers as image_workers

    monkeypatch.setattr(image_workers.sys, "executable", "/bin/false")
    pool = ImageWorkers(1)
    try:
        for _ in range(2):
            with pytest.raises(RuntimeError, match=r"an image worker could not start \(exit code 1\)"):
                pool.preprocess(IMAGES[2], TilingConfig(), max_pixels=64_000_000)
        monkeypatch.undo()
        pool._replace(pool._idle.get())  # a working command again: the pool recovers
        assert pool.preprocess(IMAGES[2], TilingConfig(), max_pixels=64_000_000).num_tiles == 1
    finally:
        pool.close()
