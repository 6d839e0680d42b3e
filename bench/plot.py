"""Charts comparing saved `python -m bench serve` results (e.g. encoder `data` vs `weights`).

    python -m bench plot dp.json tp.json -o docs/dp_vs_tp.png [--title ...] [--labels DP TP]

One PNG, five panels: the TTFT percentile curve (the seed pull request's "ttft_comparison" chart), TTFT
mean/P50/P90/P99 bars, TPOT and ITL mean/median/P99 bars, request throughput and output token throughput
(with vLLM's "peak output" beside it: stream chunks in the busiest second, which is tokens only when every
chunk carries one token; our server streams up to `--decode-steps` tokens per chunk). Percentiles come from
the per-request `ttfts` when the file has them (every `bench serve` result does); a vLLM result without them
falls back to its `pXX_ttft_ms` keys.
Matplotlib's object API with the Agg canvas: no pyplot state, no display needed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

CURVE_PERCENTILES = np.arange(1, 100)


def load_result(path: str | Path) -> dict[str, Any]:
    result = json.loads(Path(path).read_text())
    result.setdefault("label", None)
    result["label"] = result["label"] or Path(path).stem
    return result


def run_label(result: dict[str, Any]) -> str:
    if result.get("label"):
        return str(result["label"])
    concurrency = f" c{result['max_concurrency']}" if result.get("max_concurrency") else ""
    return f"{result.get('backend', '?')} {result.get('dataset_name', '')}{concurrency}".strip()


def successful_ttfts_ms(result: dict[str, Any]) -> np.ndarray | None:
    if "ttfts" not in result:
        return None
    errors = result.get("errors") or [""] * len(result["ttfts"])
    return np.asarray([t for t, error in zip(result["ttfts"], errors, strict=True) if not error], float) * 1000


def ttft_percentiles(result: dict[str, Any], percentiles: Sequence[float]) -> np.ndarray:
    """TTFT (ms) at `percentiles`; NaN where the result holds neither the samples nor that pXX key."""
    samples = successful_ttfts_ms(result)
    if samples is not None and samples.size:
        return np.percentile(samples, percentiles)
    words = [str(int(p)) if int(p) == p else str(p) for p in percentiles]
    return np.asarray([result.get(f"p{word}_ttft_ms", math.nan) for word in words], float)


def _curve(result: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    samples = successful_ttfts_ms(result)
    if samples is not None and samples.size:
        return CURVE_PERCENTILES, np.percentile(samples, CURVE_PERCENTILES)
    keyed = sorted((float(key[1:-len("_ttft_ms")]), value) for key, value in result.items()
                   if key.startswith("p") and key.endswith("_ttft_ms"))
    return np.asarray([p for p, _ in keyed]), np.asarray([v for _, v in keyed])


def _bars(ax, groups: list[str], series: dict[str, list[float]], colors, unit: str) -> None:
    """Grouped bars: one group per statistic, one bar per run, each bar labelled with its value."""
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, ((label, values), color) in enumerate(zip(series.items(), colors, strict=False)):
        heights = np.nan_to_num(np.asarray(values, float))
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=label, color=color)
        ax.bar_label(bars, labels=[_number(v) for v in values], fontsize=7, padding=1, rotation=90 if
                     len(series) * len(groups) > 12 else 0)
    ax.set_xticks(x, groups)
    ax.set_ylabel(unit)
    ax.margins(y=0.18)
    ax.grid(axis="y", alpha=0.3)


def _number(value: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def plot_results(results: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Draw the comparison PNG of `results` (result dicts as `bench serve` saves them) to `path`."""
    if not results:
        raise ValueError("plot_results: no results")
    labels = [run_label(result) for result in results]
    colors = [f"C{i % 10}" for i in range(len(results))]
    figure = Figure(figsize=(15, 8.5), layout="constrained")
    grid = figure.add_gridspec(2, 6)
    curve_ax = figure.add_subplot(grid[0, :4])
    ttft_ax = figure.add_subplot(grid[0, 4:])
    token_ax = figure.add_subplot(grid[1, :2])
    request_ax = figure.add_subplot(grid[1, 2:4])
    output_ax = figure.add_subplot(grid[1, 4:])

    for result, label, color in zip(results, labels, colors, strict=True):
        x, y = _curve(result)
        curve_ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label, color=color)
    for p in (50, 90, 99):
        curve_ax.axvline(p, color="grey", linestyle=":", linewidth=0.8)
        curve_ax.annotate(f"P{p}", (p, 0), xycoords=("data", "axes fraction"), xytext=(-3, 3),
                          textcoords="offset points", ha="right", va="bottom", fontsize=8, color="grey")
    curve_ax.set_xlabel("percentile of requests")
    curve_ax.set_ylabel("TTFT (ms)")
    curve_ax.set_title("Time to first token by percentile")
    curve_ax.set_xlim(0, 100)
    curve_ax.set_ylim(bottom=0)
    curve_ax.grid(alpha=0.3)
    curve_ax.legend(loc="upper left")

    ttft_series = {}
    for result, label in zip(results, labels, strict=True):
        p50, p90, p99 = ttft_percentiles(result, [50, 90, 99])
        ttft_series[label] = [result.get("mean_ttft_ms", math.nan), p50, p90, p99]
    _bars(ttft_ax, ["mean", "P50", "P90", "P99"], ttft_series, colors, "ms")
    ttft_ax.set_title("TTFT")

    token_series = {label: [result.get(key, math.nan) for key in ("mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
                                                                  "mean_itl_ms", "median_itl_ms", "p99_itl_ms")]
                    for result, label in zip(results, labels, strict=True)}
    _bars(token_ax, ["TPOT\nmean", "TPOT\nmedian", "TPOT\nP99", "ITL\nmean", "ITL\nmedian", "ITL\nP99"],
          token_series, colors, "ms")
    token_ax.set_title("Time per output token (excl. 1st) and inter-token latency")

    # One bar per run, its outcome under it: the reader sees at once when a faster run dropped requests.
    throughput = [result.get("request_throughput", math.nan) for result in results]
    bars = request_ax.bar(np.arange(len(results)), np.nan_to_num(throughput), 0.6, color=colors)
    request_ax.bar_label(bars, labels=[_number(v) for v in throughput], fontsize=8, padding=1)
    request_ax.set_xticks(np.arange(len(results)), [f"{label}\n{_outcome(result)}"
                                                    for result, label in zip(results, labels, strict=True)],
                          fontsize=8)
    request_ax.set_ylabel("req/s")
    request_ax.margins(y=0.15)
    request_ax.grid(axis="y", alpha=0.3)
    request_ax.set_title("Request throughput")
    output_series = {label: [result.get("output_throughput", math.nan), result.get("max_output_tokens_per_s", math.nan)]
                     for result, label in zip(results, labels, strict=True)}
    _bars(output_ax, ["output tokens/s", "peak chunks in 1 s"], output_series, colors, "per s")
    output_ax.set_title("Output token throughput")
    # The curve's legend names the colours for every panel.
    figure.suptitle(title or _default_title(results), fontsize=13)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def _outcome(result: dict[str, Any]) -> str:
    failed = f", {result['failed']} failed" if result.get("failed") else ""
    duration = f" in {result['duration']:.1f} s" if "duration" in result else ""
    return f"{result.get('completed', '?')} ok{failed}{duration}"


def _default_title(results: Sequence[dict[str, Any]]) -> str:
    """What the runs share: model, dataset, prompts, concurrency, rate."""
    parts = []
    for key, name in (("model_id", ""), ("dataset_name", ""), ("num_prompts", "prompts"),
                      ("max_concurrency", "max concurrency"), ("request_rate", "request rate")):
        values = {str(result.get(key)) for result in results}
        if len(values) == 1 and (value := values.pop()) not in ("None", ""):
            parts.append(f"{name} {value}" if key in ("max_concurrency", "request_rate") else f"{value} {name}".strip())
    return "Serving benchmark: " + (", ".join(parts) if parts else f"{len(results)} runs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="Result JSON files of `python -m bench serve --save-result`.")
    parser.add_argument("-o", "--output", required=True, help="PNG to write.")
    parser.add_argument("--title", default=None)
    parser.add_argument("--labels", nargs="+", default=None, help="One name per result (default: their labels).")
    args = parser.parse_args(argv)
    results = [load_result(path) for path in args.results]
    if args.labels:
        if len(args.labels) != len(results):
            parser.error(f"--labels: {len(args.labels)} names for {len(results)} results")
        for result, label in zip(results, args.labels, strict=True):
            result["label"] = label
    print(f"Saved the plot to {plot_results(results, args.output, args.title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
