"""`python -m bench serve` (CPU): datasets, metric math, arrivals, SSE parsing, the result block, plots, and
end to end against the real `python -m serve` (built-in demo model) on a loopback port."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import __main__ as bench_main
from bench import datasets
from bench.plot import plot_results
from bench.serve import (
    RequestOutput,
    SSEDecoder,
    arrival_offsets,
    calculate_metrics,
    format_result,
    peak_concurrency,
    peak_output_throughput,
    sample_intervals,
)

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def decode_image(url: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert url.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))
    assert image.format == "JPEG"
    return image


# ---- datasets ------------------------------------------------------------------------------


def test_length_bounds_follow_vllm_range_ratio():
    assert datasets.length_bounds(100, 0.25) == (75, 125)
    assert datasets.length_bounds(107, 0.19) == (86, 128)  # arena-like outputs: mean 107, VisionArena's cap
    assert datasets.length_bounds(3, 0.9, minimum=1) == (1, 6)
    lengths = datasets.sample_lengths(np.random.default_rng(0), 5000, 10, 0.5)
    assert lengths.min() == 5 and lengths.max() == 15
    with pytest.raises(ValueError):
        datasets.length_bounds(10, 1.0)


def test_random_mm_is_seeded():
    kwargs = dict(input_len=20, output_len=5, range_ratio=0.5, base_items_per_request=2, num_mm_items_range_ratio=0.5,
                  bucket_config={(16, 16, 1): 0.5, (24, 40, 1): 0.5})
    first = datasets.random_mm_requests(12, seed=7, **kwargs)
    again = datasets.random_mm_requests(12, seed=7, image_workers=1, **kwargs)
    other = datasets.random_mm_requests(12, seed=8, **kwargs)
    assert first == again
    assert [r.prompt for r in first] != [r.prompt for r in other]
    assert [i.url for r in first for i in r.images] != [i.url for r in other for i in r.images]
    for request in first:
        assert len(request.prompt.split()) == request.prompt_len
        assert 10 <= request.prompt_len <= 30 and 2 <= request.expected_output_len <= 8


def test_random_mm_items_per_request_range_and_limit():
    buckets = {(8, 8, 1): 1.0}
    requests = datasets.random_mm_requests(300, input_len=4, output_len=2, base_items_per_request=3,
                                           num_mm_items_range_ratio=0.5, bucket_config=buckets, seed=0)
    counts = Counter(len(r.images) for r in requests)
    assert set(counts) == {1, 2, 3, 4, 5}  # uniform over [floor(3 * 0.5), ceil(3 * 1.5)]
    assert abs(np.mean([len(r.images) for r in requests]) - 3) < 0.25
    capped = datasets.random_mm_requests(100, input_len=4, output_len=2, base_items_per_request=3,
                                         num_mm_items_range_ratio=0.5, bucket_config=buckets,
                                         limit_mm_per_prompt={"image": 2}, seed=0)
    assert {len(r.images) for r in capped} == {1, 2}
    fixed = datasets.random_mm_requests(20, input_len=4, output_len=2, base_items_per_request=3,
                                        bucket_config=buckets, seed=0)
    assert {len(r.images) for r in fixed} == {3}
    with pytest.raises(ValueError, match="min 4 > max 2"):
        datasets.mm_items_bounds(4, 0.0, 2)


def test_bucket_config_parsing_and_probabilities():
    config = datasets.parse_bucket_config("{(256, 256, 1): 0.2, (720, 1280, 1): 0.6, (720, 1280, 16): 0.0}")
    assert config == {(256, 256, 1): 0.2, (720, 1280, 1): 0.6, (720, 1280, 16): 0.0}
    buckets = datasets.normalize_bucket_config(config)
    assert buckets == pytest.approx({(256, 256, 1): 0.25, (720, 1280, 1): 0.75})
    picks = Counter(datasets.sample_buckets(np.random.default_rng(0), 40_000, buckets))
    assert set(picks) == {(256, 256, 1), (720, 1280, 1)}
    assert picks[(256, 256, 1)] / 40_000 == pytest.approx(0.25, abs=0.01)
    for bad in ("[(1, 1, 1)]", "{(1, 1): 1.0}", "{(1, 1, 1): -0.5}", "{(0, 4, 1): 1.0}"):
        with pytest.raises(ValueError):
            datasets.parse_bucket_config(bad)
    with pytest.raises(ValueError, match="video"):
        datasets.normalize_bucket_config({(64, 64, 1): 0.5, (64, 64, 8): 0.5})
    with pytest.raises(ValueError, match="probability 0"):
        datasets.normalize_bucket_config({(64, 64, 1): 0.0})


def test_images_are_distinct_jpegs_of_the_bucket_shape():
    requests = datasets.random_mm_requests(3, input_len=4, output_len=2, base_items_per_request=2,
                                           bucket_config={(48, 80, 1): 1.0}, seed=0)
    images = [decode_image(item.url) for r in requests for item in r.images]
    assert all(image.size == (80, 48) for image in images)  # buckets are (height, width, frames)
    pixels = {np.asarray(image).tobytes() for image in images}
    assert len(pixels) == 6  # never the same image twice: the server's encoder cache would skip the encoder
    arena = datasets.arena_like_requests(4, image_scale=0.1, seed=3)
    for request in arena:
        (item,) = request.images
        assert decode_image(item.url).size == (item.width, item.height)
        assert 86 <= request.expected_output_len <= 128
    assert len({np.asarray(decode_image(r.images[0].url)).tobytes() for r in arena}) == 4


def test_arena_like_shape_and_tile_distribution():
    from internvl_jax.preprocess import TilingConfig, count_tiles

    rng = np.random.default_rng(0)
    sizes = [datasets.arena_image_size(rng) for _ in range(10_000)]
    shares = Counter(category for _, _, category in sizes)
    for category, probability in datasets.ARENA_CATEGORIES.items():
        assert shares[category] / 10_000 == pytest.approx(probability, abs=0.02)
    tiles = [count_tiles(w, h, TilingConfig()) for w, h, _ in sizes]
    # bench's standalone load of preprocess.py agrees with the package's module
    assert tiles[:500] == [datasets.count_tiles(w, h) for w, h, _ in sizes[:500]]
    assert set(tiles) <= set(range(1, 14)) and 0.35 < tiles.count(13) / len(tiles) < 0.6
    assert 9 < np.mean(tiles) < 11.5
    photos = [t for t, (_, _, category) in zip(tiles, sizes, strict=True) if category == "photo"]
    assert set(photos) == {13}  # 4:3 has one closest grid, 4x3, at any size
    input_lens, output_lens = datasets.arena_lengths(np.random.default_rng(1), 20_000, 90, 107, 0.19)
    assert np.mean(input_lens) == pytest.approx(90, rel=0.08) and np.median(input_lens) < 80
    assert np.mean(output_lens) == pytest.approx(107, abs=1) and output_lens.max() == 128
    # docs/BENCH_SERVE.md shows exactly what the code produces
    doc = (ROOT / "docs" / "BENCH_SERVE.md").read_text()
    assert datasets.arena_statistics_markdown(10_000, 0) in doc


# ---- metrics -------------------------------------------------------------------------------


def make_output(start, ttft, itl, latency, tokens, prompt=10, error=""):
    return RequestOutput(success=not error, error=error, prompt_len=prompt, output_tokens=tokens, ttft=ttft,
                         itl=list(itl), latency=latency, start_time=start, usage_reported=True)


def test_metric_math_by_hand():
    outputs = [make_output(0.0, 0.100, [0.020, 0.030], 0.150, 5, prompt=100),
               make_output(0.05, 0.200, [], 0.200, 1, prompt=50),
               make_output(0.1, 0.0, [], 0.0, 0, prompt=70, error="HTTP 400")]
    metrics = calculate_metrics(outputs, duration=1.0, percentiles=[50, 99])
    assert (metrics["completed"], metrics["failed"]) == (2, 1)
    assert (metrics["total_input_tokens"], metrics["total_output_tokens"]) == (150, 6)
    assert metrics["request_throughput"] == 2.0 and metrics["output_throughput"] == 6.0
    assert metrics["total_token_throughput"] == 156.0
    assert metrics["mean_ttft_ms"] == pytest.approx(150) and metrics["p99_ttft_ms"] == pytest.approx(199)
    # TPOT excludes the first token and requests with one output token: (150 - 100) / (5 - 1) ms
    assert metrics["mean_tpot_ms"] == pytest.approx(12.5) and metrics["p99_tpot_ms"] == pytest.approx(12.5)
    # ITL pools every chunk gap of every request
    assert metrics["mean_itl_ms"] == pytest.approx(25) and metrics["p99_itl_ms"] == pytest.approx(29.9)
    assert metrics["median_e2el_ms"] == pytest.approx(175) and metrics["p99_e2el_ms"] == pytest.approx(199.5)
    assert metrics["std_e2el_ms"] == pytest.approx(25)
    assert metrics["p50_ttft_ms"] == metrics["median_ttft_ms"]
    assert metrics["max_output_tokens_per_s"] == 4  # 4 token chunks, all within the first second
    assert metrics["max_concurrent_requests"] == 2


def test_peak_throughput_and_concurrency():
    # chunks at 0.5, 1.2, 1.4, 1.9 and 2.1 s: second 1 holds three
    outputs = [make_output(0.0, 0.5, [0.7, 0.2, 0.5], 1.9, 4), make_output(1.0, 1.1, [], 1.1, 1)]
    assert peak_output_throughput(outputs) == 3
    assert peak_concurrency(outputs) == 2
    back_to_back = [make_output(0.0, 0.5, [], 1.0, 1), make_output(1.0, 0.5, [], 1.0, 1)]
    assert peak_concurrency(back_to_back) == 1  # [0, 1) and [1, 2) never overlap
    assert peak_output_throughput([make_output(0, 0, [], 0, 0, error="x")]) == 0


def test_result_block_matches_vllm_layout():
    outputs = [make_output(0.0, 0.1, [0.02, 0.03], 0.15, 5), make_output(0.05, 0.2, [], 0.2, 1)]
    metrics = calculate_metrics(outputs, duration=1.0, percentiles=[50, 99, 99.9])
    metrics["completed"] = 1000
    block = format_result(metrics, selected_metrics=["ttft", "tpot", "itl"], percentiles=[99],
                          max_concurrency=64, request_rate=math.inf).split("\n")
    seed_pr = (ROOT.parent / "shared" / "reference" / "vllm-pr-23909-encoder-dp-internvl.txt")
    # Lines exactly as the seed pull request's blocks print them (labels padded to 40, values to 10).
    assert block[0] == "============ Serving Benchmark Result ============"
    assert "Successful requests:                     1000      " in block
    assert "Maximum request concurrency:             64        " in block
    assert "---------------Time to First Token----------------" in block
    assert "-----Time per Output Token (excl. 1st token)------" in block
    assert "---------------Inter-token Latency----------------" in block
    assert "P99 TTFT (ms):                           199.00    " in block
    assert block[-1] == "=" * 50
    if seed_pr.exists():  # the reference copy of the PR, where this checkout has it
        text = seed_pr.read_text()
        for line in ("Successful requests:                     1000      ",
                     "---------------Time to First Token----------------"):
            assert line in text
    order = [line.split(":")[0] for line in block if ":" in line]
    assert order[:12] == ["Successful requests", "Failed requests", "Maximum request concurrency",
                          "Benchmark duration (s)", "Total input tokens", "Total generated tokens",
                          "Request throughput (req/s)", "Output token throughput (tok/s)",
                          "Peak output token throughput (tok/s)", "Peak concurrent requests",
                          "Total token throughput (tok/s)", "Mean TTFT (ms)"]
    assert not any("E2EL" in line or "Request rate configured" in line for line in block)
    paced = format_result(metrics, selected_metrics=["e2el"], percentiles=[50, 99.9], max_concurrency=None,
                          request_rate=1.8)
    assert "Request rate configured (RPS):           1.80      " in paced.split("\n")
    assert "P99.9 E2EL (ms):" in paced and "Maximum request concurrency" not in paced and "TTFT" not in paced


# ---- load shape ----------------------------------------------------------------------------


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_arrival_gaps_have_the_requested_rate_and_burstiness(burstiness):
    gaps = sample_intervals(200_000, 4.0, burstiness, np.random.default_rng(0))
    assert np.mean(gaps) == pytest.approx(0.25, rel=0.01)  # mean rate 4 req/s
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1 / math.sqrt(burstiness), rel=0.02)


def test_arrival_offsets():
    offsets = arrival_offsets(50, 2.0, 1.0, np.random.default_rng(0))
    assert np.all(np.diff(offsets) >= 0) and offsets[-1] == pytest.approx(25.0)  # num / rate, as vLLM
    assert offsets[0] > 0
    assert np.all(arrival_offsets(10, math.inf, 1.0, np.random.default_rng(0)) == 0)
    assert np.allclose(np.diff(arrival_offsets(10, 5.0, math.inf, np.random.default_rng(0))), 0.2)
    for rate, burstiness in ((0.0, 1.0), (1.0, 0.0), (-1.0, 1.0)):
        with pytest.raises(ValueError):
            sample_intervals(3, rate, burstiness, np.random.default_rng(0))


# ---- stream parsing ------------------------------------------------------------------------


def test_sse_decoder_any_split():
    stream = ('data: {"a": 1}\r\n\r\n: keep-alive\r\n\r\ndata: {"text": "caf\u00e9 \u4e2d"}\n\n'
              'event: x\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n').encode()
    expected = ['{"a": 1}', '{"text": "caf\u00e9 \u4e2d"}', "line1\nline2", "[DONE]"]
    for size in (1, 2, 3, 7, len(stream)):
        decoder, events = SSEDecoder(), []
        for i in range(0, len(stream), size):
            events += decoder.feed(stream[i:i + size])
        assert events + decoder.close() == expected, size
    unterminated = SSEDecoder()
    assert unterminated.feed(b'data: {"usage": {}}') == [] and unterminated.close() == ['{"usage": {}}']


# ---- plots ---------------------------------------------------------------------------------


def fake_result(label, scale, rng, **extra):
    ttfts = list(rng.lognormal(np.log(scale), 0.8, 200))
    return {"label": label, "backend": "openai-chat", "dataset_name": "arena-like", "num_prompts": 200,
            "ttfts": ttfts, "errors": [""] * 200, "mean_ttft_ms": 1000 * float(np.mean(ttfts)), "completed": 200,
            "failed": 0, "duration": 20.0, "request_throughput": 10.0, "output_throughput": 1000.0,
            "max_output_tokens_per_s": 1500.0, "mean_tpot_ms": 30.0, "median_tpot_ms": 28.0, "p99_tpot_ms": 90.0,
            "mean_itl_ms": 80.0, "median_itl_ms": 40.0, "p99_itl_ms": 900.0} | extra


def assert_png(path: Path, size=(1650, 935)):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size


def test_plot_compares_results(tmp_path):
    rng = np.random.default_rng(0)
    vllm_style = {"label": "vllm (no samples)", "p50_ttft_ms": 900.0, "p90_ttft_ms": 3000.0, "p99_ttft_ms": 9000.0,
                  "mean_ttft_ms": 1500.0, "request_throughput": 7.4, "output_throughput": 785.0}
    path = plot_results([fake_result("encoder data", 2.0, rng), fake_result("encoder weights", 2.5, rng), vllm_style],
                        tmp_path / "sub" / "cmp.png")
    assert_png(path)
    files = []
    for i, scale in enumerate((1.0, 3.0)):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(fake_result(None, scale, rng)))
    assert bench_main.main(["plot", *map(str, files), "-o", str(tmp_path / "cli.png"), "--labels", "DP", "TP"]) == 0
    assert_png(tmp_path / "cli.png")


# ---- command line --------------------------------------------------------------------------


def test_dispatcher(capsys):
    assert bench_main.main(["--help"]) == 0 and "serve" in capsys.readouterr().out
    assert bench_main.main([]) == 2
    assert bench_main.main(["no_such_command"]) == 2 and "unknown command" in capsys.readouterr().err
    assert bench_main.main(["datasets", "arena-like", "--num", "300"]) == 0
    assert "| tiles | images | share | cumulative |" in capsys.readouterr().out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "bench", "serve", "--disable-tqdm", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"bench serve failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_failed_requests_are_counted_not_fatal(tmp_path):
    port = free_port()  # closed again at once: nothing listens there
    result = run_bench("--port", str(port), "--model", "absent", "--dataset-name", "random", "--num-prompts", "5",
                       "--random-input-len", "8", "--random-output-len", "4", "--save-result",
                       "--result-filename", str(tmp_path / "failed.json"), timeout=120)
    saved = json.loads((tmp_path / "failed.json").read_text())
    assert (saved["completed"], saved["failed"]) == (0, 5)
    assert all("ClientConnectorError" in error for error in saved["errors"])
    assert "Failed requests:                         5" in result.stdout


# ---- end to end against `python -m serve` --------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real server with its built-in demo model on a free loopback port."""
    directory = tmp_path_factory.mktemp("serve")
    port = free_port()
    log = open(directory / "serve.log", "w")  # noqa: SIM115 - open for the server's lifetime
    env = os.environ | {"INTERNVL_JAX_CACHE": str(directory / "cache"), "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen([sys.executable, "-m", "serve", "--port", str(port), "--max-model-len", "4096",
                                "--max-num-seqs", "8"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def log_tail() -> str:
        log.flush()
        return (directory / "serve.log").read_text()[-4000:]

    deadline = time.monotonic() + 600
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"python -m serve exited with {process.returncode}:\n{log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"python -m serve not healthy after 600 s:\n{log_tail()}")
            time.sleep(0.5)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def check_result(saved: dict, num: int, expected_input_floor: list[int]) -> None:
    assert (saved["completed"], saved["failed"]) == (num, 0), saved["errors"]
    assert saved["errors"] == [""] * num
    assert saved["output_tokens_from_usage"] == num  # the server sent usage with include_usage
    assert saved["total_input_tokens"] > 0 and saved["total_output_tokens"] > 0
    # ignore_eos is on for synthetic datasets: every request generates exactly its sampled length
    assert saved["output_lens"] == saved["expected_output_lens"]
    # the server's prompt_tokens count the image tokens (256 per tile) as well as the text
    assert all(n > floor for n, floor in zip(saved["input_lens"], expected_input_floor, strict=True))
    assert all(0 < ttft <= latency for ttft, latency in zip(saved["ttfts"], saved["latencies"], strict=True))
    for metric in saved["percentile_metrics"]:
        values = [saved[f"p{p}_{metric}_ms"] for p in ("50", "90", "99")]
        assert values == sorted(values) and values[0] == pytest.approx(saved[f"median_{metric}_ms"]), metric
        assert saved[f"mean_{metric}_ms"] > 0
    assert saved["mean_ttft_ms"] <= saved["mean_e2el_ms"]
    assert 1 <= saved["max_concurrent_requests"] <= num
    assert saved["client_cpu_s"] > 0  # the client's own CPU seconds over the run (does it bound the rate?)


def test_bench_serve_against_the_server(server, tmp_path):
    from internvl_jax.preprocess import TilingConfig, count_tiles
    from internvl_jax.presets import demo_config

    common = ["--port", str(server), "--ready-check-timeout-sec", "120", "--save-result", "--result-dir",
              str(tmp_path), "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99"]
    buckets = {(64, 64, 1): 0.5, (112, 112, 1): 0.5}  # one tile each: up to 3 images fit max-model-len 4096
    mm = run_bench(*common, "--dataset-name", "random-mm", "--num-prompts", "8", "--random-input-len", "24",
                   "--random-output-len", "6", "--random-range-ratio", "0.5", "--random-mm-base-items-per-request",
                   "2", "--random-mm-num-mm-items-range-ratio", "0.5", "--random-mm-bucket-config", str(buckets),
                   "--max-concurrency", "4", "--num-warmups", "2", "--seed", "1", "--label", "random-mm",
                   "--result-filename", "mm.json")
    assert "============ Serving Benchmark Result ============" in mm.stdout
    assert "Maximum request concurrency:             4" in mm.stdout
    mm_requests = datasets.random_mm_requests(8, input_len=24, output_len=6, range_ratio=0.5,
                                              base_items_per_request=2, num_mm_items_range_ratio=0.5,
                                              bucket_config=buckets, seed=1)
    check_result(json.loads((tmp_path / "mm.json").read_text()), 8,
                 [datasets.TILE_TOKENS * len(r.images) for r in mm_requests])

    plot = tmp_path / "plots" / "compare.png"
    arena = run_bench(*common, "--dataset-name", "arena-like", "--num-prompts", "8", "--arena-image-scale", "0.2",
                      "--arena-input-len", "20", "--arena-output-len", "8", "--request-rate", "20", "--seed", "2",
                      "--label", "arena-like", "--result-filename", "arena.json", "--plot", str(plot),
                      "--plot-compare", str(tmp_path / "mm.json"))
    assert "Request rate configured (RPS):           20.00" in arena.stdout
    tiling = TilingConfig(max_patches=demo_config().max_dynamic_patch)
    arena_requests = datasets.arena_like_requests(8, input_len=20, output_len=8, image_scale=0.2, seed=2)
    saved = json.loads((tmp_path / "arena.json").read_text())
    check_result(saved, 8, [datasets.TILE_TOKENS * count_tiles(r.images[0].width, r.images[0].height, tiling)
                            for r in arena_requests])
    assert saved["num_images"] == 8 and saved["model_id"]
    assert_png(plot)
    assert re.search(r"Saved the plot to .*compare\.png", arena.stdout)
