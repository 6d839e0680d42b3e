"""Vision encoder + projector throughput: tiles/s and MFU vs tile batch, encoder `data` vs `weights` mode
on 1, 2 and 4 GPUs, against transformers' PyTorch InternVL on the same card in the same run.

    python -m bench encoder [--preset InternVL3-1B] [--devices 1,2,4] [--modes data,weights]
                            [--batches 1,2,4,...,128] [--kernels server|xla|pallas|all] [--baseline torch|none]
                            [--out encoder.json] [--plot encoder.png]

What is timed: `Runner.encode`'s jitted function (the one the server calls), on pixels already on the
device (`ms/call`), and the whole `Runner.encode` from float32 host pixels (`w/ copy`: host bf16 cast +
host->device copy + the same jit). Dummy (random) weights at the preset's shapes, bf16. Each tile batch
is padded as the engine pads it (data mode: to a multiple of the devices); tiles/s counts real tiles.
The mesh is (1, N): `data` mode splits tiles over the N devices, `weights` mode splits heads and MLP.
--kernels picks the vision layers' LayerNorm and GELU: the server's choice (measured as its warm-up measures it),
XLA's fusions, the Pallas kernels (`internvl_jax.kernels`), or each usable choice at every tile batch in turn (then
each row also says how far its features are from the first choice's).

Baseline: `InternVLForConditionalGeneration` (random weights, bf16, sdpa) built from the same HF config,
`model.model.get_image_features` on cuda:0 under `torch.inference_mode()`, in a child process run before
JAX starts (see bench/common.py). FLOP formula and columns: docs/BENCH_GPU.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from internvl_jax import sharding, weights
from internvl_jax.runner import VISION_GELUS, Runner

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
QUICK_BATCHES = (1, 8, 32)
MODULE = "bench.encoder"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench encoder", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="InternVL3-1B", choices=common.preset_choices(),
                        help="model shapes ('demo' = the tiny CPU model)")
    parser.add_argument("--batches", default=None, help=f"tile batches (default {','.join(map(str, DEFAULT_BATCHES))})")
    parser.add_argument("--devices", default="1,2,4", help="device counts; each > available is skipped")
    parser.add_argument("--modes", default="data,weights", help="encoder modes (mm_encoder_tp_mode)")
    parser.add_argument("--kernels", default="server", choices=("server", "xla", "pallas", "all"),
                        help="vision LayerNorm and GELU kernels: the server's measured choice, one, or each in turn")
    parser.add_argument("--mm-encoder-gelu", default="exact", choices=VISION_GELUS,
                        help="the vision MLP's GELU, as the server's flag: exact, or tanh (inside fc1's GEMM)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(weights.DTYPES))
    parser.add_argument("--baseline", default="torch", choices=("torch", "none"))
    parser.add_argument("--torch-device", default=None, help="baseline device (default cuda if present, else cpu)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per point (median; default 10)")
    parser.add_argument("--target-ms", type=float, default=50.0, help="length of one timed repeat (chained calls)")
    parser.add_argument("--no-copy", action="store_true", help="skip the timing with the host->device copy")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 per device (default: card)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=f"batches {','.join(map(str, QUICK_BATCHES))}, 5 repeats")
    parser.add_argument("--out", default="encoder.json", help="JSON result (rewritten after every point)")
    parser.add_argument("--plot", default=None, help="PNG: tiles/s and MFU vs tile batch")
    args = parser.parse_args(argv)
    args.batches = common.parse_ints(args.batches) if args.batches else list(
        QUICK_BATCHES if args.quick else DEFAULT_BATCHES)
    args.devices = common.parse_ints(args.devices)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in args.modes:
        if mode not in sharding.ENCODER_MODES:
            parser.error(f"--modes: {mode!r} is not one of {list(sharding.ENCODER_MODES)}")
    args.repeats = args.repeats or (5 if args.quick else 10)
    return args


# ---- the PyTorch baseline (child process) ------------------------------------------------------------


def torch_encoder(spec: dict[str, Any]) -> dict[str, Any]:
    """Times `get_image_features` (vision tower + pixel shuffle + projector) per tile batch."""
    torch, device, sync = common.torch_setup(spec)
    hf = spec["hf_config"]
    model = common.torch_model(hf, device, spec["dtype"])
    size = hf["vision_config"]["image_size"]
    size = size[0] if isinstance(size, list) else size
    dtype = getattr(torch, spec["dtype"])
    flops = spec["flops_per_tile"]
    results = []
    bar = common.progress(len(spec["batches"]), "pytorch encoder")
    with torch.inference_mode():
        for tiles in spec["batches"]:
            bar.set_postfix(tiles=tiles)
            generator = torch.Generator().manual_seed(spec["seed"] + tiles)
            pixels = torch.randn((tiles, 3, size, size), generator=generator).to(device=device, dtype=dtype)

            def call(pixels=pixels):
                return model.model.get_image_features(
                    pixel_values=pixels, vision_feature_layer=hf["vision_feature_layer"],
                    vision_feature_select_strategy=hf["vision_feature_select_strategy"])
            try:
                timing = common.time_calls(call, sync, repeats=spec["repeats"], target_s=spec["target_s"])
                latency = common.time_single(call, sync, spec["repeats"])
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                results.append({"tiles": tiles, "skipped": "out of memory"})
                bar.update()
                continue
            tiles_per_s = tiles / timing.seconds
            results.append({"tiles": tiles, "ms_per_call": timing.seconds * 1e3, "latency_ms": latency * 1e3,
                            "tiles_per_s": tiles_per_s, "tflops": flops * tiles_per_s / 1e12,
                            "first_call_s": timing.first_call_s, "timing_ms": timing.summary()})
            bar.update()
    bar.close()
    return {**common.torch_info(device), "results": results}


# ---- JAX ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    mode: str  # requested
    resolved: str  # what runs (weights falls back to data when the heads do not divide)
    devices: int


def sweep_setups(config, args) -> tuple[list[Setup], list[str]]:
    available = jax.device_count()
    setups, notes = [], []
    for count in args.devices:
        if count > available:
            notes.append(f"{count} devices: skipped, {available} available")
            continue
        for mode in args.modes:
            if count == 1 and any(s.devices == 1 for s in setups):
                # One device: both tables replicate every weight, so both modes are the same program.
                notes.append(f"1 device: mode {mode!r} is the same program as {setups[-1].mode!r}; measured once")
                continue
            resolved = sharding.resolve_encoder_mode(config, mode, count)
            if resolved != mode:
                notes.append(f"{count} devices: mode {mode!r} runs as {resolved!r} (heads do not divide)")
            setups.append(Setup(mode, resolved, count))
    return setups, notes


def build_runner(config, setup: Setup, args) -> tuple[Runner, dict[int, int], float]:
    """Dummy weights and a runner on a (1, N) mesh, placed for the setup's encoder mode; the padded tile
    count of every batch (data mode pads to a multiple of the devices, as the engine's tile buckets do)."""
    mesh = sharding.make_mesh(1, setup.devices)
    start = time.perf_counter()
    model = weights.dummy_model(config, weights.DTYPES[args.dtype],
                                lambda s: sharding.param_shardings(s, mesh, setup.resolved), seed=args.seed)
    padded = {tiles: sharding.padded_tiles(tiles, mesh, setup.resolved) for tiles in args.batches}
    runner = Runner(model, mesh, setup.resolved, num_slots=1, max_model_len=128, pool_tiles=max(padded.values()),
                    vision_gelu=args.mm_encoder_gelu)
    jax.block_until_ready(runner.encoder_leaves)
    return runner, padded, time.perf_counter() - start


def kernels_to_time(runner: Runner, wanted: str) -> list[str]:
    """The encoder kernels to measure for --kernels: the ones the server's warm-up would choose, every usable
    choice ('all'), or the one asked for."""
    candidates = runner.encoder_kernel_candidates()
    if wanted == "server":
        timings = runner.time_encoder_kernels(candidates) if len(candidates) > 1 else {candidates[0]: 0.0}
        return [min(timings, key=timings.get)]
    return common.kernels_to_time("kernels", candidates, "best" if wanted == "all" else wanted)


def measure_batch(runner: Runner, setup: Setup, tiles: int, padded_tiles: int, args, flops: float,
                  peak_tflops: float) -> dict[str, Any]:
    size = runner.config.vision.image_size
    rng = np.random.default_rng(args.seed + tiles)
    # uint8 levels: the server ships raw tiles and normalises them on the device (Runner.encode).
    pixels = rng.integers(0, 256, (padded_tiles, 3, size, size), dtype=np.uint8)
    rows = np.full(padded_tiles, runner.pool_tiles, np.int32)  # padding rows: out of range, dropped
    rows[:tiles] = np.arange(tiles)
    # The server's jitted encode on device-resident pixels (Runner.encode = host cast + copy + this), with
    # the inputs placed exactly as Runner.encode places them, so both paths share one executable.
    encode = runner._encode_jit
    pixels_device = jax.device_put(pixels, runner.tile_sharding)
    rows_device = jnp.asarray(rows, jnp.int32)

    def call():
        runner.pool = encode(runner.encoder_leaves, runner.pool, pixels_device, rows_device, runner.encoder_kernels)
        return runner.pool

    timing = common.time_calls(call, jax.block_until_ready, repeats=args.repeats, target_s=args.target_ms / 1e3)
    latency = common.time_single(call, jax.block_until_ready, args.repeats)
    tiles_per_s = tiles / timing.seconds
    row = {
        "mode": setup.mode, "resolved_mode": setup.resolved, "devices": setup.devices,
        # the GELU the tower ran: "tanh" only where the option applied (an exact-GELU tower)
        "kernels": runner.encoder_kernels, "gelu": "tanh" if runner.tanh_vision_gelu else "exact",
        "tiles": tiles,
        "padded_tiles": padded_tiles, "ms_per_call": timing.seconds * 1e3, "latency_ms": latency * 1e3,
        "tiles_per_s": tiles_per_s, "tflops": flops * tiles_per_s / 1e12,
        "mfu": flops * tiles_per_s / (peak_tflops * 1e12 * setup.devices),
        "frac_of_measured_peak": flops * tiles_per_s / (common.MEASURED_TFLOPS * 1e12 * setup.devices),
        "first_call_s": timing.first_call_s, "timing_ms": timing.summary(),
    }
    if not args.no_copy:
        def call_with_copy():
            runner.encode(pixels, rows)
            return runner.pool

        copied = common.time_calls(call_with_copy, jax.block_until_ready, repeats=max(3, args.repeats // 3),
                                   target_s=args.target_ms / 1e3, max_calls=4)
        row.update(ms_per_call_with_copy=copied.seconds * 1e3, tiles_per_s_with_copy=tiles / copied.seconds)
    return row


# ---- report ------------------------------------------------------------------------------------------


def baseline_by_tiles(result: dict[str, Any]) -> dict[int, dict[str, Any]]:
    baseline = result.get("baseline") or {}
    return {r["tiles"]: r for r in baseline.get("results", []) if "tiles_per_s" in r}


def add_ratios(result: dict[str, Any]) -> None:
    """Per row, at the same tile batch: tiles/s over one device, over `weights` mode on the same devices (for
    `data` rows), and over PyTorch (issue 6's targets are these ratios)."""
    by_key = {(r["mode"], r["devices"], r["kernels"], r["tiles"]): r["tiles_per_s"] for r in result["results"]}
    single = {(r["kernels"], r["tiles"]): r["tiles_per_s"] for r in result["results"] if r["devices"] == 1}
    torch_rows = baseline_by_tiles(result)
    for base in torch_rows.values():
        base["mfu"] = base["tflops"] / result["peak_tflops"]
    for r in result["results"]:
        weights_mode = by_key.get(("weights", r["devices"], r["kernels"], r["tiles"])) if r["mode"] == "data" else None
        base = torch_rows.get(r["tiles"])
        one_device = single.get((r["kernels"], r["tiles"]))
        r["speedup_vs_1_device"] = r["tiles_per_s"] / one_device if one_device else None
        r["speedup_vs_weights_mode"] = r["tiles_per_s"] / weights_mode if weights_mode else None
        r["speedup_vs_torch"] = r["tiles_per_s"] / base["tiles_per_s"] if base else None


def table(result: dict[str, Any]) -> str:
    torch_rows = baseline_by_tiles(result)
    rows = []
    for r in result["results"]:
        base = torch_rows.get(r["tiles"])
        kernels = r["kernels"] + ("+tanh" if r.get("gelu") == "tanh" else "")
        rows.append([r["mode"], r["devices"], kernels, r["tiles"], r["padded_tiles"], r["ms_per_call"],
                     r["latency_ms"],
                     r["tiles_per_s"], r.get("tiles_per_s_with_copy"), r["mfu"], r["frac_of_measured_peak"],
                     r.get("speedup_vs_1_device"), r.get("speedup_vs_weights_mode"),
                     base["tiles_per_s"] if base else None, r.get("speedup_vs_torch")])
    headers = ["mode", "devs", "kernels", "tiles", "padded", "ms/call", "lat ms", "tiles/s", "w/ copy", "MFU", "of 790",
               "x 1 dev", "x weights", "torch t/s", "x torch"]
    lines = [common.format_table(headers, rows)]
    if torch_rows:
        lines += ["", "PyTorch baseline (" + result["baseline"]["device"] + "):",
                  common.format_table(["tiles", "ms/call", "lat ms", "tiles/s", "MFU"],
                                      [[t, r["ms_per_call"], r["latency_ms"], r["tiles_per_s"], r["mfu"]]
                                       for t, r in sorted(torch_rows.items())])]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 5), layout="constrained")
    speed, mfu = figure.subplots(1, 2)
    setups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in result["results"]:
        setups.setdefault((r["mode"], r["devices"], r["kernels"]), []).append(r)
    several = len({impl for _, _, impl in setups}) > 1
    for (mode, devices, impl), rows in setups.items():
        label = f"JAX {mode} x{devices}" + (f", {impl} LayerNorm/GELU" if several else "")
        line = speed.plot([r["tiles"] for r in rows], [r["tiles_per_s"] for r in rows], marker="o", label=label)[0]
        mfu.plot([r["tiles"] for r in rows], [r["mfu"] for r in rows], marker="o", color=line.get_color(),
                 label=label)
    torch_rows = sorted(baseline_by_tiles(result).items())
    if torch_rows:
        tiles = [t for t, _ in torch_rows]
        speed.plot(tiles, [r["tiles_per_s"] for _, r in torch_rows], "k--s", label="PyTorch sdpa x1")
        mfu.plot(tiles, [r["mfu"] for _, r in torch_rows], "k--s", label="PyTorch sdpa x1")
    all_tiles = [r["tiles"] for r in result["results"]] + [t for t, _ in torch_rows]
    left = min(all_tiles, default=1)
    floor = result["floor_tiles_per_s_per_device"]
    for devices in sorted({devices for _, devices, _ in setups}):
        speed.axhline(floor * devices, linestyle=":", color="gray")
        speed.annotate(f"floor x{devices} (790 TFLOP/s)", (left, floor * devices), fontsize=8, color="gray",
                       va="bottom")
    ceiling = common.MEASURED_TFLOPS / result["peak_tflops"]
    mfu.axhline(ceiling, linestyle=":", color="gray")
    mfu.annotate("790 TFLOP/s measured ceiling", (left, ceiling), fontsize=8, color="gray", va="bottom")
    for axis, label in ((speed, "tiles / s"), (mfu, f"MFU (of {result['peak_tflops']:g} TFLOP/s per device)")):
        common.log2_axis(axis, all_tiles)
        axis.set_xlabel("tiles per encoder call")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    speed.set_yscale("log")
    meta = result["meta"]
    figure.suptitle(f"{result['config']['preset']} vision encoder + projector, {meta.get('device_kind')}, "
                    f"{meta['date'][:10]}", fontsize=11)
    common.save_figure(figure, path)


# ---- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == common.TORCH_WORKER_FLAG:
        return common.torch_worker_main(argv, torch_encoder)
    args = parse_args(argv)
    started = time.perf_counter()
    config, hf = common.load_config(args.preset)
    flops = common.encoder_flops_per_tile(config)
    result: dict[str, Any] = {
        "benchmark": "encoder", "complete": False, "meta": common.run_metadata(argv, "bench encoder"),
        "config": {"preset": args.preset, "dtype": args.dtype, "vision": dataclasses.asdict(config.vision),
                   "text_hidden_size": config.text.hidden_size, "tokens_per_tile": config.tokens_per_tile,
                   "flops_per_tile": flops},
        "results": [], "notes": [],
    }
    # The baseline runs first: JAX reserves most of the GPU memory once it starts.
    if args.baseline == "torch":
        spec = {"hf_config": hf, "batches": args.batches, "dtype": args.dtype, "seed": args.seed,
                "repeats": args.repeats, "target_s": args.target_ms / 1e3, "device": args.torch_device,
                "flops_per_tile": flops["total"]}
        result["baseline"] = common.run_torch_worker(MODULE, spec)
        if "error" in result["baseline"]:
            print(f"WARNING: PyTorch baseline failed: {result['baseline']['error']}", file=sys.stderr)
    else:
        result["baseline"] = {"kind": "none"}
    result["meta"].update(common.jax_device_info())
    card = common.device_spec(result["meta"]["device_kind"])
    peak = args.peak_tflops or card.peak_tflops
    result.update(peak_tflops=peak, measured_peak_tflops=common.MEASURED_TFLOPS, card=dataclasses.asdict(card),
                  floor_tiles_per_s_per_device=common.MEASURED_TFLOPS * 1e12 / flops["total"],
                  spec_ceiling_tiles_per_s_per_device=peak * 1e12 / flops["total"])
    setups, notes = sweep_setups(config, args)
    result["notes"] += notes
    for note in notes:
        print(note, file=sys.stderr)
    print(f"{args.preset}: {flops['total'] / 1e9:.1f} GFLOP per tile; devices: {result['meta']['devices']}",
          file=sys.stderr)
    bar = common.progress(len(setups) * len(args.batches), "jax encoder")

    def on_point(row: dict[str, Any]) -> None:
        result["results"].append(row)
        common.write_json(args.out, result)
        bar.set_postfix(mode=row["mode"], devices=row["devices"], kernels=row["kernels"], tiles=row["tiles"],
                        tiles_per_s=f"{row['tiles_per_s']:.0f}")

    for setup in setups:
        runner, padded, build_s = build_runner(config, setup, args)
        choices = kernels_to_time(runner, args.kernels)
        bar.total += len(args.batches) * (len(choices) - 1)
        for tiles in args.batches:
            first = None
            for impl in choices:  # in turn at each batch: drift over the run falls on every choice alike
                runner.encoder_kernels = impl
                row = measure_batch(runner, setup, tiles, padded[tiles], args, flops["total"], peak)
                features = np.asarray(runner.pool[:tiles], np.float32)
                first = features if first is None else first
                scale = float(np.abs(first).max()) or 1.0
                row["max_abs_diff_vs_first_over_max"] = float(np.abs(features - first).max()) / scale
                on_point({**row, "build_s": build_s})
                bar.update()
        common.release_runner(runner, weights=True)  # the next setup places its own copy of the weights
        del runner
        gc.collect()
    bar.close()
    add_ratios(result)
    result["complete"] = True
    result["total_s"] = time.perf_counter() - started
    common.write_json(args.out, result)
    print(table(result))
    print(f"floor {result['floor_tiles_per_s_per_device']:,.0f} tiles/s per device at 790 TFLOP/s; "
          f"total {result['total_s']:.0f} s; JSON {args.out}")
    if args.plot:
        plot(result, args.plot)
        print(f"plot {args.plot}")
    return 1 if "error" in result["baseline"] else 0


if __name__ == "__main__":
    sys.exit(main())
