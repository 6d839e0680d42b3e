"""How long the server's image preprocessing holds the GIL (development machine): worker threads run the
server's path for arena-like requests (data URL -> MediaPolicy.load -> preprocess_image) while a probe thread
measures how late it wakes from 0.2 ms sleeps. `python gilprobe.py [workers] [requests]` from the repo root."""
import concurrent.futures
import sys
import threading
import time

import numpy as np

from bench import datasets
from internvl_jax.preprocess import TilingConfig, preprocess_image
from serve.media import MediaPolicy

SLEEP = 0.0002


def main(workers: int, num: int) -> None:
    urls = [request.images[0].url for request in datasets.arena_like_requests(num, seed=12345)]
    print(f"body MB mean {np.mean([len(url) for url in urls]) / 1e6:.2f}")
    loader, tiling = MediaPolicy(), TilingConfig()

    def work(url):
        started, cpu = time.perf_counter(), time.thread_time()
        data = loader.load(url)
        loaded = time.perf_counter()
        preprocess_image(data, tiling)
        return time.perf_counter() - started, time.thread_time() - cpu, loaded - started

    work(urls[0])
    lateness, stop = [], threading.Event()

    def probe():
        while not stop.is_set():
            started = time.perf_counter()
            time.sleep(SLEEP)
            lateness.append(time.perf_counter() - started - SLEEP)

    thread = threading.Thread(target=probe)
    thread.start()
    time.sleep(1.0)
    stop.set()
    thread.join()
    idle = np.array(lateness)
    lateness.clear()
    stop.clear()
    thread = threading.Thread(target=probe)
    thread.start()
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = np.array(list(pool.map(work, urls)))
    wall = time.perf_counter() - started
    stop.set()
    thread.join()
    late = np.array(lateness)
    wall_ms, cpu_ms, base64_ms = results.mean(axis=0) * 1e3
    print(f"workers {workers}: {num} requests in {wall:.2f} s; per request wall {wall_ms:.1f} ms, thread CPU "
          f"{cpu_ms:.1f} ms, base64 {base64_ms:.1f} ms")
    print(f"probe idle: {len(idle)} wakeups/s, lateness mean {idle.mean() * 1e6:.0f} us")
    print(f"probe under load: {len(late) / wall:.0f} wakeups/s, lateness mean {late.mean() * 1e6:.0f} us, p99 "
          f"{np.percentile(late, 99) * 1e6:.0f} us, max {late.max() * 1e3:.1f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1, int(sys.argv[2]) if len(sys.argv) > 2 else 24)
