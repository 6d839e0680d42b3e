"""Where one image's preprocessing time goes on this host, piece by piece (no GPU needed):

    PYTHONPATH=. python -m bench.preprocess_probe --out $OUT

For the `ttft-7tile` image (1344 x 896 noise JPEG, 7 tiles) and a photo-like arena image that needs a grid
resize, times each step of the server's path (median of --repeats, after one warm-up): the data URL's base64,
the bytes' cache key, JPEG decoding, the resizes, the tile transpose, the whole `preprocess_image`, and one
round trip through an `ImageWorkers` process, each resize on 1..8 threads (`--threads`). Writes
`preprocess-probe.json` to --out.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time

import numpy as np
from PIL import Image

from bench.datasets import ImageSpec, jpeg_data_url, render_jpeg
from internvl_jax import preprocess
from internvl_jax.image_workers import ImageWorkers
from internvl_jax.inputs import ProcessedImageCache
from internvl_jax.preprocess import TilingConfig, load_image, preprocess_image, resize_bicubic, tile_grid


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def pieces(jpeg: bytes, tiling: TilingConfig, repeats: int, workers: dict[int, ImageWorkers],
           thread_counts: list[int]) -> dict:
    url = jpeg_data_url(jpeg)
    rgb = load_image(jpeg)
    side = tiling.image_size
    cols, rows = tile_grid(rgb.width, rgb.height, tiling)
    canvas_size = (side * cols, side * rows)
    canvas = np.asarray(rgb if rgb.size == canvas_size else rgb.resize(canvas_size, Image.Resampling.BICUBIC))
    result = {"size": rgb.size, "grid": (cols, rows), "jpeg_bytes": len(jpeg)}
    timings = {
        "data_url_to_bytes": lambda: preprocess._data_url_payload(url),
        "bytes_cache_key": lambda: ProcessedImageCache.key(jpeg, tiling, preprocess.DEFAULT_MAX_PIXELS),
        "jpeg_open_and_decode": lambda: Image.open(io.BytesIO(jpeg)).load(),
        "load_image (decode, upright RGB)": lambda: load_image(jpeg),
        **{f"grid_resize, {k} threads": (lambda k=k: resize_bicubic(rgb, canvas_size, k))
           for k in thread_counts if rgb.size != canvas_size},
        **{f"thumbnail_resize, {k} threads": (lambda k=k: resize_bicubic(rgb, (side, side), k)) for k in thread_counts},
        "canvas_view": lambda: np.asarray(rgb),
        "tile_transpose": lambda: np.ascontiguousarray(
            canvas.reshape(rows, side, cols, side, 3).transpose(0, 2, 4, 1, 3)),
        **{f"preprocess_image, {k} threads": (lambda k=k: preprocess_image(jpeg, tiling, threads=k))
           for k in thread_counts},
        **{f"worker round trip, {k} threads": (lambda pool=pool: pool.preprocess(
            jpeg, tiling, max_pixels=preprocess.DEFAULT_MAX_PIXELS)) for k, pool in workers.items()},
    }
    for name, fn in timings.items():
        if fn is not None:
            result[name] = median_ms(fn, repeats)
            print(f"  {name:40s} {result[name]:7.2f} ms", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", default="1,2,4,8", help="thread counts per image to time")
    args = parser.parse_args(argv)
    import PIL

    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "pillow": PIL.__version__, "numpy": np.__version__, "images": {}}
    try:
        with open("/proc/cpuinfo") as handle:
            results["cpu"] = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(results["cpu"], results["cores"], "cores, Pillow", results["pillow"], flush=True)
    tiling = TilingConfig()
    thread_counts = [int(k) for k in args.threads.split(",")]
    results["pass_order_rule"] = preprocess._pass_order_rule()
    workers = {k: ImageWorkers(1, threads_per_image=k) for k in thread_counts}
    try:
        for name, spec in (("ttft-7tile noise 1344x896", ImageSpec(1344, 896, "noise", 7)),
                           ("arena photo 1280x720", ImageSpec(1280, 720, "photo", 3))):
            print(name, flush=True)
            results["images"][name] = pieces(render_jpeg(spec), tiling, args.repeats, workers, thread_counts)
    finally:
        for pool in workers.values():
            pool.close()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "preprocess-probe.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
