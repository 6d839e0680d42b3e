"""The GPU benchmark scripts (`python -m bench encoder|decode`) on CPU: the FLOP and byte formulas against
performance-anchors.md and the model's own parameters, the HF config mapping used by the PyTorch baseline,
the timing and memory-planning helpers, and both scripts end to end on the demo model (fake CPU devices,
PyTorch baseline in its child process, JSON, table and PNG)."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

from bench import __main__ as bench_main
from bench import common, decode, encoder
from internvl_jax import presets, weights
from internvl_jax.config import InternVLConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 400 and image.size[1] > 200


# ---- formulas ---------------------------------------------------------------------------------------


def test_encoder_flops_match_the_anchors():
    config, _ = common.load_config("InternVL3-1B")
    flops = common.encoder_flops_per_tile(config)
    # performance-anchors B.4(a): 24 x (25.79 + 4.30) + 1.23 = 723.6 GFLOP; (b) projector 2.29 GFLOP (H=896).
    assert flops["vision"] / 1e9 == pytest.approx(723.6, abs=0.05)
    assert flops["patch_embed"] / 1e9 == pytest.approx(1.23, abs=0.01)
    assert flops["projector"] / 1e9 == pytest.approx(2.29, abs=0.01)
    assert flops["total"] == flops["vision"] + flops["projector"]
    config_8b, _ = common.load_config("InternVL3-8B")
    assert common.encoder_flops_per_tile(config_8b)["projector"] / 1e9 == pytest.approx(14.1, abs=0.05)


def test_decode_bytes_match_the_anchors():
    config, _ = common.load_config("InternVL3-1B")
    # B.4(c): 493.8 M params streamed = 0.988 GB; 12,288 B of KV per token; B=64, S=2048: 0.988 + 1.61 GB.
    assert common.decode_params(config)["streamed"] / 1e6 == pytest.approx(493.8, abs=0.1)
    assert common.kv_bytes_per_token(config) == 12_288
    assert common.decode_bytes_per_step(config, 1, 0) / 1e9 == pytest.approx(0.988, abs=0.001)
    assert common.decode_bytes_per_step(config, 64, 2048) / 1e9 == pytest.approx(0.988 + 1.61, abs=0.01)
    config_8b, _ = common.load_config("InternVL3-8B")
    # B.4(d): 14.14 GB streamed, 57,344 B/token; TTFT example: LLM 2 x 6,525.6 M x 1,892 + 2 S^2 H 28 = 25.4 TFLOP.
    assert common.decode_bytes_per_step(config_8b, 1, 0) / 1e9 == pytest.approx(14.14, abs=0.01)
    assert common.kv_bytes_per_token(config_8b) == 57_344
    assert common.prefill_flops(config_8b, 1892) / 1e12 == pytest.approx(25.4, abs=0.05)


@pytest.mark.parametrize("preset", ["demo", "InternVL3-1B", "InternVL3-8B"])
def test_streamed_params_are_the_models_own(preset):
    """The formula counts exactly the text parameters other than the input embedding (tied: the table once)."""
    config, _ = common.load_config(preset)
    _, state = nnx.split(weights.abstract_model(config, jnp.bfloat16))
    sizes = {weights.path_name(path): math.prod(var.get_value().shape) for path, var in nnx.to_flat_state(state)}
    text = sum(n for name, n in sizes.items() if name.startswith("text."))
    embedding = sizes["text.embed.embedding"]
    expected = text if config.text.tie_word_embeddings else text - embedding
    assert common.decode_params(config)["streamed"] == expected


@pytest.mark.parametrize("preset", ["demo", *presets.preset_names()])
def test_hf_config_dict_round_trips(preset):
    config, hf = common.load_config(preset)
    assert hf["model_type"] == "internvl"
    back = InternVLConfig.from_hf_config(common.hf_config_dict(config))
    for field in ("vision", "projector", "text", "tokens_per_tile", "image_token_id", "eos_token_ids"):
        assert getattr(back, field) == getattr(config, field), field


def test_hf_config_dict_builds_the_same_shapes_in_transformers():
    config, hf = common.load_config("demo")
    hf_config = transformers.InternVLConfig.from_dict(hf)
    with torch.device("meta"):
        model = transformers.InternVLForConditionalGeneration(hf_config)
    ours = sum(math.prod(v.get_value().shape) for _, v in
               nnx.to_flat_state(nnx.split(weights.abstract_model(config, jnp.float32))[1]))
    theirs = sum(p.numel() for p in model.parameters())
    assert theirs == ours


def test_device_spec_by_name():
    h100 = common.device_spec("NVIDIA H100 80GB HBM3")
    assert (h100.peak_tflops, h100.hbm_tbps, h100.hbm_measured_tbps, h100.known) == (989.0, 3.35, (3.0, 3.35), True)
    h200 = common.device_spec("NVIDIA H200")
    assert (h200.hbm_tbps, h200.hbm_measured_tbps) == (4.8, (4.15,))
    assert common.device_spec("NVIDIA H100 PCIe").hbm_tbps == 2.0
    cpu = common.device_spec("cpu")
    assert not cpu.known and cpu.peak_tflops == 989.0
    assert json.loads(json.dumps(dataclasses.asdict(h200)))["name"] == "H200"


# ---- helpers ----------------------------------------------------------------------------------------


def test_time_calls_chains_and_resets():
    log = []

    def call():
        log.append("call")
        return len(log)

    timing = common.time_calls(call, lambda out: log.append("sync"), repeats=3, target_s=0.0, max_calls=4,
                               reset=lambda: log.append("reset"))
    assert timing.calls == 1 and len(timing.samples) == 3
    assert log[:6] == ["reset", "call", "sync", "reset", "call", "sync"]
    assert log.count("reset") == 5 and log.count("call") == 5
    long = common.time_calls(lambda: None, lambda _: None, repeats=2, target_s=10.0, max_calls=7)
    assert long.calls == 7  # the chain is capped
    assert positive_finite(long.seconds) and long.summary()["repeats"] == 2


def test_plan_batch_skips_what_does_not_fit():
    args = decode.parse_args(["--preset", "demo", "--steps", "8"])
    memory = decode.Memory(budget=10 << 30, kv_per_token=12_288, vocab=1000)
    length, runnable, skipped = decode.plan_batch(256, [512, 2048, 8192], args, memory)
    assert runnable == [512, 2048] and length == decode.cache_length(2048, 8)
    assert [s["context"] for s in skipped] == [8192] and "KV cache" in skipped[0]["reason"]
    length, runnable, skipped = decode.plan_batch(1, [512, 8192], args, memory)
    assert runnable == [512, 8192] and not skipped and length >= 8192 + 8
    fixed = decode.parse_args(["--preset", "demo", "--max-model-len", "1024"])
    length, runnable, skipped = decode.plan_batch(1, [512, 2048], fixed, memory)
    assert (length, runnable, [s["context"] for s in skipped]) == (1024, [512], [2048])


def test_encoder_sweep_setups():
    config, _ = common.load_config("InternVL3-1B")
    args = encoder.parse_args(["--devices", "1,2,4,64"])
    setups, notes = encoder.sweep_setups(config, args)
    # One device: data and weights are the same program, measured once.
    assert [(s.mode, s.devices) for s in setups] == [("data", 1), ("data", 2), ("weights", 2), ("data", 4),
                                                       ("weights", 4)]
    assert all(s.resolved == s.mode for s in setups)
    assert any("same program" in n for n in notes) and any("64 devices: skipped" in n for n in notes)
    # InternViT-6B-like 25 heads do not divide 2 devices: weights mode runs as data (as vLLM falls back).
    odd = dataclasses.replace(config, vision=dataclasses.replace(config.vision, num_heads=25, hidden_size=1600))
    setups, notes = encoder.sweep_setups(odd, encoder.parse_args(["--devices", "2", "--modes", "weights"]))
    assert [(s.mode, s.resolved) for s in setups] == [("weights", "data")] and "runs as 'data'" in notes[0]


def test_format_table():
    text = common.format_table(["a", "bb"], [[1, 0.5], [None, 12345.6], [2, 1e-5]])
    lines = text.splitlines()
    assert lines[0].split() == ["a", "bb"] and lines[3].split() == ["-", "12,346"] and lines[4].split()[1] == "1.0e-05"


# ---- the scripts end to end (demo model, CPU) ---------------------------------------------------------


def test_run_metadata_names_the_code(tmp_path):
    """A result names its code by a digest of the source files, which git's metadata cannot do for an
    uncommitted tree or a copy whose .git lags (the device machines)."""
    meta = common.run_metadata(["--quick"], "bench decode")
    assert meta["source_sha256"] == common.source_digest() and len(meta["source_sha256"]) == 16
    assert {"git_commit", "git_uncommitted"} <= meta.keys()
    for package in common.SOURCE_PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "a.py").write_text("x = 1\n")
    before = common.source_digest(tmp_path)
    assert common.source_digest(tmp_path) == before
    (tmp_path / "serve" / "a.py").write_text("x = 2\n")
    assert common.source_digest(tmp_path) != before


def test_encoder_script(tmp_path, capsys):
    out, png = tmp_path / "encoder.json", tmp_path / "encoder.png"
    code = bench_main.main(["encoder", "--preset", "demo", "--batches", "1,2", "--devices", "2,64",
                            "--repeats", "2", "--target-ms", "1", "--out", str(out), "--plot", str(png)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["complete"] and result["benchmark"] == "encoder"
    meta = result["meta"]
    for key in ("date", "jax", "flax", "torch", "transformers", "devices", "device_kind", "command"):
        assert meta[key], key
    assert any("64 devices: skipped" in note for note in result["notes"])
    assert [(r["mode"], r["devices"], r["tiles"]) for r in result["results"]] == [
        ("data", 2, 1), ("data", 2, 2), ("weights", 2, 1), ("weights", 2, 2)]
    assert [r["padded_tiles"] for r in result["results"]] == [2, 2, 1, 2]  # data mode pads to the devices
    assert {r["kernels"] for r in result["results"]} == {"xla"}  # the server's choice: off GPU, XLA's fusions
    data_2, weights_2 = result["results"][1], result["results"][3]
    assert data_2["speedup_vs_weights_mode"] == pytest.approx(data_2["tiles_per_s"] / weights_2["tiles_per_s"])
    assert weights_2["speedup_vs_weights_mode"] is None and data_2["speedup_vs_1_device"] is None
    for r in result["results"]:
        for key in ("ms_per_call", "latency_ms", "tiles_per_s", "tflops", "tiles_per_s_with_copy", "first_call_s"):
            assert positive_finite(r[key]), (key, r)
        assert 0 < r["mfu"] <= 1 and 0 < r["frac_of_measured_peak"] <= 1
    flops = common.encoder_flops_per_tile(common.load_config("demo")[0])["total"]
    assert result["config"]["flops_per_tile"]["total"] == flops
    assert result["floor_tiles_per_s_per_device"] == pytest.approx(790e12 / flops)
    baseline = result["baseline"]
    assert baseline["kind"] == "torch" and "error" not in baseline
    assert baseline["device"].startswith("cpu") and baseline["attn_implementation"] == "sdpa"
    assert [r["tiles"] for r in baseline["results"]] == [1, 2]
    for r, ours in zip(baseline["results"], result["results"][:2], strict=True):
        assert ours["speedup_vs_torch"] == pytest.approx(ours["tiles_per_s"] / r["tiles_per_s"])
    for r in baseline["results"]:
        assert positive_finite(r["tiles_per_s"]) and positive_finite(r["latency_ms"])
        assert 0 < r["mfu"] <= 1 and r["mfu"] == pytest.approx(r["tflops"] / result["peak_tflops"])
    printed = capsys.readouterr().out
    assert "tiles/s" in printed and "PyTorch baseline" in printed
    assert_png(png)


def test_decode_script(tmp_path, capsys):
    out, png = tmp_path / "decode.json", tmp_path / "decode.png"
    code = decode.main(["--preset", "demo", "--batches", "1,4", "--contexts", "32,64", "--prefill-lengths", "16,64",
                        "--steps", "2", "--repeats", "2", "--target-ms", "1", "--torch-batches", "1,2",
                        "--torch-contexts", "16", "--torch-new-tokens", "2,4", "--torch-repeats", "1",
                        "--out", str(out), "--plot", str(png)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["complete"] and result["benchmark"] == "decode"
    for key in ("date", "jax", "torch", "devices", "device_kind"):
        assert result["meta"][key], key
    assert result["hbm_tbps"] == 3.35 and result["hbm_tbps_measured"] == [3.0, 3.35]
    assert result["config"]["kv_bytes_per_token"] == common.kv_bytes_per_token(common.load_config("demo")[0])
    assert {(r["batch"], r["context"]) for r in result["decode"]} == {(1, 32), (1, 64), (4, 32), (4, 64)}
    assert not result["skipped"]
    for r in result["decode"]:
        for key in ("ms_per_step", "tokens_per_s", "bytes_per_step", "roofline_ms", "frac_of_roofline"):
            assert positive_finite(r[key]), (key, r)
        assert r["max_model_len"] >= r["mean_context"] > r["context"]
        assert r["frac_of_roofline"] == pytest.approx(r["roofline_ms"] / r["ms_per_step"])
        assert set(r["frac_of_roofline_at_measured_bw"]) == {"3.0", "3.35"}
        # each usable decode attention timed, the faster kept (CPU: XLA's only)
        assert r["attention"] == "xla" and r["mlp"] == "xla"
        assert r["ms_per_step_by_kernels"] == {"xla/xla": r["ms_per_step"]}
    assert [r["prompt_len"] for r in result["prefill"]] == [16, 64]
    for r in result["prefill"]:
        assert positive_finite(r["ms"]) and positive_finite(r["tokens_per_s"]) and 0 < r["mfu"] <= 1
    baseline = result["baseline"]
    assert "error" not in baseline and baseline["new_tokens"] == [2, 4]
    assert {(r["batch"], r["context"]) for r in baseline["results"]} == {(1, 16), (2, 16)}
    for r in baseline["results"]:
        assert positive_finite(r["prefill_ms"]) and math.isfinite(r["ms_per_token"])
        assert set(r["generate_ms"]) == {"1", "2", "4"}
    printed = capsys.readouterr().out
    assert "roofline" in printed and "prefill" in printed and "PyTorch generate" in printed
    assert_png(png)


def test_scripts_without_baseline_and_quick_flags(tmp_path):
    """--baseline none needs no torch; --quick picks the small sweeps; a second device count runs as TP."""
    args = decode.parse_args(["--quick"])
    assert (args.batches, args.contexts, args.prefill_lengths) == ([1, 32], [512, 2048], [128, 1024])
    assert encoder.parse_args(["--quick"]).batches == list(encoder.QUICK_BATCHES)
    assert encoder.parse_args([]).batches == list(encoder.DEFAULT_BATCHES)
    out = tmp_path / "d.json"
    code = decode.main(["--preset", "demo", "--batches", "2", "--contexts", "16", "--prefill-lengths", "16",
                        "--steps", "2", "--repeats", "1", "--target-ms", "1", "--tp", "2", "--baseline", "none",
                        "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["baseline"] == {"kind": "none"} and result["tp"] == 2
    assert len(result["decode"]) == 1 and len(result["prefill"]) == 1
    assert jax.device_count() >= 2
    with pytest.raises(SystemExit, match="--attention cudnn: not usable here"):  # no cuDNN on a CPU
        decode.main(["--preset", "demo", "--batches", "1", "--contexts", "16", "--prefill-lengths", "16",
                     "--attention", "cudnn", "--baseline", "none", "--out", str(tmp_path / "e.json")])


def test_encoder_script_measures_each_kernel_choice_in_turn(tmp_path, monkeypatch):
    """--kernels all: XLA's fusions and the Pallas LayerNorm/GELU (offered as on a GPU, run interpreted) at each
    batch, each row naming its choice and how far its features are from the first's."""
    from internvl_jax import kernels

    monkeypatch.setattr(kernels, "available", lambda: True)
    out = tmp_path / "encoder.json"
    assert bench_main.main(["encoder", "--preset", "demo", "--batches", "1", "--devices", "1", "--kernels", "all",
                            "--baseline", "none", "--repeats", "1", "--target-ms", "1", "--no-copy",
                            "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["kernels"], r["gelu"], r["tiles"]) for r in rows] == [("xla", "exact", 1), ("pallas", "exact", 1)]
    assert rows[0]["max_abs_diff_vs_first_over_max"] == 0 and 0 < rows[1]["max_abs_diff_vs_first_over_max"] < 0.02
    # --mm-encoder-gelu tanh: the server's option, named in the rows and the table
    assert bench_main.main(["encoder", "--preset", "demo", "--batches", "1", "--devices", "1", "--kernels", "xla",
                            "--mm-encoder-gelu", "tanh", "--baseline", "none", "--repeats", "1", "--target-ms", "1",
                            "--no-copy", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["kernels"], r["gelu"]) for r in result["results"]] == [("xla", "tanh")]
    assert "xla+tanh" in encoder.table(result)
    with pytest.raises(SystemExit, match="--kernels pallas: not usable here"):
        monkeypatch.setattr(kernels, "available", lambda: False)
        bench_main.main(["encoder", "--preset", "demo", "--batches", "1", "--devices", "1", "--kernels", "pallas",
                         "--baseline", "none", "--out", str(out)])


def test_kernel_probe_script(tmp_path):
    from bench import kernel_probe

    out = tmp_path / "kernels.json"
    assert kernel_probe.main(["--preset", "demo", "--tiles", "1", "--depth", "2", "--repeats", "1", "--interpret",
                              "--out", str(out)]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert set(cases) == {"layer_norm 1", "gelu 1"}
    for case in cases.values():
        assert [v["variant"].split()[0] for v in case["variants"]] == ["xla", "pallas"]
        assert all(v["us"] > 0 for v in case["variants"]) and case["variants"][1]["max_abs_diff_vs_xla"] < 0.05
    # a sweep of the given tiles only (the planned one is measured once)
    assert kernel_probe.main(["--preset", "demo", "--tiles", "1", "--kernels", "gelu", "--depth", "1", "--repeats", "1",
                              "--interpret", "--sweep", "--sweep-rows", "1,2", "--sweep-warps", "4", "--out",
                              str(out)]) == 0
    variants = json.loads(out.read_text())["cases"]["gelu 1"]["variants"]
    assert [v["blocks"] for v in variants[1:]] == [{"rows": 1, "warps": 1}, {"rows": 1, "warps": 4},
                                                   {"rows": 2, "warps": 4}]
    with pytest.raises(SystemExit):  # a usage error before anything runs
        kernel_probe.main(["--sweep", "--sweep-warps", "4,x"])


def test_encoder_probe_script(tmp_path):
    from bench import encoder_probe

    out = tmp_path / "probe.json"
    assert encoder_probe.main(["--tiles", "1", "--tokens", "17", "--width", "32", "--mlp", "64", "--heads", "2",
                               "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 5 and all(row["us_per_call"] > 0 for row in result["rows"])
    errors = result["gelu_max_abs_error_vs_float32"]
    assert errors["erf float32"] <= errors["jax.nn.gelu exact"]


def test_compile_probe_script(tmp_path):
    """The probe compiles a subset of the demo server's programs with the given per-step XLA options on top of
    the steps' own, runs each, and leaves the runner's options as they were; bad options fail by name."""
    from bench import compile_probe
    from internvl_jax.engine import Engine
    from internvl_jax.runner import Runner

    own, own_warmup = Runner.compiler_options, Engine.warmup
    with pytest.raises(SystemExit):
        compile_probe.main(["--options", '{"sample": {}}', "--out", str(tmp_path / "x.json")])
    out = tmp_path / "probe.json"
    small_server = ["--max-model-len", "128", "--max-num-seqs", "2", "--feature-cache-tiles", "4"]
    assert compile_probe.main(["--options", '{"prefill": {"xla_gpu_enable_triton_gemm": true}}', "--out", str(out),
                               "--", *small_server]) == 0
    result = json.loads(out.read_text())
    assert Runner.compiler_options is own and Engine.warmup is own_warmup  # later engines are the real ones
    assert result["compiler_options"]["prefill"]["xla_gpu_enable_triton_gemm"] is True  # the probe's
    assert result["compiler_options"]["encode"]["xla_gpu_enable_triton_gemm"] is False  # the step's own
    assert result["programs"] == {"encode": 3, "prefill": 3, "decode": 2}  # buckets 1-4 tiles; every third shape
    assert len(result["runs"]) == 8 and all(run["min_ms"] > 0 for run in result["runs"])


def test_preprocess_probe_script(tmp_path):
    """The preprocessing probe times every piece of both images at each thread count, and says which pass order
    this Pillow uses."""
    from bench import preprocess_probe

    assert preprocess_probe.main(["--threads", "1,2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "preprocess-probe.json").read_text())
    assert result["pass_order_rule"] is not None
    noise, photo = result["images"].values()
    assert noise["grid"] == [3, 2] and "grid_resize, 1 threads" not in noise  # already the grid's size
    for name in ("grid_resize", "thumbnail_resize", "preprocess_image", "worker round trip"):
        for threads in (1, 2):
            assert positive_finite(photo[f"{name}, {threads} threads"]), (name, threads)
