"""The program store: a second start loads the compiled serving programs instead of tracing and compiling
them, answers exactly as the first, keys its entries on the whole configuration, and recompiles what it
cannot read."""

import gc
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import internvl_jax
from internvl_jax import programs, sharding, weights
from internvl_jax.config import InternVLConfig
from internvl_jax.runner import Runner
from internvl_jax.sampling import SamplingParams
from tests.tiny_models import save_converted_tiny

ARGS = dict(max_model_len=256, max_num_seqs=2, max_prefill_batch=1, prefill_token_budget=256, feature_cache_tiles=8,
            decode_steps=2, dtype="float32", mm_processor_kwargs={"max_dynamic_patch": 2})
STEP_COMPILE = re.compile(r"Compiling jit\((encode|prefill|decode)\)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_converted_tiny(tmp_path_factory.mktemp("programs"), seed=11)[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERNVL_JAX_CACHE", str(tmp_path))
    return tmp_path


def answers(llm) -> list[list[int]]:
    """Greedy tokens of an image chat, and the tokens of a seeded sampled request."""
    pixels = np.random.default_rng(3).integers(0, 256, (96, 160, 3), dtype=np.uint8)
    chat = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(pixels)},
                                         {"type": "text", "text": "What is it?"}]}]
    greedy = llm.chat(chat, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    sampled = llm.generate("Tell me", SamplingParams(temperature=0.9, top_p=0.8, seed=7, max_tokens=6,
                                                     ignore_eos=True))[0]
    return [greedy.outputs[0].token_ids, sampled.outputs[0].token_ids]


def stored_files(cache):
    return sorted((cache / "programs").glob(f"*/*{programs.SUFFIX}"))


def test_a_second_start_loads_every_program_and_answers_the_same(checkpoint, cache, caplog):
    first = internvl_jax.LLM(checkpoint, **ARGS)
    count = len(first.engine.runner.programs)
    assert len(stored_files(cache)) == count > 0
    expected = answers(first)
    with caplog.at_level(logging.INFO), jax.log_compiles(True):
        second = internvl_jax.LLM(checkpoint, **ARGS)
    assert not STEP_COMPILE.findall(caplog.text)  # nothing traced, lowered or compiled
    assert f"loaded {count} of {count} programs" in caplog.text
    assert second.engine.runner.programs.keys() == first.engine.runner.programs.keys()
    assert answers(second) == expected
    runner = second.engine.runner
    assert [getattr(runner, name)._cache_size() for name in ("_encode_jit", "_prefill_jit", "_decode_jit")] == [0] * 3
    assert second.engine.stats.recompiles == 0


def test_the_decode_attention_is_measured_once_and_kept(checkpoint, cache, monkeypatch, caplog):
    """Of two decode attentions the first start measures the faster and stores the choice; the next start
    of the same configuration compiles, loads and runs only that one's decode programs. ('cudnn' runs XLA's
    kernel here, as in test_engine's two-candidate test.)"""
    real_attention = jax.nn.dot_product_attention
    monkeypatch.setattr(Runner, "decode_attention_candidates", lambda self: ["xla", "cudnn"])
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *args, implementation=None, **kwargs: real_attention(*args, implementation="xla",
                                                                                     **kwargs))
    first = internvl_jax.LLM(checkpoint, **ARGS)
    assert first.engine.warmup_report["decode"][0] == 12
    choice = first.engine.runner.decode_attention
    (directory,) = {path.parent for path in stored_files(cache)}
    assert first.engine.program_store.choice("decode_attention") == choice
    assert (directory / programs.CHOICES_FILE).is_file()
    expected = answers(first)
    with caplog.at_level(logging.INFO):
        second = internvl_jax.LLM(checkpoint, **ARGS)
    assert second.engine.runner.decode_attention == choice
    assert second.engine.warmup_report["decode"][0] == 6
    assert {key[3] for key in second.engine.runner.programs if key[0] == "decode"} == {choice}
    assert f"decode attention: {choice} (measured by an earlier start" in caplog.text
    assert answers(second) == expected and second.engine.stats.recompiles == 0
    # An unreadable or foreign choice is measured again.
    (directory / programs.CHOICES_FILE).write_text("{not json")
    assert second.engine.program_store.choice("decode_attention") is None
    third = internvl_jax.LLM(checkpoint, **ARGS)
    assert third.engine.warmup_report["decode"][0] == 12
    assert third.engine.program_store.choice("decode_attention") == third.engine.runner.decode_attention


# The kernels chosen by measurement at warm-up: the choice's name -> (the runner's timing method, the runner's
# attribute, the program kind whose keys name it, its log label, a kernel function whose failure leaves XLA's,
# engine arguments under which the Pallas kernels apply to the tiny model).
KERNEL_CHOICES = {
    "decode_mlp": ("time_decode_mlps", "decode_mlp", "decode", "decode MLP", "gated_up", {**ARGS, "max_num_seqs": 16}),
    "encoder_kernels": ("time_encoder_kernels", "encoder_kernels", "encode", "encoder LayerNorm and GELU",
                        "layer_norm", ARGS),
}


@pytest.mark.parametrize("name", sorted(KERNEL_CHOICES))
def test_a_kernel_choice_is_measured_once_and_kept(name, checkpoint, cache, monkeypatch, caplog):
    """Where the Pallas kernels apply (the decode MLP at 16 decode rows; the encoder's LayerNorm at the tiny
    InternViT's 32-wide rows; offered here as on a GPU, run interpreted), the first start times XLA's and the
    kernels and stores the faster; a start that finds the other choice stored takes it without timing and builds only
    its programs; both answer alike."""
    from internvl_jax import kernels

    timer, attribute, kind, label, _, args = KERNEL_CHOICES[name]
    monkeypatch.setattr(kernels, "available", lambda: True)
    timed = []
    real_timing = getattr(Runner, timer)
    monkeypatch.setattr(Runner, timer,
                        lambda self, candidates, **kw: timed.append(candidates) or real_timing(self, candidates, **kw))
    first = internvl_jax.LLM(checkpoint, **args)
    choice = getattr(first.engine.runner, attribute)
    assert timed == [["xla"], ["pallas"]] and first.engine.program_store.choice(name) == choice
    assert {key[-1] for key in first.engine.runner.programs if key[0] == kind} == {choice}
    expected = answers(first)
    other = "pallas" if choice == "xla" else "xla"  # stored as if measured: the next start must not measure again
    first.engine.program_store.save_choice(name, other)
    with caplog.at_level(logging.INFO):
        later = internvl_jax.LLM(checkpoint, **args)
    assert getattr(later.engine.runner, attribute) == other and len(timed) == 2  # not timed again
    assert {key[-1] for key in later.engine.runner.programs if key[0] == kind} == {other}
    assert f"{label}: {other} (measured by an earlier start" in caplog.text
    assert answers(later) == expected and later.engine.stats.recompiles == 0


@pytest.mark.parametrize("name", sorted(KERNEL_CHOICES))
def test_kernels_that_fail_to_build_leave_xlas(name, checkpoint, cache, monkeypatch, caplog):
    """A GPU or JAX on which the Pallas kernels do not compile (simulated: a kernel raises as a Triton compile
    error would) starts with XLA's and says why; the choice is stored, so no later start retries."""
    from internvl_jax import kernels

    _, attribute, _, label, kernel, args = KERNEL_CHOICES[name]
    monkeypatch.setattr(kernels, "available", lambda: True)

    def broken(*args, **kwargs):
        raise RuntimeError("Triton compilation failed: no kernel for this device")

    monkeypatch.setattr(kernels, kernel, broken)
    with caplog.at_level(logging.WARNING):
        llm = internvl_jax.LLM(checkpoint, **args)
    assert getattr(llm.engine.runner, attribute) == "xla" and llm.engine.program_store.choice(name) == "xla"
    assert (f"{label}: the pallas kernels failed to build or run (RuntimeError: Triton compilation failed"
            in caplog.text)
    assert llm.generate("Hi", SamplingParams(temperature=0, max_tokens=3))[0].outputs[0].token_ids


def test_an_unreadable_entry_is_compiled_again_and_rewritten(checkpoint, cache, caplog):
    first = internvl_jax.LLM(checkpoint, **ARGS)
    expected = answers(first)
    damaged = stored_files(cache)[0]
    damaged.write_bytes(b"not a pickle")
    with caplog.at_level(logging.INFO), jax.log_compiles(True):
        second = internvl_jax.LLM(checkpoint, **ARGS)
    assert f"compiled program {damaged} could not be loaded" in caplog.text
    assert len(STEP_COMPILE.findall(caplog.text)) == 1  # only the damaged one
    # Removed, and written again if compiled here (not when XLA's persistent cache answered)
    assert not damaged.exists() or damaged.stat().st_size > len(b"not a pickle")
    assert answers(second) == expected


def test_only_programs_compiled_in_this_process_are_stored(tmp_path, monkeypatch):
    """An executable handed back by XLA's persistent cache does not always serialize whole (on CPU it lost
    kernels): the store keeps only fresh compiles."""
    from internvl_jax import offline

    monkeypatch.setenv("INTERNVL_JAX_CACHE", str(tmp_path))
    offline.enable_compilation_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        program = jax.jit(lambda x: jnp.cumsum(jnp.sin(x) * 3.25) - 0.125)
        lowered = program.lower(np.zeros(1237, np.float32))
        _, fresh = programs.compile_here(lowered)
        jax.clear_caches()  # the in-memory caches: the next compile goes to XLA's persistent cache
        _, again = programs.compile_here(program.lower(np.zeros(1237, np.float32)))
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    assert fresh and not again


LOCKED_COMPILE = """
import sys, time
import jax, jax.numpy as jnp
from internvl_jax import offline
offline.enable_compilation_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
print("ready", flush=True)
sys.stdin.readline()
jax.jit(lambda x: jnp.cumsum(jnp.cos(x) * 1.5))(jnp.ones(4099)).block_until_ready()
print("compiled", time.time(), flush=True)
"""


def test_xla_cache_entries_are_read_and_written_under_its_lock(tmp_path):
    """Engine processes compiling the same programs at once share XLA's persistent cache: a process waits for
    the cache's file lock to look an entry up or write one, so none reads another's half-written entry. An entry
    left without its last-use file (written unbounded, or by a process killed between its two files) is dated at
    start-up: without that, the bounded cache's every write would fail."""
    import filelock
    from jax._src import lru_cache

    from internvl_jax import offline

    assert (lru_cache._CACHE_SUFFIX, lru_cache._ATIME_SUFFIX) == (offline.XLA_CACHE_SUFFIX, offline.XLA_ATIME_SUFFIX)
    env = {**os.environ, "INTERNVL_JAX_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("JAX_COMPILATION_CACHE_MAX_SIZE", None)
    xla = tmp_path / "xla"
    xla.mkdir()
    (xla / "undated-cache").write_bytes(b"an entry of an unbounded cache")
    process = subprocess.Popen([sys.executable, "-c", LOCKED_COMPILE], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        assert (xla / "undated-atime").exists()
        with filelock.FileLock(xla / ".lockfile"):  # another process in the middle of a read or a write
            process.stdin.write("go\n")
            process.stdin.flush()
            time.sleep(2.0)  # a compile of this size takes ~0.1 s; the lock's wait gives up after 10 s
            assert process.poll() is None, "the compile went on while the cache was locked"
            released = time.time()
        out, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0 and float(out.split()[-1]) >= released  # it waited for the lock
    assert [p.name for p in xla.glob("*-cache") if p.name != "undated-cache"]  # and then wrote its entry


def test_without_the_cache_nothing_is_stored(checkpoint, cache):
    llm = internvl_jax.LLM(checkpoint, compilation_cache=False, **ARGS)
    assert llm.engine.program_store is None and llm.engine.runner.programs
    assert not (cache / "programs").exists()


def test_entries_are_keyed_on_the_configuration(checkpoint):
    config = InternVLConfig.load(checkpoint)

    def runner(data=1, model=1, mode="weights", dtype="float32", **overrides):
        mesh = sharding.make_mesh(data, model)
        module = weights.load_safetensors(checkpoint, config, dtype,
                                          lambda state: sharding.param_shardings(state, mesh, mode))
        options = dict(num_slots=4, max_model_len=256, pool_tiles=8) | overrides
        return Runner(module, mesh, mode, **options)

    baseline = programs.runner_fingerprint(runner())
    assert programs.runner_fingerprint(runner()) == baseline  # the same configuration finds its entries
    variants = [runner(model=2), runner(data=2), runner(model=2, mode="data"), runner(dtype="bfloat16"),
                runner(num_slots=8), runner(max_model_len=512), runner(pool_tiles=16), runner(cuda_graphs="none")]
    fingerprints = [programs.runner_fingerprint(variant) for variant in variants]
    assert baseline not in fingerprints and len(set(fingerprints)) == len(variants)


def test_dummy_weights_load_their_programs_and_come_out_the_same(checkpoint, cache, caplog):
    config = InternVLConfig.load(checkpoint)
    mesh = sharding.make_mesh(1, 2)
    devices = list(mesh.devices.flat)

    def shardings_fn(state):
        return sharding.param_shardings(state, mesh, "weights")

    def leaves(model):
        return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model))]

    expected = leaves(weights.dummy_model(config, "float32", shardings_fn))  # plain jit, no store
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        first = leaves(weights.dummy_model(config, "float32", shardings_fn,
                                           store=programs.ProgramStore.for_devices(cache, devices)))
    compiled_first = caplog.text.count("Compiling jit(init)")
    stored = len(list(cache.glob(f"*/*{programs.SUFFIX}")))
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        second = leaves(weights.dummy_model(config, "float32", shardings_fn,
                                            store=programs.ProgramStore.for_devices(cache, devices)))
    # What the first build compiled here was stored and is loaded now; only what XLA's persistent cache
    # answered the first time (shared by the test session) is compiled again.
    assert stored > 0 and caplog.text.count("Compiling jit(init)") == compiled_first - stored
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(expected, first, second, strict=True))


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities are a Linux feature")
def test_compile_threads_yield_to_the_lowering_thread():
    """Compile threads run at nice 10 (or the process's own, if higher), so the one thread that lowers the
    next programs keeps its core while they compile; this thread's priority is left alone."""
    def niceness():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = niceness()
    with programs.compile_pool(2) as pool:
        assert pool.submit(niceness).result() == max(before, 10)
    assert niceness() == before
    assert programs.compile_workers(3) == 3 and 1 <= programs.compile_workers() <= 16


def test_build_programs_lowers_without_the_garbage_collector(tmp_path):
    """Lowering (the start-up's one-thread critical path) runs with Python's cyclic collector off, which is
    on again afterwards; each program is compiled and stored, then loaded by a second build."""
    seen = []

    def lower(factor):
        seen.append(gc.isenabled())
        return jax.jit(lambda x: x * factor).lower(1.0)

    store = programs.ProgramStore.for_devices(tmp_path, jax.devices()[:1])
    jobs = [(("times", factor), lambda factor=factor: lower(factor)) for factor in (2.25, 3.75)]
    built = programs.build_programs(jobs, store, 2)
    assert seen == [False, False] and gc.isenabled()
    assert [float(b.program(4.0)) for b in built] == [9.0, 15.0] and not any(b.loaded for b in built)
    again = programs.build_programs(jobs, store, 2)
    assert len(seen) == 2 and all(b.loaded for b in again) and float(again[1].program(4.0)) == 15.0
