"""Decode step time vs batch and context as a fraction of the HBM roofline, and prefill time vs prompt
length, against transformers `generate` on the same card in the same run.

    python -m bench decode [--preset InternVL3-1B|InternVL3-8B] [--batches 1,8,32,64,128,256]
                           [--contexts 512,2048,8192] [--prefill-lengths 128,...,8192] [--steps 8]
                           [--baseline torch|none] [--out decode.json] [--plot decode.png]

Decode is timed through `Runner.decode(active, steps, want_top=False)` (the server's jitted multi-step
decode, `--steps` tokens per dispatch, greedy) with every slot active and the slot lengths set to the
context before each timed chain, once per decode attention kernel (`--attention best`: each of the
runner's candidates, cuDNN and XLA's on a GPU, keeping the faster per point, as the server's warm-up
does); prefill through `Runner.prefill` with one text-only prompt. One runner per batch size, its cache as
long as the longest context that fits (plus the timed tokens); combinations whose KV cache would not fit
are skipped, and said so, before anything is allocated.

Roofline: bytes per step = decoder + LM head weights (the embedding is a gather) + the KV cache read
(B x context x 2 x layers x kv_heads x head_dim x 2 bytes), over the card's HBM bandwidth. Baseline:
`InternVLForConditionalGeneration.generate` (random weights, bf16, sdpa, greedy, EOS ignored) on a prompt
of `context` random ids; ms/token = (t(N2 new) - t(N1 new)) / (N2 - N1), prefill = t(1 new). Formulas
and columns: docs/BENCH_GPU.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from bench import common
from internvl_jax import sharding, weights
from internvl_jax.runner import NewRequests, Runner

DEFAULT_BATCHES = (1, 8, 32, 64, 128, 256)
DEFAULT_CONTEXTS = (512, 2048, 8192)
DEFAULT_PREFILL = (128, 256, 512, 1024, 2048, 4096, 8192)
DEFAULT_TORCH_BATCHES = (1, 32)
DEFAULT_TORCH_CONTEXTS = (512, 2048)
QUICK = {"batches": (1, 32), "contexts": (512, 2048), "prefill_lengths": (128, 1024), "torch_batches": (1,),
         "torch_contexts": (512,)}
MODULE = "bench.decode"
MAX_CHAINED_CALLS = 16  # decode dispatches per timed repeat: bounds the context drift and the cache headroom
CACHE_ALIGN = 128
USABLE_MEMORY = 0.9  # of the allocator's limit: the rest is for XLA's scratch


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench decode", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="InternVL3-1B", choices=common.preset_choices(),
                        help="model shapes ('demo' = the tiny CPU model)")
    parser.add_argument("--batches", default=None, help="decode batch sizes (default 1,8,32,64,128,256)")
    parser.add_argument("--contexts", default=None, help="context lengths (default 512,2048,8192)")
    parser.add_argument("--prefill-lengths", default=None, help="prompt lengths, batch 1 (default 128..8192)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per dispatch (lax.scan)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (mesh (1, tp)); roofline x tp")
    parser.add_argument("--max-model-len", type=int, default=0,
                        help="fixed cache length for every batch (default: per batch, the longest context that "
                             "fits + headroom)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(weights.DTYPES))
    parser.add_argument("--attention", default="best", choices=("best", "xla", "cudnn"),
                        help="decode attention kernel; 'best' times each candidate and keeps the faster per point "
                             "(what the server runs)")
    parser.add_argument("--mlp", default="best", choices=("best", "xla", "pallas"),
                        help="decode MLP kernels; 'best' times each usable one (with each attention) and keeps the "
                             "fastest per point (what the server runs)")
    parser.add_argument("--hbm-tbps", type=float, default=None,
                        help="HBM bandwidth per device for the roofline (default: H100 3.35, H200 4.8 spec)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 per device (prefill MFU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per point (median; default 10)")
    parser.add_argument("--target-ms", type=float, default=50.0, help="length of one timed repeat (chained calls)")
    parser.add_argument("--baseline", default="torch", choices=("torch", "none"))
    parser.add_argument("--torch-device", default=None, help="baseline device (default cuda if present, else cpu)")
    parser.add_argument("--torch-batches", default=None, help="baseline batches (default 1,32)")
    parser.add_argument("--torch-contexts", default=None, help="baseline contexts (default 512,2048)")
    parser.add_argument("--torch-new-tokens", default="8,40", help="N1,N2 new tokens for the per-token difference")
    parser.add_argument("--torch-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="batches 1,32; contexts 512,2048; prefill 128,1024; baseline batch 1, context 512")
    parser.add_argument("--out", default="decode.json", help="JSON result (rewritten after every point)")
    parser.add_argument("--plot", default=None, help="PNG: step time, roofline fraction, prefill")
    args = parser.parse_args(argv)
    defaults = {"batches": DEFAULT_BATCHES, "contexts": DEFAULT_CONTEXTS, "prefill_lengths": DEFAULT_PREFILL,
                "torch_batches": DEFAULT_TORCH_BATCHES, "torch_contexts": DEFAULT_TORCH_CONTEXTS}
    for name, default in defaults.items():
        given = getattr(args, name)
        setattr(args, name, common.parse_ints(given) if given else list(QUICK[name] if args.quick else default))
    args.torch_new_tokens = common.parse_ints(args.torch_new_tokens)
    if len(args.torch_new_tokens) != 2 or args.torch_new_tokens[0] >= args.torch_new_tokens[1]:
        parser.error("--torch-new-tokens: two counts N1 < N2")
    args.repeats = args.repeats or (5 if args.quick else 10)
    return args


# ---- the PyTorch baseline (child process) ------------------------------------------------------------


def torch_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """`generate` with min_new_tokens = max_new_tokens (EOS ignored), greedy, on random prompt ids."""
    torch, device, sync = common.torch_setup(spec)
    hf = spec["hf_config"]
    model = common.torch_model(hf, device, spec["dtype"])
    text = hf["text_config"]
    # Ordinary ids only: below the special tokens and the image token.
    high = min(text["vocab_size"], hf["image_token_id"]) - 32
    n1, n2 = spec["new_tokens"]
    results = []
    combos = [(b, c) for b in spec["batches"] for c in spec["contexts"]]
    bar = common.progress(len(combos), "pytorch generate")
    with torch.inference_mode():
        for batch, context in combos:
            bar.set_postfix(batch=batch, context=context)
            generator = torch.Generator().manual_seed(spec["seed"] + batch * 100_003 + context)
            ids = torch.randint(16, high, (batch, context), generator=generator).to(device)
            mask = torch.ones_like(ids)

            def generate(new_tokens, ids=ids, mask=mask):
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, use_cache=True)
            try:
                out = generate(n1)  # warm-up
                sync()
                if tuple(out.shape) != (batch, context + n1):
                    raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {(batch, context + n1)}")
                seconds = {n: common.time_single(lambda n=n: generate(n), sync, spec["repeats"]) for n in (1, n1, n2)}
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                results.append({"batch": batch, "context": context, "skipped": "out of memory"})
                bar.update()
                continue
            results.append({"batch": batch, "context": context,
                            "ms_per_token": (seconds[n2] - seconds[n1]) / (n2 - n1) * 1e3,
                            "prefill_ms": seconds[1] * 1e3,
                            "generate_ms": {str(n): s * 1e3 for n, s in seconds.items()}})
            bar.update()
    bar.close()
    return {**common.torch_info(device), "new_tokens": [n1, n2], "results": results}


# ---- JAX ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Memory:
    """Decides, before allocating, which (batch, cache length) fits beside the weights."""

    budget: int  # bytes one device may still allocate
    kv_per_token: float  # cache bytes per (slot, position) on one device
    vocab: int

    def cache_bytes(self, batch: int, length: int) -> float:
        return batch * length * self.kv_per_token

    def workspace(self, batch: int) -> int:
        # float32 logits, their softmax and sampling temporaries per step, plus XLA scratch.
        return 8 * batch * self.vocab * 4 + (1 << 30)

    def fits(self, batch: int, length: int) -> bool:
        return self.cache_bytes(batch, length) + self.workspace(batch) <= self.budget


def cache_length(context: int, steps: int) -> int:
    """Cache positions for `context` plus every token the warm-up and the longest timed chain write."""
    return math.ceil((context + (MAX_CHAINED_CALLS + 2) * steps) / CACHE_ALIGN) * CACHE_ALIGN


def plan_batch(batch: int, contexts: list[int], args, memory: Memory) -> tuple[int | None, list[int], list[dict]]:
    """(cache length, contexts to run, skipped rows) for one batch size."""
    skipped = []
    if args.max_model_len:
        length = args.max_model_len
        runnable = [c for c in contexts if cache_length(c, args.steps) <= length]
        skipped += [{"batch": batch, "context": c, "reason": f"longer than --max-model-len {length} minus headroom"}
                    for c in contexts if c not in runnable]
        if not memory.fits(batch, length):
            runnable = []
    else:
        runnable = [c for c in contexts if memory.fits(batch, cache_length(c, args.steps))]
        length = cache_length(max(runnable), args.steps) if runnable else None
    for context in contexts:
        if context not in runnable and not any(s["context"] == context for s in skipped):
            need = memory.cache_bytes(batch, length or cache_length(context, args.steps))
            skipped.append({"batch": batch, "context": context,
                            "reason": f"KV cache {need / 1e9:.1f} GB + workspace {memory.workspace(batch) / 1e9:.1f}"
                                      f" GB > {memory.budget / 1e9:.1f} GB free on the device"})
    return length, runnable, skipped


def measure_decode(runner: Runner, batch: int, context: int, args, config, bandwidth: float) -> dict[str, Any]:
    active = np.ones(batch, bool)
    lengths = np.full(batch, context, np.int32)

    def reset():
        runner.slots = runner.slots._replace(lengths=jax.device_put(lengths, runner.slot_sharding))
        jax.block_until_ready(runner.slots.lengths)

    timings = {}
    for mlp in common.kernels_to_time("mlp", runner.decode_mlp_candidates(), args.mlp):
        runner.decode_mlp = mlp
        for impl in common.kernels_to_time("attention", runner.decode_attention_candidates(), args.attention):
            def call(impl=impl):
                return runner.decode(active, args.steps, False, impl, sampling_mode="greedy").tokens

            timings[impl, mlp] = common.time_calls(call, jax.block_until_ready, repeats=args.repeats,
                                                   target_s=args.target_ms / 1e3, max_calls=MAX_CHAINED_CALLS,
                                                   reset=reset)
    attention, mlp = min(timings, key=lambda kernels: timings[kernels].seconds)
    timing = timings[attention, mlp]
    step_s = timing.seconds / args.steps
    # Step k of a chain reads context + k + 1 cached tokens (its own included).
    mean_context = context + (timing.calls * args.steps + 1) / 2
    step_bytes = common.decode_bytes_per_step(config, batch, mean_context)
    roofline_s = step_bytes / bandwidth
    return {"batch": batch, "context": context, "mean_context": mean_context, "max_model_len": runner.max_model_len,
            "steps_per_dispatch": args.steps, "attention": attention, "mlp": mlp,
            "ms_per_step_by_kernels": {f"{impl}/{m}": t.seconds / args.steps * 1e3
                                       for (impl, m), t in timings.items()},
            "ms_per_step": step_s * 1e3, "tokens_per_s": batch / step_s,
            "bytes_per_step": step_bytes, "roofline_ms": roofline_s * 1e3, "frac_of_roofline": roofline_s / step_s,
            "first_call_s": timing.first_call_s, "timing_ms_per_dispatch": timing.summary()}


def new_requests(prompt_len: int, vocab: int, image_token_id: int, rng: np.random.Generator,
                 batch: int = 1) -> NewRequests:
    """`batch` text-only prompts of random ids in slots 0..batch-1, greedy."""
    high = min(vocab, image_token_id if image_token_id > 0 else vocab) - 32
    new = NewRequests.empty(batch, prompt_len, 0)
    new.ids[:] = rng.integers(16, high, (batch, prompt_len), dtype=np.int32)
    new.lengths[:] = prompt_len
    new.slots[:] = np.arange(batch)
    return new


def measure_prefill(runner: Runner, prompt_len: int, args, config, peak_tflops: float) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed + prompt_len)
    new = new_requests(prompt_len, config.text.vocab_size, config.image_token_id, rng)
    timing = common.time_calls(lambda: runner.prefill(new, False).tokens, jax.block_until_ready,
                               repeats=args.repeats, target_s=args.target_ms / 1e3, max_calls=16)
    flops = common.prefill_flops(config, prompt_len)
    return {"prompt_len": prompt_len, "ms": timing.seconds * 1e3, "tokens_per_s": prompt_len / timing.seconds,
            "flops": flops, "tflops": flops / timing.seconds / 1e12,
            "mfu": flops / timing.seconds / (peak_tflops * 1e12 * args.tp),
            "first_call_s": timing.first_call_s, "timing_ms": timing.summary()}


# ---- report ------------------------------------------------------------------------------------------


def baseline_rows(result: dict[str, Any]) -> dict[tuple[int, int], dict[str, Any]]:
    baseline = result.get("baseline") or {}
    return {(r["batch"], r["context"]): r for r in baseline.get("results", []) if "ms_per_token" in r}


def table(result: dict[str, Any]) -> str:
    torch_rows = baseline_rows(result)
    low_bw = min(result["hbm_tbps_measured"])
    decode = []
    for r in result["decode"]:
        base = torch_rows.get((r["batch"], r["context"]))
        torch_ms = base["ms_per_token"] if base else None
        chosen = f"{r['attention']}/{r['mlp']}"
        others = ", ".join(f"{kernels} {ms:.3f}" for kernels, ms in r["ms_per_step_by_kernels"].items()
                           if kernels != chosen)
        decode.append([r["batch"], r["context"], r["ms_per_step"], chosen + (f" ({others})" if others else ""),
                       r["tokens_per_s"], r["bytes_per_step"] / 1e9,
                       r["roofline_ms"], r["frac_of_roofline"], r["frac_of_roofline"] * result["hbm_tbps"] / low_bw,
                       torch_ms, torch_ms / r["ms_per_step"] if base else None])
    lines = [f"decode ({result['steps']} steps per dispatch; roofline at {result['hbm_tbps']:g} TB/s x "
             f"{result['tp']} device(s); 'of meas.' at the measured {low_bw:g} TB/s):",
             common.format_table(["batch", "context", "ms/step", "attention/MLP (others)", "tok/s", "GB/step",
                                  "roof ms", "of roof", "of meas.", "torch ms", "x torch"], decode)]
    if result["skipped"]:
        lines += ["skipped: " + "; ".join(f"B={s['batch']} ctx={s['context']}: {s['reason']}"
                                          for s in result["skipped"])]
    torch_prefill = {c: r["prefill_ms"] for (b, c), r in torch_rows.items() if b == 1}
    prefill = [[r["prompt_len"], r["ms"], r["tokens_per_s"], r["tflops"], r["mfu"], torch_prefill.get(r["prompt_len"])]
               for r in result["prefill"]]
    lines += ["", "prefill (batch 1, text only):",
              common.format_table(["tokens", "ms", "tok/s", "TFLOP/s", "MFU", "torch ms"], prefill)]
    if torch_rows:
        lines += ["", "PyTorch generate (" + result["baseline"]["device"] + "):",
                  common.format_table(["batch", "context", "ms/token", "prefill ms"],
                                      [[b, c, r["ms_per_token"], r["prefill_ms"]]
                                       for (b, c), r in sorted(torch_rows.items())])]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(17, 5), layout="constrained")
    step_axis, frac_axis, prefill_axis = figure.subplots(1, 3)
    colors = {}
    for context in sorted({r["context"] for r in result["decode"]}):
        rows = [r for r in result["decode"] if r["context"] == context]
        batches = [r["batch"] for r in rows]
        line = step_axis.plot(batches, [r["ms_per_step"] for r in rows], marker="o", label=f"JAX ctx {context}")[0]
        colors[context] = line.get_color()
        step_axis.plot(batches, [r["roofline_ms"] for r in rows], linestyle=":", color=colors[context],
                       label=f"HBM roofline ctx {context}")
        frac_axis.plot(batches, [r["frac_of_roofline"] for r in rows], marker="o", color=colors[context],
                       label=f"ctx {context}")
    torch_rows = baseline_rows(result)
    for context in sorted({c for _, c in torch_rows}):
        points = sorted((b, r["ms_per_token"]) for (b, c), r in torch_rows.items() if c == context)
        step_axis.plot(*zip(*points, strict=True), marker="s", linestyle="--", color=colors.get(context, "k"),
                       markeredgecolor="k", label=f"PyTorch generate ctx {context}")
    frac_axis.axhline(0.7, linestyle="--", color="gray")
    frac_axis.annotate("70% target", (1, 0.7), fontsize=8, color="gray", va="bottom")
    frac_axis.set_ylim(0, max(1.0, *(r["frac_of_roofline"] for r in result["decode"])) * 1.05)
    batches = [r["batch"] for r in result["decode"]] + [b for b, _ in torch_rows]
    for axis, label in ((step_axis, "ms per token step"), (frac_axis, "fraction of HBM roofline")):
        common.log2_axis(axis, batches)
        axis.set_xlabel("batch (sequences)")
        axis.set_ylabel(label)
    step_axis.set_yscale("log")
    lengths = [r["prompt_len"] for r in result["prefill"]]
    if lengths:
        prefill_axis.plot(lengths, [r["ms"] for r in result["prefill"]], marker="o", label="JAX prefill")
        floor_ms = [r["flops"] / (common.MEASURED_TFLOPS * 1e12 * result["tp"]) * 1e3 for r in result["prefill"]]
        prefill_axis.plot(lengths, floor_ms, linestyle=":", color="gray", label="floor (790 TFLOP/s)")
    torch_prefill = sorted((c, r["prefill_ms"]) for (b, c), r in torch_rows.items() if b == 1)
    if torch_prefill:
        prefill_axis.plot(*zip(*torch_prefill, strict=True), "ks", label="PyTorch generate, 1 new token")
    common.log2_axis(prefill_axis, lengths + [c for c, _ in torch_prefill])
    prefill_axis.set_yscale("log")
    prefill_axis.set_xlabel("prompt tokens (batch 1)")
    prefill_axis.set_ylabel("ms")
    for axis in (step_axis, frac_axis, prefill_axis):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    meta = result["meta"]
    figure.suptitle(f"{result['config']['preset']} decode ({result['steps']} steps/dispatch) and prefill, "
                    f"{meta.get('device_kind')} x{result['tp']}, {meta['date'][:10]}", fontsize=11)
    common.save_figure(figure, path)


# ---- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == common.TORCH_WORKER_FLAG:
        return common.torch_worker_main(argv, torch_decode)
    args = parse_args(argv)
    started = time.perf_counter()
    config, hf = common.load_config(args.preset)
    params = common.decode_params(config)
    result: dict[str, Any] = {
        "benchmark": "decode", "complete": False, "meta": common.run_metadata(argv, "bench decode"),
        "config": {"preset": args.preset, "dtype": args.dtype, "text": dataclasses.asdict(config.text),
                   "decode_params": params, "weight_bytes_per_step": params["streamed"] * 2,
                   "kv_bytes_per_token": common.kv_bytes_per_token(config)},
        "steps": args.steps, "tp": args.tp, "decode": [], "prefill": [], "skipped": [], "notes": [],
    }
    # The baseline runs first: JAX reserves most of the GPU memory once it starts.
    if args.baseline == "torch":
        spec = {"hf_config": hf, "batches": args.torch_batches, "contexts": args.torch_contexts,
                "new_tokens": args.torch_new_tokens, "repeats": args.torch_repeats, "dtype": args.dtype,
                "seed": args.seed, "device": args.torch_device}
        result["baseline"] = common.run_torch_worker(MODULE, spec)
        if "error" in result["baseline"]:
            print(f"WARNING: PyTorch baseline failed: {result['baseline']['error']}", file=sys.stderr)
    else:
        result["baseline"] = {"kind": "none"}
    result["meta"].update(common.jax_device_info())
    card = common.device_spec(result["meta"]["device_kind"])
    peak = args.peak_tflops or card.peak_tflops
    hbm = args.hbm_tbps or card.hbm_tbps
    result.update(card=dataclasses.asdict(card), hbm_tbps=hbm, hbm_tbps_measured=list(card.hbm_measured_tbps),
                  peak_tflops=peak, measured_peak_tflops=common.MEASURED_TFLOPS,
                  floor_ms_batch1=common.decode_bytes_per_step(config, 1, 0) / (hbm * 1e12 * args.tp) * 1e3,
                  floor_ms_batch1_measured_bw={str(bw): common.decode_bytes_per_step(config, 1, 0)
                                               / (bw * 1e12 * args.tp) * 1e3 for bw in card.hbm_measured_tbps})
    print(f"{args.preset}: {params['streamed'] * 2 / 1e9:.3f} GB of weights per step, "
          f"{result['config']['kv_bytes_per_token']:,} B of KV per token; batch-1 floor "
          f"{result['floor_ms_batch1']:.3f} ms at {hbm:g} TB/s ("
          + ", ".join(f"{ms:.3f} ms at {bw} TB/s measured" for bw, ms in result["floor_ms_batch1_measured_bw"].items())
          + f"); devices: {result['meta']['devices']}", file=sys.stderr)

    mesh = sharding.make_mesh(1, args.tp)
    model = weights.dummy_model(config, weights.DTYPES[args.dtype],
                                lambda s: sharding.param_shardings(s, mesh, "data"), seed=args.seed)
    device = jax.devices()[0]
    text = config.text
    kv_shards = args.tp if text.num_kv_heads % args.tp == 0 else 1
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))  # weights allocated before the budget is read
    memory = Memory(budget=int(USABLE_MEMORY * common.memory_limit_bytes(device)) - common.memory_in_use_bytes(device),
                    kv_per_token=common.kv_bytes_per_token(config) / kv_shards, vocab=text.vocab_size)
    plans = [(batch, *plan_batch(batch, args.contexts, args, memory)) for batch in args.batches]
    prefill_length = cache_length(max(args.prefill_lengths), 0)
    prefill_fits = memory.fits(1, prefill_length)
    for _, _, _, skipped in plans:
        result["skipped"] += skipped
    for skip in result["skipped"]:
        print(f"skip batch {skip['batch']}, context {skip['context']}: {skip['reason']}", file=sys.stderr)
    total = sum(len(runnable) for _, _, runnable, _ in plans) + (len(args.prefill_lengths) if prefill_fits else 0)
    bar = common.progress(total, "jax decode")
    bandwidth = hbm * 1e12 * args.tp

    def record(kind: str, row: dict[str, Any], postfix: dict[str, Any]) -> None:
        result[kind].append(row)
        common.write_json(args.out, result)
        bar.set_postfix(postfix)
        bar.update()

    for batch, length, runnable, _ in plans:
        if not runnable:
            continue
        runner = Runner(model, mesh, "data", num_slots=batch, max_model_len=length, pool_tiles=1)
        for context in runnable:
            row = measure_decode(runner, batch, context, args, config, bandwidth)
            row["frac_of_roofline_at_measured_bw"] = {str(bw): row["frac_of_roofline"] * hbm / bw
                                                      for bw in card.hbm_measured_tbps}
            record("decode", row, {"batch": batch, "ctx": context, "ms": f"{row['ms_per_step']:.3f}"})
        common.release_runner(runner, weights=False)  # the weights are shared by every runner
    if prefill_fits:
        runner = Runner(model, mesh, "data", num_slots=1, max_model_len=prefill_length, pool_tiles=1)
        for prompt_len in args.prefill_lengths:
            row = measure_prefill(runner, prompt_len, args, config, peak)
            record("prefill", row, {"prefill": prompt_len, "ms": f"{row['ms']:.2f}"})
        common.release_runner(runner, weights=False)
    else:
        result["skipped"].append({"batch": 1, "context": prefill_length, "reason": "prefill cache does not fit"})
    bar.close()
    result["complete"] = True
    result["total_s"] = time.perf_counter() - started
    common.write_json(args.out, result)
    print(table(result))
    print(f"total {result['total_s']:.0f} s; JSON {args.out}")
    if args.plot:
        plot(result, args.plot)
        print(f"plot {args.plot}")
    return 1 if "error" in result["baseline"] else 0


if __name__ == "__main__":
    sys.exit(main())
