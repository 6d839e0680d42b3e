"""`python -m bench e2e` (CPU): the orchestrator against real `python -m serve` processes (the built-in demo
model; `-tp 2` on the fake CPU devices of tests/conftest.py), on loopback ports. Checks the files it leaves
(what the device tool can bring back), their numbers, the servers it stopped, a config that cannot start,
the time limit, SIGTERM, and merging tarballs."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from bench import e2e

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Small buckets (the demo server compiles all of them at start) and at most 2 x 1 tiles + thumbnail per image,
# so that an arena-like image (up to 768 tokens) plus its text fits --max-model-len 1024.
SERVER_ARGS = "--max-model-len 1024 --max-num-seqs 4 --max-prefill-batch 2 " \
              "--mm-processor-kwargs '{\"max_dynamic_patch\": 2}'"
CONFIGS = ["single", "broken:--no-such-flag", "tp2-data:-tp 2 --mm-encoder-tp-mode data"]
WORKLOADS = ["arena-c8", "randommm-3img"]


def bench_e2e(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", "e2e", "--preset", "demo", "--quick",
                           "--server-args", SERVER_ARGS, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def process_gone(pid: int) -> bool:
    """The orchestrator waits for its servers, so a stopped one is reaped, not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def assert_returned_files(result_dir: Path, expected: set[str]) -> None:
    """What the device tool brings back: at most 8 plain files of 16 MiB, nothing deeper."""
    files = {path.name for path in result_dir.iterdir()}
    assert files == expected
    assert all((result_dir / name).is_file() and (result_dir / name).stat().st_size < 16 << 20 for name in files)


@pytest.fixture(scope="module")
def plan_run(tmp_path_factory):
    """One orchestrated plan: two configs that serve, one that cannot start, two workloads."""
    base = tmp_path_factory.mktemp("e2e")
    started = time.monotonic()
    run = bench_e2e("--configs", *CONFIGS, "--workloads", *WORKLOADS, "--result-dir", str(base / "out"),
                    "--work-dir", str(base / "work"))
    return run, base, time.monotonic() - started


def test_plan_writes_summary_plots_and_tarball(plan_run):
    run, base, seconds = plan_run
    out = base / "out"
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]  # 1: the broken config's runs failed
    assert_returned_files(out, {"e2e-summary.json", "e2e-summary.md", "e2e-demo.png", "e2e-raw.tar.gz"})
    summary = json.loads((out / "e2e-summary.json").read_text())
    assert summary["plan"]["presets"] == ["demo"] and summary["plan"]["quick"] is True
    assert list(summary["plan"]["configs"]) == ["single", "broken", "tp2-data"]
    assert summary["plan"]["workloads"] == WORKLOADS
    assert "bench e2e --preset demo --quick" in summary["meta"]["command"]

    runs = {(r["config"], r["workload"]): r for r in summary["runs"]}
    assert set(runs) == {(c, w) for c in ("single", "broken", "tp2-data") for w in WORKLOADS}
    for config in ("single", "tp2-data"):
        for workload, images in (("arena-c8", 8), ("randommm-3img", 24)):
            record = runs[config, workload]
            assert record["status"] == "ok", record
            result, server = record["result"], record["server"]
            assert (result["completed"], result["failed"]) == (8, 0)
            assert result["request_throughput"] > 0 and result["output_throughput"] > 0
            assert 0 < result["median_ttft_ms"] <= result["p99_ttft_ms"]
            assert result["mean_ttft_ms"] > 0 and result["mean_tpot_ms"] > 0
            assert result["num_images"] == images
            # from the server's /metrics over the run: every image looked up once, none found (all differ),
            # 1 to 3 tiles each at max_dynamic_patch 2, and no recompile
            assert (server["mm_cache_queries"], server["mm_cache_hits"]) == (images, 0)
            assert images <= server["tiles_encoded"] <= 3 * images
            assert server["prompt_tokens"] >= 256 * server["tiles_encoded"]
            # padding to the buckets: the encoder's rows and the prefill's positions are at least the real ones
            assert server["tiles_encoded"] <= server["tiles_computed"] < 4 * server["tiles_encoded"]
            assert server["prompt_tokens"] < server["prefill_computed"]
            assert server["generation_tokens"] == result["total_output_tokens"]
            assert server["prompt_tokens"] == result["total_input_tokens"]  # the client's count is the usage
            assert server["recompiles"] == 0 and server["recompiles_total"] == 0
            assert record["wall_s"] >= result["duration"]
    # randommm-3img quick: 128 px images, one tile each
    assert runs["single", "randommm-3img"]["server"]["tiles_encoded"] == 24
    for workload in WORKLOADS:
        assert runs["broken", workload]["status"] == "failed"
        assert runs["broken", workload]["error"] == "server did not come up"

    servers = {s["config"]: s for s in summary["servers"]}
    for config in ("single", "tp2-data"):
        server = servers[config]
        assert server["status"] == "ok" and 0 < server["startup_s"] < seconds
        assert 0 < server["compile_s"] < server["startup_s"]
        assert (server["stopped_by"], server["exit_code"]) == ("SIGTERM", 0)
        assert process_gone(server["pid"])
        assert "serve: stopped" in (base / "work" / server["log"]).read_text()
    assert servers["single"]["command"].startswith("python -m serve --max-model-len 1024")
    assert "-tp 2 --mm-encoder-tp-mode data" in servers["tp2-data"]["command"]
    broken = servers["broken"]
    assert broken["status"] == "failed" and broken["exit_code"] == 2 and process_gone(broken["pid"])
    assert "exited with code 2 before /health" in broken["error"] and "--no-such-flag" in broken["error"]

    markdown = (out / "e2e-summary.md").read_text()
    assert markdown == e2e.markdown(summary)
    assert "| demo | arena-c8 | single | ok |" in markdown and "| demo | arena-c8 | tp2-data | ok |" in markdown
    assert "| demo | randommm-3img | broken | failed |" in markdown
    assert "RECOMPILES" not in markdown
    assert "| demo | tp2-data | `-tp 2 --mm-encoder-tp-mode data` |" in markdown
    assert markdown in run.stdout  # printed as well

    png = (out / "e2e-demo.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 50_000  # two workloads' charts stacked

    with tarfile.open(out / "e2e-raw.tar.gz") as tar:
        names = set(tar.getnames())
        for config in ("single", "tp2-data"):
            for workload in WORKLOADS:
                assert f"e2e-raw/runs/demo/{config}-{workload}.json" in names
                assert f"e2e-raw/logs/demo/{config}-{workload}-client.log" in names
                saved = json.load(tar.extractfile(f"e2e-raw/runs/demo/{config}-{workload}.json"))
                assert saved["label"] == config and len(saved["ttfts"]) == 8 and saved["errors"] == [""] * 8
            assert f"e2e-raw/logs/demo/{config}-server.log" in names
        assert "e2e-raw/logs/demo/broken-server.log" in names
        assert {f"e2e-raw/plots/demo-{workload}.png" for workload in WORKLOADS} <= names
        assert json.load(tar.extractfile("e2e-raw/e2e-summary.json")) == summary


def test_engine_thread_shares_are_per_engine(plan_run):
    """With engine processes the engine_* seconds add up every replica's (`internvl:engines` says how many): the
    summary's shares are per engine thread, so two replicas each doing what one did read the same."""
    _, base, _ = plan_run
    summary = json.loads((base / "out" / "e2e-summary.json").read_text())
    run = next(r for r in summary["runs"] if (r.get("server") or {}).get("ttft_ms") is not None)
    summary["runs"] = [run]
    assert run["server"]["engines"] == 1  # read from the server's gauge

    def shares() -> str:  # the first-token table's row
        text = e2e.markdown(summary)
        return text[text.index("## Where the first token's time goes"):text.index("The engine thread's seconds per")]

    one = shares()
    assert re.search(r"\| \d+% \| \d+% \| \d+% \|", one)  # the shares are there
    # then the cores: the whole server's, its API process's, the client's (each CPU seconds per second of the run)
    duration, result = run["result"]["duration"], run["result"]
    api, client = run["server"]["process_cpu_s"] / duration, result["client_cpu_s"] / duration
    assert result["client_cpu_s"] > 0
    assert re.search(rf"\| \d+\.\d\d \| {api:.2f} \| {client:.2f} \|\n", one)
    for key in ("engine_step_s", "engine_wait_s", "engine_cpu_s"):
        run["server"][key] *= 2
    assert shares() != one  # twice the seconds on one engine: larger shares
    run["server"]["engines"] = 2
    assert shares() == one


def test_collect_merges_tarballs(plan_run, tmp_path):
    _, base, _ = plan_run
    # A second call that ran one more workload on one config: the merge keeps both calls' runs.
    first = json.loads((base / "out" / "e2e-summary.json").read_text())
    second = base / "second"
    work = tmp_path / "work"
    (work / "runs" / "demo").mkdir(parents=True)
    extra = json.loads((base / "work" / "runs" / "demo" / "single-arena-c8.json").read_text())
    (work / "runs" / "demo" / "single-extra.json").write_text(json.dumps(extra))
    run = dict(first["runs"][0], workload="extra", result_file="runs/demo/single-extra.json")
    summary = dict(first, runs=[run], plan=dict(first["plan"], workloads=["extra"], configs={"single": ""}))
    e2e.write_outputs(summary, work, second, plots=False)

    merged_dir = tmp_path / "merged"
    assert e2e.main(["--collect", str(base / "out" / "e2e-raw.tar.gz"), str(second / "e2e-raw.tar.gz"),
                     "--result-dir", str(merged_dir)]) == 1  # the broken config's runs still failed
    assert_returned_files(merged_dir, {"e2e-summary.json", "e2e-summary.md", "e2e-demo.png", "e2e-raw.tar.gz"})
    merged = json.loads((merged_dir / "e2e-summary.json").read_text())
    assert merged["plan"]["workloads"] == [*WORKLOADS, "extra"]
    assert len(merged["runs"]) == len(first["runs"]) + 1 and len(merged["sources"]) == 2
    assert "| demo | extra | single | ok |" in (merged_dir / "e2e-summary.md").read_text()
    with tarfile.open(merged_dir / "e2e-raw.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"e2e-raw/runs/demo/single-extra.json", "e2e-raw/runs/demo/tp2-data-arena-c8.json",
            "e2e-raw/plots/demo-extra.png"} <= names


def test_time_limit_stops_the_run_and_the_server(plan_run, tmp_path):
    # 64 arrivals at 2 req/s take 32 s: the 35 s limit ends the plan during that run (the server itself
    # starts in ~10 s: its buckets are in the compilation cache since plan_run).
    slow = "slow:--dataset-name random --num-prompts 64 --request-rate 2 --random-input-len 8 --random-output-len 4"
    run = bench_e2e("--configs", "single", "--workloads", slow, "arena-c8", "--time-limit", "35",
                    "--result-dir", str(tmp_path / "out"))
    assert run.returncode == 1
    summary = json.loads((tmp_path / "out" / "e2e-summary.json").read_text())
    statuses = {r["workload"]: r["status"] for r in summary["runs"]}
    assert statuses == {"slow": "timed out", "arena-c8": "skipped"}, run.stdout[-3000:]
    server = summary["servers"][0]
    assert (server["status"], server["stopped_by"], server["exit_code"]) == ("ok", "SIGTERM", 0)
    assert process_gone(server["pid"])
    assert_returned_files(tmp_path / "out", {"e2e-summary.json", "e2e-summary.md", "e2e-raw.tar.gz"})


def test_sigterm_stops_the_server_and_writes_what_it_has(plan_run, tmp_path):
    work = tmp_path / "work"
    process = subprocess.Popen([sys.executable, "-m", "bench", "e2e", "--preset", "demo", "--quick", "--configs",
                                "single", "--workloads", "arena-c8", "--server-args", SERVER_ARGS, "--result-dir",
                                str(tmp_path / "out"), "--work-dir", str(work)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = work / "logs" / "demo" / "single-server.log"
    deadline = time.monotonic() + 60
    while not (log.is_file() and log.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log.is_file(), "the server never started"
    process.send_signal(signal.SIGTERM)  # while the server starts
    assert process.wait(60) == 1
    summary = json.loads((tmp_path / "out" / "e2e-summary.json").read_text())
    assert summary["interrupted"] is True
    assert [r["status"] for r in summary["runs"]] == ["interrupted"]
    server = summary["servers"][0]
    assert (server["status"], server["stopped_by"]) == ("interrupted", "SIGTERM")
    assert process_gone(server["pid"])


def test_plan_names_and_flags():
    assert e2e.parse_named(["tp2-data", "mine:-tp 2 --x 'a b'"], e2e.CONFIGS, "config") == \
        {"tp2-data": None, "mine": "-tp 2 --x 'a b'"}
    for bad in (["nope"], ["a/b:-tp 2"], ["dp2", "dp2"]):
        with pytest.raises(ValueError):
            e2e.parse_named(bad, e2e.CONFIGS, "config")
    flags = e2e.client_flags("randommm-3img", None, quick=False, client_args="--num-prompts 7")
    assert flags[-2:] == ["--num-prompts", "7"]  # --client-args come last: they win
    assert flags[flags.index("--random-mm-bucket-config") + 1] == "{(512, 512, 1): 1.0}"
    quick = e2e.client_flags("arena-c64", None, quick=True, client_args="")
    assert quick[-2:] == ["--num-prompts", "16"] and "--arena-image-scale" in quick
    custom = e2e.client_flags("mine", "--dataset-name random --random-output-len 3", quick=True, client_args="")
    assert custom[-4:] == ["--dataset-name", "random", "--random-output-len", "3"]  # after --quick's own
    assert e2e.model_flags("demo") == [] and e2e.model_flags("InternVL3-8B") == \
        ["--model", "InternVL3-8B", "--load-format", "dummy"]
    assert [s.split(":")[0] for s in e2e.PLANS[4]] == ["tp4-weights", "tp4-data", "dp4", "dp4-mesh"]
    text = ('# HELP x\ninternvl:recompiles_total{model_name="m"} 2.0\ninternvl:mm_cache_hits_total{model_name="a"} 1\n'
            'internvl:mm_cache_hits_total{model_name="b"} 3\ninternvl:image_tiles_encoded_total 5.0\n')
    counters = e2e.parse_counters(text)
    assert (counters["recompiles"], counters["mm_cache_hits"], counters["tiles_encoded"]) == (2, 4, 5)
    assert counters["prompt_tokens"] == 0
    # Phase histograms: a run's mean is (sum, count) after minus before; absent or unobserved -> None.
    later = e2e.parse_counters(text + 'internvl:request_queue_time_seconds_sum{model_name="m"} 0.5\n'
                               'internvl:request_queue_time_seconds_count{model_name="m"} 4.0\n'
                               'internvl:request_queue_time_seconds_bucket{model_name="m",le="0.1"} 4.0\n'
                               'internvl:engine_step_seconds_total{model_name="m"} 2.25\n'
                               'internvl:engine_phase_seconds_total{model_name="m",phase="encode"} 0.5\n'
                               'internvl:engine_phase_seconds_total{model_name="m",phase="process"} 1.5\n'
                               'process_cpu_seconds_total 7.0\n'
                               'internvl:image_worker_cpu_seconds_total{model_name="m"} 1.5\n')
    delta = e2e.counter_delta(counters, later)
    assert delta["worker_cpu_s"] == 1.5
    assert delta["queue_ms"] == 125.0 and delta["prefill_ms"] is None and delta["mm_cache_hits"] == 0
    assert (delta["engine_step_s"], delta["engine_wait_s"], delta["process_cpu_s"]) == (2.25, 0, 7)
    # A labelled series counts only under its own label value.
    assert (delta["engine_encode_s"], delta["engine_process_s"], delta["engine_decode_s"]) == (0.5, 1.5, 0)
    from internvl_jax.engine import STEP_PHASES
    assert e2e.ENGINE_PHASES == STEP_PHASES  # the client's copy of the engine's phase names


def test_every_catalog_workload_is_a_valid_bench_serve_command():
    """The catalog's flags (full and --quick) parse with `bench serve`'s own parser; the TTFT workload's
    image is the 7-tile shape issue 6 names."""
    from bench import serve
    from bench.datasets import count_tiles, get_samples

    for name, workload in e2e.WORKLOADS.items():
        for extra in ("", f"{e2e.QUICK_ARGS} {workload.quick}"):
            argv = shlex.split(f"{e2e.CLIENT_DEFAULTS} {workload.args} {extra}") + ["--base-url", "http://127.0.0.1:1"]
            args = serve.parse_args(argv)
            assert args.num_prompts >= 1, name
    args = serve.parse_args(shlex.split(e2e.WORKLOADS["ttft-7tile"].args.replace("--num-prompts 64", "--num-prompts 2"))
                            + ["--base-url", "http://127.0.0.1:1"])
    samples = get_samples(args)
    assert [len(sample.images) for sample in samples] == [1, 1]
    assert all(count_tiles(image.width, image.height) == 7 for sample in samples for image in sample.images)
    assert args.max_concurrency == 1 and args.random_output_len == 1
