"""Shared pieces of the GPU benchmark scripts (`bench/encoder.py`, `bench/decode.py`): the model
configs and their HF `config.json` form, the FLOP and byte formulas behind MFU and the HBM roofline,
the cards' peak figures, timing, run metadata, the PyTorch baseline worker process, JSON, tables and
plots.

Nothing here imports JAX or torch at module level: the PyTorch baseline runs in a child process
(`run_torch_worker`) that must not start JAX's CUDA stack (two CUDA stacks in one process can load
clashing cuDNN builds), and that child must run before the parent's JAX takes its share of GPU memory.

Shapes (as in the model files): T tokens per tile, D vision width, F vision MLP width, E LLM width,
N query heads, K kv heads, H head dim, I LLM MLP width, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from internvl_jax.config import InternVLConfig

ROOT = Path(__file__).resolve().parent.parent
DEMO = "demo"

# ---- the cards ------------------------------------------------------------------------------------
# Dense bf16 peak (spec sheet) and HBM bandwidth (spec), plus the measured anchors of
# ../shared/reference/performance-anchors.md (790 TFLOP/s GEMM ceiling; 3.0-3.35 TB/s H100, 4.15 H200).
MEASURED_TFLOPS = 790.0


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    name: str
    peak_tflops: float  # dense bf16, spec
    hbm_tbps: float  # spec
    hbm_measured_tbps: tuple[float, ...]  # measured anchors (low, high) or (one value,)
    known: bool = True


# Matched in order against `device_kind` ("NVIDIA H100 80GB HBM3", "NVIDIA H200", ...).
DEVICE_SPECS = (
    DeviceSpec("H100 PCIe", 756.0, 2.0, (2.0,)),
    DeviceSpec("H100 NVL", 835.0, 3.9, (3.9,)),
    DeviceSpec("H200", 989.0, 4.8, (4.15,)),
    DeviceSpec("H100", 989.0, 3.35, (3.0, 3.35)),
)


def device_spec(kind: str) -> DeviceSpec:
    """The card's figures by its `device_kind`; an unknown device (a CPU in the smoke tests) gets the H100
    SXM figures, marked `known=False`, so MFU and roofline fractions stay defined (and meaningless)."""
    for spec in DEVICE_SPECS:
        if spec.name.lower() in kind.lower():
            return spec
    return dataclasses.replace(DEVICE_SPECS[-1], name=f"{kind} (unknown: H100 SXM figures assumed)", known=False)


# ---- configs ---------------------------------------------------------------------------------------


def load_config(preset: str) -> tuple[InternVLConfig, dict[str, Any]]:
    """Our config and an HF-native `config.json` dict that builds the same shapes in transformers."""
    from internvl_jax import presets

    if preset == DEMO:
        config = presets.demo_config()
        return config, hf_config_dict(config)
    hf = {k: v for k, v in presets.preset_config(preset).items() if not k.startswith("_")}
    config = InternVLConfig.from_hf_config(hf)
    # transformers builds only the HF-native layout; an original-layout preset (InternVL2-1B) is mapped.
    return config, hf if hf.get("model_type") == "internvl" else hf_config_dict(config)


def preset_choices() -> list[str]:
    from internvl_jax import presets

    return [DEMO, *presets.preset_names()]


def hf_config_dict(config: InternVLConfig) -> dict[str, Any]:
    """`InternVLConfig` -> an HF-native `config.json` dict (`InternVLForConditionalGeneration`).

    The inverse of `config._from_hf_native` for every field that decides shapes or FLOPs. An original-layout
    config maps too: its ps_version v1 skips one transpose that the HF model always does (no FLOPs).
    """
    v, t, p = config.vision, config.text, config.projector
    text: dict[str, Any] = {
        "model_type": t.architecture, "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim, "intermediate_size": t.intermediate_size, "rms_norm_eps": t.norm_eps,
        "rope_theta": t.rope.theta, "max_position_embeddings": t.max_position_embeddings, "hidden_act": t.hidden_act,
        "tie_word_embeddings": t.tie_word_embeddings,
    }
    if t.architecture != "qwen2":  # Qwen2 always has a qkv bias; Qwen3 and Llama say so
        text["attention_bias"] = t.qkv_bias
    if t.rope.rope_type != "default":
        text["rope_scaling"] = {"rope_type": t.rope.rope_type, "factor": t.rope.factor,
                                "low_freq_factor": t.rope.low_freq_factor,
                                "high_freq_factor": t.rope.high_freq_factor,
                                "original_max_position_embeddings": t.rope.original_max_position_embeddings}
    if config.eos_token_ids:
        text["eos_token_id"] = list(config.eos_token_ids)
    if config.bos_token_id is not None:
        text["bos_token_id"] = config.bos_token_id
    return {
        "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
        "vision_config": {
            "model_type": "internvl_vision", "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads, "intermediate_size": v.intermediate_size,
            "image_size": [v.image_size, v.image_size], "patch_size": [v.patch_size, v.patch_size],
            "attention_bias": v.qkv_bias, "use_qk_norm": v.qk_norm, "norm_type": v.norm_type,
            "layer_norm_eps": v.norm_eps, "hidden_act": v.hidden_act,
        },
        "text_config": text,
        "image_token_id": config.image_token_id, "image_seq_length": config.tokens_per_tile,
        "downsample_ratio": p.downsample_ratio, "projector_hidden_act": p.hidden_act,
        "vision_feature_layer": v.feature_layer, "vision_feature_select_strategy": "default",
        "tie_word_embeddings": t.tie_word_embeddings, "torch_dtype": config.dtype,
    }


# ---- FLOPs and bytes -------------------------------------------------------------------------------


def encoder_flops_per_tile(config: InternVLConfig) -> dict[str, int]:
    """FLOPs (2 x MACs) of one tile through InternViT + the projector (performance-anchors B.4(a), (b)).

    per layer: linear 2*T*(4*D^2 + 2*D*F) (qkv, out projection, fc1, fc2; = 2*T*12*D^2 when F = 4D)
               + attention 4*T^2*D (QK^T and AV, T = patches + CLS)
    patch embed 2 * patches * (3*P*P) * D;  projector 2 * tokens_per_tile * (D*s^2 * E + E^2)
    Norms, GELU, softmax, biases and the pixel shuffle are left out (< 1%).
    """
    v, p = config.vision, config.projector
    tokens, d, f = v.num_patches + 1, v.hidden_size, v.intermediate_size
    per_layer = 2 * tokens * (4 * d * d + 2 * d * f) + 4 * tokens * tokens * d
    layers = v.layers_used * per_layer
    patch_embed = 2 * v.num_patches * 3 * v.patch_size**2 * d
    e = p.text_hidden_size
    projector = 2 * config.tokens_per_tile * (p.input_size * e + e * e)
    return {"vision_layers": layers, "patch_embed": patch_embed, "vision": layers + patch_embed,
            "projector": projector, "total": layers + patch_embed + projector}


def decoder_layer_params(config: InternVLConfig) -> int:
    """Parameters of one decoder layer (matrices, biases, norms)."""
    t = config.text
    e, n, k, h = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim
    attention = e * (n + 2 * k) * h + n * h * e
    if t.qkv_bias:
        attention += (n + 2 * k) * h
    if t.o_bias:
        attention += e
    if t.qk_norm:
        attention += 2 * h
    return attention + 3 * e * t.intermediate_size + 2 * e


def decode_params(config: InternVLConfig) -> dict[str, int]:
    """Parameters read from HBM per decode step: every decoder layer, the final norm and the LM head
    (untied: `lm_head`; tied: the embedding table, read whole as the head). The input embedding is a row
    gather (B rows), not counted."""
    t = config.text
    body = t.num_layers * decoder_layer_params(config) + t.hidden_size
    lm_head = t.hidden_size * t.vocab_size
    return {"body": body, "lm_head": lm_head, "streamed": body + lm_head}


def kv_bytes_per_token(config: InternVLConfig, dtype_bytes: int = 2) -> int:
    """K and V of one token over all layers: 2 * L * K * H * bytes (12,288 B for InternVL3-1B in bf16)."""
    t = config.text
    return 2 * t.num_layers * t.num_kv_heads * t.head_dim * dtype_bytes


def decode_bytes_per_step(config: InternVLConfig, batch: int, context: float, dtype_bytes: int = 2) -> float:
    """Bytes one decode step must read: weights streamed + the KV cache of `batch` sequences of `context`."""
    return decode_params(config)["streamed"] * dtype_bytes + batch * context * kv_bytes_per_token(config, dtype_bytes)


def prefill_flops(config: InternVLConfig, tokens: int) -> int:
    """FLOPs of a text prefill of `tokens` (batch 1): 2 * body params * T + causal attention
    2 * T^2 * N*H per layer (QK^T and AV, half the square each) + the LM head for the last token."""
    t = config.text
    params = decode_params(config)
    attention = t.num_layers * 2 * tokens * tokens * t.num_heads * t.head_dim
    return 2 * params["body"] * tokens + attention + 2 * params["lm_head"]


# ---- timing -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Seconds per call: the median over repeats, each repeat a chain of `calls` dispatches and one sync."""

    seconds: float
    samples: list[float]
    calls: int
    first_call_s: float  # compile (if any) + one run

    def summary(self, scale: float = 1e3) -> dict[str, Any]:
        return {"median": self.seconds * scale, "min": min(self.samples) * scale, "max": max(self.samples) * scale,
                "calls_per_repeat": self.calls, "repeats": len(self.samples)}


def kernels_to_time(flag: str, candidates: list[str], wanted: str) -> list[str]:
    """The kernels to time for --`flag`: the runner's `candidates` for 'best', else the one asked for."""
    if wanted == "best":
        return candidates
    if wanted not in candidates:
        raise SystemExit(f"--{flag} {wanted}: not usable here (candidates: {', '.join(candidates)})")
    return [wanted]


def time_calls(call: Callable[[], Any], sync: Callable[[Any], Any], *, repeats: int, target_s: float = 0.05,
               max_calls: int = 64, reset: Callable[[], None] | None = None) -> Timing:
    """Times `call` (which dispatches work and returns something `sync` waits on).

    The first call compiles and warms up; a second, synced alone, sizes the chain so that one repeat takes
    about `target_s` (chained calls keep the device busy, as a server does: the host dispatches ahead).
    `reset` runs before each chain, outside the timed region (e.g. to put the decode lengths back).
    """
    if reset:
        reset()
    start = time.perf_counter()
    sync(call())
    first = time.perf_counter() - start
    if reset:
        reset()
    start = time.perf_counter()
    sync(call())
    single = time.perf_counter() - start
    calls = int(min(max_calls, max(1, math.ceil(target_s / max(single, 1e-7)))))
    samples = []
    for _ in range(repeats):
        if reset:
            reset()
        start = time.perf_counter()
        output = None
        for _ in range(calls):
            output = call()
        sync(output)
        samples.append((time.perf_counter() - start) / calls)
    return Timing(statistics.median(samples), samples, calls, first)


def time_single(call: Callable[[], Any], sync: Callable[[Any], Any], repeats: int) -> float:
    """Median seconds of one call synced alone: latency, with the dispatch and the sync in it."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(call())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def parse_ints(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"expected a comma-separated list of positive integers, got {text!r}")
    return values


# ---- metadata, output ------------------------------------------------------------------------------


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_metadata(argv: Sequence[str], module: str) -> dict[str, Any]:
    """What docs/PERF.md needs next to a number: command, date, versions, host. Devices are added by the
    caller once JAX has started (after the PyTorch worker: see the module docstring)."""
    return {
        "command": " ".join(["python -m", module, *argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        **{name: package_version(name) for name in ("jax", "jaxlib", "flax", "torch", "transformers")},
        "git_commit": _git(["rev-parse", "--short", "HEAD"]),
        "git_uncommitted": _git(["status", "--porcelain", "--untracked-files=no", "--", *SOURCE_PACKAGES]),
        "source_sha256": source_digest(),
    }


# The code a benchmark runs: the engine, the server, the converter and the benchmarks themselves.
SOURCE_PACKAGES = ("internvl_jax", "serve", "convert", "bench")


def source_digest(root: Path = ROOT) -> str:
    """sha256 (first 16 hex digits) over the Python files of `SOURCE_PACKAGES`: names the exact code of a
    result where git cannot (an uncommitted tree, or a copy whose git metadata lags its files, as on the
    device machines). The same tree gives the same digest anywhere."""
    digest = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _git(arguments: list[str]) -> str | None:
    try:
        out = subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def jax_device_info() -> dict[str, Any]:
    import jax

    devices = jax.devices()
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in devices], "device_count": len(devices)}


def memory_limit_bytes(device) -> int:
    """The allocator's limit on one JAX device (75% of the card by default; XLA_PYTHON_CLIENT_MEM_FRACTION
    raises it); a CPU reports none, so the host's physical memory stands in."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_in_use_bytes(device) -> int:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats.get("bytes_in_use", 0)) if stats else 0


def release_runner(runner, *, weights: bool) -> None:
    """Frees a runner's device buffers now rather than whenever the garbage collector breaks the cycles of
    its cached jitted closures: KV cache, slots, feature pool, and the weights if nothing else shares them."""
    arrays = [*(x for kv in runner.caches for x in kv), *runner.slots, runner.pool]
    for array in arrays + (list(runner.leaves) if weights else []):
        array.delete()


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Atomic write (a killed run leaves the last complete snapshot, not half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if value == 0 or not math.isfinite(value):
                return f"{value:g}"
            magnitude = abs(value)
            if magnitude < 0.01:
                return f"{value:.1e}"
            return f"{value:.3f}" if magnitude < 10 else f"{value:.1f}" if magnitude < 1000 else f"{value:,.0f}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in text]
    return "\n".join(lines)


def progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="pt", file=sys.stderr, dynamic_ncols=True)


def log2_axis(axis, values: Sequence[int]) -> None:
    """A base-2 log x axis labelled with the swept values as plain integers."""
    from matplotlib.ticker import FixedLocator, NullLocator

    axis.set_xscale("log", base=2)
    values = sorted(set(values))
    if values:
        axis.xaxis.set_major_locator(FixedLocator(values))
        axis.xaxis.set_minor_locator(NullLocator())
        axis.set_xticklabels([str(v) for v in values])


def save_figure(figure, path: str | Path) -> None:
    """Matplotlib's object API on the Agg canvas (no pyplot state, no display), as bench/plot.py."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


# ---- the PyTorch baseline, in a child process ------------------------------------------------------
TORCH_WORKER_FLAG = "--torch-worker"


def run_torch_worker(module: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Runs `python -m <module> --torch-worker SPEC OUT` and returns its JSON result, or
    {"error": ...} when it fails (the JAX measurements still get written). The child sees the same
    devices; its stdout/stderr go to ours."""
    with tempfile.TemporaryDirectory(prefix="bench-torch-") as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        start = time.perf_counter()
        code = subprocess.run([sys.executable, "-m", module, TORCH_WORKER_FLAG, str(spec_path), str(out_path)],
                              env=env, cwd=ROOT).returncode
        seconds = time.perf_counter() - start
        if code != 0 or not out_path.is_file():
            return {"kind": "torch", "error": f"the PyTorch worker exited with code {code}", "wall_s": seconds}
        result = json.loads(out_path.read_text())
    result["wall_s"] = seconds
    return result


def torch_worker_main(argv: Sequence[str], work: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """Entry of the child: `argv` = [TORCH_WORKER_FLAG, spec.json, out.json]."""
    _, spec_path, out_path = argv
    result = work(json.loads(Path(spec_path).read_text()))
    write_json(out_path, result)
    return 0


def torch_setup(spec: dict[str, Any]):
    """torch, the device ("cuda" if present unless the spec says otherwise) and the sync function."""
    import torch

    device = spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(spec.get("seed", 0))
    sync = (lambda _=None: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda _=None: None)
    return torch, device, sync


def torch_model(hf: dict[str, Any], device: str, dtype_name: str = "bfloat16"):
    """transformers' `InternVLForConditionalGeneration` from a config dict: random weights (its own
    initialisation, made on `device`), sdpa attention, eval mode."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.InternVLConfig.from_dict(hf)
    dtype = getattr(torch, dtype_name)
    with torch.device(device):
        model = transformers.InternVLForConditionalGeneration._from_config(config, dtype=dtype,
                                                                           attn_implementation="sdpa")
    return model.to(device).eval()


def torch_info(device: str) -> dict[str, Any]:
    import torch
    import transformers

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu"
    return {"kind": "torch", "device": f"{device} {name}", "torch": torch.__version__,
            "transformers": transformers.__version__, "attn_implementation": "sdpa"}
