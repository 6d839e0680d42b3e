"""bench profile: HLO-to-scope mapping and trace summary (on a recorded-format trace), and the CLI on CPU."""

import json

import pytest

from bench.profiler import instruction_scopes, main, scope_of, summarize_trace

# The shape of optimized HLO text lines (`compiled.as_text()`), two fusions and a root without metadata.
HLO = "\n".join([
    '  %gemm_fusion_dot.459 = bf16[8,4864]{1,0} fusion(%a, %b), kind=kCustom, metadata={op_name='
    '"jit(decode)/while/body/closed_call/decoder_layer_3/mlp/dot_general" source_file="x.py"}',
    '  %input_scatter_fusion.48 = bf16[8,4096,2,64]{3,2,1,0} fusion(%c), kind=kInput, metadata={op_name='
    '"jit(decode)/while/body/decoder_layer_0/attention/scatter"}',
    "  ROOT %tuple.1 = (s32[]) tuple(%d)",
])


def test_scopes_fold_layer_indices():
    assert scope_of("jit(decode)/while/body/closed_call/decoder_layer_12/mlp/dot_general") == "decoder_layer_*/mlp"
    assert scope_of("jit(encode)/vision/vision_layer_3/attention/dot_general") == "vision/vision_layer_*/attention"
    assert scope_of("jit(decode)/argmax") == "(top level)"
    scopes = instruction_scopes(HLO)
    assert scopes == {"gemm_fusion_dot_459": "decoder_layer_*/mlp",
                      "input_scatter_fusion_48": "decoder_layer_*/attention"}


def test_trace_summary_attributes_kernels():
    trace = {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "name": "gemm_fusion_dot_459", "dur": 8.0, "args": {}},
        {"ph": "X", "pid": 1, "name": "gemm_fusion_dot_459", "dur": 6.0, "args": {}},
        {"ph": "X", "pid": 1, "name": "cudnn_generated_fort_native_sdpa", "dur": 5.0, "args": {}},
        {"ph": "X", "pid": 1, "name": "mystery_kernel", "dur": 1.0, "args": {}},
        {"ph": "X", "pid": 2, "name": "host work", "dur": 1000.0, "args": {}},
    ]}
    summary = summarize_trace(trace, instruction_scopes(HLO), calls=2)
    assert summary["device_us_per_call"] == 10.0
    assert summary["by_scope_us_per_call"] == {"decoder_layer_*/mlp": 7.0, "attention kernel (cuDNN)": 2.5,
                                               "(unattributed)": 0.5}
    assert summary["kernels_per_call"] == 2.0
    assert summary["top_kernels"][0] == {"kernel": "gemm_fusion_dot_459", "per_call": 1.0, "us_per_call": 7.0,
                                         "us_each": 7.0}


@pytest.mark.parametrize("what,flags", [("encode", ["--tiles", "2"]), ("prefill", ["--tokens", "48", "--batch", "2"]),
                                        ("decode", ["--steps", "2"])])
def test_cli_runs_on_cpu(tmp_path, what, flags):
    assert main(["--what", what, "--preset", "demo", "--calls", "1", "--max-model-len", "64", *flags,
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / f"profile-{what}.json").read_text())
    assert result["wall_ms_per_call"] > 0 and result["what"] == what
    assert (tmp_path / f"hlo-{what}.txt").read_text().startswith("HloModule")  # what the kernels come from


def test_decode_profiles_the_faster_attention():
    """Without --attention the profile is of the candidate the server's warm-up would keep: the faster at the
    profiled context and steps, timed by the runner as the warm-up times them."""
    from bench.profiler import fastest_decode_attention

    asked = []

    class Runner:
        def decode_attention_candidates(self):
            return ["xla", "cudnn"]

        def time_decode_attentions(self, candidates, context, steps, sampling_mode):
            asked.append((candidates, context, steps, sampling_mode))
            return {"xla": 0.02, "cudnn": 0.001}

    assert fastest_decode_attention(Runner(), 512, 8) == "cudnn"
    assert asked == [(["xla", "cudnn"], 512, 8, "greedy")]


def test_prefill_batch_must_fit_the_slots(tmp_path):
    with pytest.raises(SystemExit):
        main(["--what", "prefill", "--preset", "demo", "--batch", "9", "--slots", "8", "--out", str(tmp_path)])


def test_bench_dispatcher_finds_the_profile_command(capsys):
    """`python -m bench profile` lives in bench/profiler.py (a bench/profile.py shadows the stdlib's)."""
    from bench import __main__ as bench_main

    with pytest.raises(SystemExit) as exit_info:
        bench_main.main(["profile", "--help"])
    assert exit_info.value.code == 0 and "--what" in capsys.readouterr().out
