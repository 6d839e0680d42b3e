"""The engine against transformers `generate`, continuous batching, the DP/TP mesh and bad input.

One tiny random InternVL (Qwen2 decoder, 300M-style vision), converted with the CLI, shared by the
module. Greedy tokens must be identical to transformers' on identical inputs.
"""

import collections
import dataclasses
import io
import logging
import math
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import internvl_jax
from internvl_jax import engine as engine_module
from internvl_jax import sampling, sharding, weights
from internvl_jax.engine import RequestError, prefill_lengths
from internvl_jax.inputs import InputError
from internvl_jax.preprocess import TilingConfig, normalise
from internvl_jax.sampling import SamplingError, SamplingParams
from tests.tiny_models import save_converted_tiny

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
SMALL = dict(max_model_len=1024, max_num_seqs=4, max_prefill_batch=2, prefill_token_budget=1024,
             feature_cache_tiles=32, decode_steps=4, dtype="float32", mm_processor_kwargs={"max_dynamic_patch": 4})


def image(width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf_dir, converted = save_converted_tiny(tmp_path_factory.mktemp("engine"), seed=5)
    from transformers import InternVLForConditionalGeneration

    reference = InternVLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    return converted, reference


@pytest.fixture(scope="module")
def llm(checkpoint):
    return internvl_jax.LLM(checkpoint[0], **SMALL)


def reference_greedy(reference, llm, prepared, max_tokens=16):
    kwargs = {}
    if prepared.images:
        kwargs["pixel_values"] = torch.from_numpy(normalise(np.concatenate([i.pixels for i in prepared.images])))
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor([prepared.prompt_ids]), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, **kwargs)
    return out[0, len(prepared.prompt_ids):].tolist()


CONVERSATIONS = {
    "text-only": [{"role": "user", "content": "Hello, who are you?"}],
    "one-image": [{"role": "user", "content": [{"type": "image", "image": image(200, 120, 0)},
                                               {"type": "text", "text": "What is in the picture?"}]}],
    "two-images": [{"role": "user", "content": [{"type": "image", "image": image(90, 300, 1)},
                                                {"type": "image", "image": image(128, 128, 2)},
                                                {"type": "text", "text": "Compare them."}]}],
    "multi-turn": [{"role": "user", "content": [{"type": "image", "image": image(160, 100, 3)},
                                                {"type": "text", "text": "Describe it."}]},
                   {"role": "assistant", "content": "A noisy square."},
                   {"role": "user", "content": [{"type": "image", "image": image(64, 200, 4)},
                                                {"type": "text", "text": "And this one?"}]}],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_greedy_equals_transformers_generate(llm, checkpoint, name):
    messages = CONVERSATIONS[name]
    output = llm.chat(messages, GREEDY)[0]
    prepared = llm.processor.chat(messages, mm_processor_kwargs=SMALL["mm_processor_kwargs"])
    assert output.prompt_token_ids == prepared.prompt_ids
    assert output.outputs[0].token_ids == reference_greedy(checkpoint[1], llm, prepared)
    assert output.outputs[0].finish_reason == "length"


def test_requests_admitted_at_different_times_match_running_alone(llm):
    engine = llm.engine
    prompts = [llm.processor.chat(CONVERSATIONS[name], mm_processor_kwargs=SMALL["mm_processor_kwargs"])
               for name in CONVERSATIONS]
    prompts.append(prompts[0])
    # Alone, each runs its own sampling variant (greedy, filtered, filtered, greedy, random); together,
    # "filtered" for all: the variants must draw the same tokens for a row.
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.8, seed=7, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.7, top_k=5, seed=11, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=15, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.8, seed=3, max_tokens=18, ignore_eos=True)]
    alone = [llm._run([p], q)[0].outputs[0] for p, q in zip(prompts, params, strict=True)]
    results = {}

    def add(index):
        engine.add_request(f"batched-{index}", prompts[index].prompt_ids, params[index], prompts[index].images,
                           sink=lambda out: results.__setitem__(out.request_id, out))

    add(0)
    engine.step()
    add(1)
    engine.step()
    engine.step()
    add(2)
    add(3)
    add(4)
    engine.run_until_done()
    for index, single in enumerate(alone):
        together = results[f"batched-{index}"].outputs[0]
        assert together.token_ids == single.token_ids, index
    assert alone[3].logprobs is not None and len(alone[3].logprobs) == 15
    assert all(len(entry) >= 3 for entry in alone[3].logprobs)
    assert engine.stats.recompiles == 0


def test_repeated_image_hits_the_feature_cache(llm):
    stats = llm.engine.stats
    messages = CONVERSATIONS["one-image"]
    llm.chat(messages, GREEDY)
    hits, encoded = stats.encoder_cache_hits, stats.tiles_encoded
    llm.chat(messages, GREEDY)
    assert stats.encoder_cache_hits == hits + 1
    assert stats.tiles_encoded == encoded


def test_stop_conditions(llm):
    first = llm.chat(CONVERSATIONS["text-only"], GREEDY)[0].outputs[0]
    # The incrementally detokenized text ends up equal to decoding all tokens at once.
    assert first.text == llm.get_tokenizer().decode(first.token_ids, skip_special_tokens=True)
    # vLLM's API: get_tokenizer() is transformers' tokenizer (the engine's own decodes the same).
    assert type(llm.get_tokenizer()).__module__.startswith("transformers.")
    assert llm.engine.tokenizer.decode(first.token_ids, skip_special_tokens=True) == first.text
    stop_token = first.token_ids[3]
    stopped = llm.chat(CONVERSATIONS["text-only"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                                  stop_token_ids=[stop_token]))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_token
    assert stopped.token_ids == first.token_ids[: first.token_ids.index(stop_token) + 1]
    text_stop = first.text[len(first.text) // 2:][:3]
    if text_stop:
        by_text = llm.chat(CONVERSATIONS["text-only"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                                      stop=[text_stop]))[0].outputs[0]
        assert by_text.finish_reason == "stop" and text_stop not in by_text.text
        assert first.text.startswith(by_text.text)
    minimum = llm.chat(CONVERSATIONS["text-only"], SamplingParams(temperature=0, max_tokens=16, min_tokens=16,
                                                                  stop_token_ids=[stop_token]))[0].outputs[0]
    assert len(minimum.token_ids) == 16 and stop_token not in minimum.token_ids


def test_bad_input_is_rejected_and_others_are_unaffected(llm):
    good = llm.processor.chat(CONVERSATIONS["one-image"], mm_processor_kwargs=SMALL["mm_processor_kwargs"])
    expected = llm._run([good], GREEDY)[0].outputs[0].token_ids
    results = {}
    llm.engine.add_request("good", good.prompt_ids, GREEDY, good.images,
                           sink=lambda out: results.__setitem__(out.request_id, out))
    with pytest.raises(InputError, match="image"):
        llm.processor.chat([{"role": "user", "content": [{"type": "image", "image": b"not an image at all"}]}])
    with pytest.raises(RequestError, match="max_model_len"):
        llm.engine.add_request("long", [1] * 2000, GREEDY)
    with pytest.raises(RequestError, match="max_tokens"):
        llm.engine.add_request("long-output", [1] * 100, SamplingParams(max_tokens=1000))
    with pytest.raises(SamplingError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(SamplingError, match="temperature"):
        SamplingParams(temperature=-1)
    limited = internvl_jax.inputs.InputProcessor(llm.processor.prompter, llm.config, llm.processor.tiling, max_images=1)
    with pytest.raises(InputError, match="at most 1"):
        limited.chat(CONVERSATIONS["two-images"])
    llm.engine.run_until_done()
    assert results["good"].outputs[0].token_ids == expected


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def test_images_sent_again_as_bytes_are_not_preprocessed_again(llm, monkeypatch):
    """The processed-image cache (vLLM's --mm-processor-cache-gb): the same encoded bytes with the same tiling
    are decoded and tiled once; other tiling options, other bytes and failures are not served from it; the
    byte budget evicts the least recently used."""
    calls = []
    real = internvl_jax.inputs.preprocess_image
    monkeypatch.setattr(internvl_jax.inputs, "preprocess_image",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    first, second = png(image(200, 120, 21)), png(image(120, 200, 22))

    def chat(processor, data, **kwargs):
        return processor.chat([{"role": "user", "content": [{"type": "image", "image": data},
                                                            {"type": "text", "text": "?"}]}], **kwargs)

    tiles_per_image = chat(llm.processor, first).images[0].pixels.nbytes
    processor = internvl_jax.inputs.InputProcessor(llm.processor.prompter, llm.config, llm.processor.tiling,
                                                   cache_gb=1.5 * tiles_per_image / 2**30)  # room for one image
    calls.clear()
    once, again = chat(processor, first), chat(processor, bytearray(first))
    assert len(calls) == 1 and again.prompt_ids == once.prompt_ids
    assert again.images[0].key == once.images[0].key and again.images[0].pixels is once.images[0].pixels
    assert not once.images[0].pixels.flags.writeable  # shared: nobody may write into it
    smaller = chat(processor, first, mm_processor_kwargs={"max_dynamic_patch": 1})  # other tiling: processed
    assert len(calls) == 2 and smaller.images[0].num_tiles == 1
    chat(processor, second)  # evicts `first` (and the 1-tile entry) from a budget of 1.5 images
    chat(processor, first)
    assert len(calls) == 4 and processor.cache.hits == 1 and processor.cache.queries == 5
    for _ in range(2):  # a failure is not cached: reported every time
        with pytest.raises(InputError, match="image"):
            chat(processor, b"not an image at all")
    assert len(calls) == 6 and len(processor.cache) == 1
    processor.max_pixels = 1000  # a lower limit: entries made under the old one are not served
    with pytest.raises(InputError, match="over the limit"):
        chat(processor, first)
    uncached = internvl_jax.inputs.InputProcessor(llm.processor.prompter, llm.config, llm.processor.tiling,
                                                   cache_gb=0)
    assert uncached.cache is None and chat(uncached, first).prompt_ids == once.prompt_ids
    # The encoder-output key of encoded bytes is their hash with the tiling, cache or not (the tiles, 4x larger,
    # are not hashed); an image given decoded is keyed by its tiles.
    assert chat(uncached, first).images[0].key == once.images[0].key
    assert once.images[0].key == "encoded:" + internvl_jax.inputs.ProcessedImageCache.key(
        first, processor.tiling, internvl_jax.inputs.DEFAULT_MAX_PIXELS)
    assert smaller.images[0].key != once.images[0].key
    decoded = Image.open(io.BytesIO(first))
    assert chat(uncached, decoded).images[0].key == internvl_jax.preprocess.preprocess_image(
        decoded, processor.tiling).content_hash
    with pytest.raises(ValueError, match="cache_gb"):
        internvl_jax.inputs.InputProcessor(llm.processor.prompter, llm.config, llm.processor.tiling, cache_gb=-1)


def test_an_interrupted_generate_leaves_the_engine_usable(llm, monkeypatch):
    """Ctrl-C while the engine waits on a dispatch loses that dispatch's tokens: the interrupted requests are
    aborted, and the next call runs to the end (the engine recounts dispatched tokens once nothing is pending)."""
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.engine, "_process", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["Hi", "Hello"], GREEDY)
    monkeypatch.undo()
    outputs = []
    worker = threading.Thread(target=lambda: outputs.extend(llm.generate("Hello again", GREEDY)), daemon=True)
    worker.start()
    worker.join(timeout=300)
    assert not worker.is_alive(), "generate hung after an interrupted call"
    assert len(outputs[0].outputs[0].token_ids) == 16
    assert not llm.engine.running and not llm.engine.pending and not llm.engine.requests


def test_latency_observations_stay_bounded_when_nothing_drains_them():
    """Offline use never scrapes /metrics: the engine keeps only the latest observations."""
    from internvl_jax.engine import EngineStats

    stats = EngineStats()
    for field in ("ttft_observations", "itl_observations", "queue_observations", "prefill_observations"):
        observations = getattr(stats, field)
        observations.extend(range(observations.maxlen + 5))
        assert len(observations) == observations.maxlen and observations[0] == 5, field


def test_sequence_keys_use_all_64_bits_of_the_seed():
    from internvl_jax.engine import sequence_key

    for seed, index, data in ((0, 0, [0, 0]), (12345, 3, [0, 12345]), (2**40 + 3, 1, [256, 3]),
                              (-1, 0, [2**32 - 1, 2**32 - 1])):
        expected = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(np.uint32(data)), index))
        assert np.array_equal(sequence_key(seed, index), np.asarray(expected)), (seed, index)
    keys = {tuple(sequence_key(seed, index)) for seed in (7, 7 + 2**32, 7 + 2**40) for index in (0, 1)}
    assert len(keys) == 6  # jax.random.key(seed) without x64 keeps only the low 32 bits: 2 keys


def test_no_decode_dispatch_beyond_max_tokens(llm, monkeypatch):
    """A sequence is decoded only while the dispatches made so far fall short of its max_tokens: a one-token
    request is served by its prefill alone (no wasted decode dispatch in front of the next request), and 5
    tokens at 4 per dispatch take exactly one decode dispatch after the prefill."""
    runner, calls = llm.engine.runner, []
    real_decode = runner.decode
    monkeypatch.setattr(runner, "decode", lambda active, *args, **kwargs: (calls.append(int(active.sum())),
                                                                           real_decode(active, *args, **kwargs))[1])
    one = llm.generate("Hi", SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    assert len(one[0].outputs[0].token_ids) == 1 and calls == []
    five = llm.generate("Hi", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(five[0].outputs[0].token_ids) == 5 and calls == [1]
    # Mixed: the one-token request rides along in no dispatch, the other in two (1 + 4 + 4 >= 6).
    both = llm.generate(["Hi", "Hello there"], [SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                                                 SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)])
    assert [len(out.outputs[0].token_ids) for out in both] == [1, 6] and calls[1:] == [1, 1]
    assert five[0].outputs[0].token_ids[:1] == one[0].outputs[0].token_ids


class _NotDone:
    """A dispatch's tokens that report themselves not done until read (as if the device were still busy)."""

    def __init__(self, tokens, kind, steps, reads):
        self.tokens, self.kind, self.steps, self.reads = tokens, kind, steps, reads
        self.dispatched = steps[0]

    def is_ready(self):
        return False

    def __array__(self, dtype=None, copy=None):
        self.reads.append((self.kind, self.dispatched, self.steps[0]))
        return np.asarray(self.tokens, dtype)


def test_a_step_reads_its_own_dispatches_only_in_the_next_step(llm, monkeypatch):
    """The engine thread never waits for what it has just queued: a step's prefill and decode tokens are
    read in the following step (after that step has queued its own work), every earlier one is read, and
    the tokens are those of an undisturbed run."""
    expected = llm.generate("Hello there", GREEDY)[0].outputs[0].token_ids
    engine, runner = llm.engine, llm.engine.runner
    steps, reads, outputs = [0], [], []

    def late(kind, real):
        def call(*args, **kwargs):
            output = real(*args, **kwargs)
            return output._replace(tokens=_NotDone(output.tokens, kind, steps, reads))
        return call

    monkeypatch.setattr(runner, "prefill", late("prefill", runner.prefill))
    monkeypatch.setattr(runner, "decode", late("decode", runner.decode))
    prepared = llm.processor.prompt("Hello there")
    engine.add_request("late", prepared.prompt_ids, GREEDY, sink=outputs.append)
    while engine.has_work:
        engine.step()
        steps[0] += 1
    kinds = [kind for kind, _, _ in reads]
    assert kinds == ["prefill"] + ["decode"] * (len(kinds) - 1) and len(kinds) == 1 + math.ceil(15 / 4)
    assert all(read == dispatched + 1 for _, dispatched, read in reads), reads
    assert outputs[-1].finished and outputs[-1].outputs[0].token_ids == expected


def test_bucket_sets():
    """Prefill lengths: powers of two, their quarter points from 2,048 to 4,096 and midpoints above; tile buckets:
    powers of two and a full-size image's tiles (InternVL's default tiling: 12 + the thumbnail)."""
    assert prefill_lengths(64, 8192) == [64, 128, 256, 512, 1024, 2048, 2560, 3072, 3584, 4096, 6144, 8192]
    assert prefill_lengths(64, 16384) == [64, 128, 256, 512, 1024, 2048, 2560, 3072, 3584, 4096, 6144, 8192, 12288,
                                          16384]
    assert prefill_lengths(64, 3000) == [64, 128, 256, 512, 1024, 2048, 2560, 3000]
    assert prefill_lengths(64, 1000) == [64, 128, 256, 512, 1000]
    assert prefill_lengths(512, 4096) == [512, 1024, 2048, 2560, 3072, 3584, 4096]
    assert TilingConfig().max_tiles == 13 and TilingConfig(max_patches=1).max_tiles == 1
    assert TilingConfig(dynamic=False).max_tiles == 1 and TilingConfig(use_thumbnail=False).max_tiles == 12


def test_a_full_size_image_has_its_own_tile_bucket(llm):
    """... and the engine counts the encoder's and the prefill's work with their padding (for /metrics)."""
    tiles = llm.processor.tiling.max_tiles  # 4 + the thumbnail under the fixture's max_dynamic_patch
    assert tiles == 5 and tiles in llm.engine.tile_buckets
    assert llm.engine.tile_buckets == [1, 2, 4, 5, 8, 16, 32]
    stats = llm.engine.stats
    for size, (real, computed) in (((400, 400), (5, 5)), ((200, 120), (3, 4))):  # 2x2 + 1 tiles; 2x1 + 1 in 4
        before = (stats.tiles_encoded, stats.tiles_computed, stats.prompt_tokens, stats.prefill_tokens_computed)
        prompt = llm.processor.prompt("<image>\nWhat is it?", [image(*size, seed=size[0])])
        llm.generate({"prompt": "<image>\nWhat is it?", "multi_modal_data": {"image": image(*size, seed=size[0])}},
                     SamplingParams(temperature=0, max_tokens=1))
        after = (stats.tiles_encoded, stats.tiles_computed, stats.prompt_tokens, stats.prefill_tokens_computed)
        length = llm.engine._length_bucket(len(prompt.prompt_ids))
        assert np.subtract(after, before).tolist() == [real, computed, len(prompt.prompt_ids), length]
    # Two full-size images in one step: two calls of 5 (or 8 + 2), not one of 16.
    before = stats.tiles_encoded, stats.tiles_computed
    two = [image(400, 400, seed=11), image(400, 400, seed=12)]
    llm.generate({"prompt": "<image><image>\nCompare.", "multi_modal_data": {"image": two}},
                 SamplingParams(temperature=0, max_tokens=1))
    assert (stats.tiles_encoded - before[0], stats.tiles_computed - before[1]) == (10, 10)


def test_encoder_calls_are_cut_to_the_buckets(llm):
    """Every tile count is covered exactly by its calls, each call's tiles fit its bucket, and the plan's cost
    (rows + a tile per call) is never above one call per largest bucket with the rest padded (the old cut)."""
    engine = llm.engine
    buckets = engine.tile_buckets
    for tiles in range(1, 3 * buckets[-1] + 1):
        plan = engine._encode_plan(tiles)
        assert sum(count for count, _ in plan) == tiles
        assert all(bucket in buckets and 0 < count <= bucket for count, bucket in plan)
        full, rest = divmod(tiles, buckets[-1])
        old = [buckets[-1]] * full + ([next(b for b in buckets if b >= rest)] if rest else [])
        cost = sum(bucket + engine_module.ENCODE_CALL_TILES for _, bucket in plan)
        assert cost <= sum(bucket + engine_module.ENCODE_CALL_TILES for bucket in old)
    assert engine._encode_plan(9) in (((1, 1), (8, 8)), ((4, 4), (5, 5)))  # 9 rows, not 16
    assert engine._encode_plan(5) == ((5, 5),) and engine._encode_plan(32) == ((32, 32),)


# ---- the mesh ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("data,model,mode", [(1, 4, "data"), (1, 4, "weights"), (2, 2, "weights"), (2, 4, "data")])
def test_sharded_logits_and_greedy_tokens_match_one_device(checkpoint, data, model, mode):
    converted = checkpoint[0]
    mesh = sharding.make_mesh(data, model)
    single = internvl_jax.load(converted)
    sharded = internvl_jax.load(converted, shardings_fn=lambda state: sharding.param_shardings(state, mesh, mode))
    assert any(len(leaf.sharding.device_set) > 1 for leaf in sharded.leaves)
    config = single.config
    ids = np.asarray([[5, 6] + [config.image_token_id] * (2 * config.tokens_per_tile) + [7, 8, 9]])
    pixels = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    reference = single.forward(ids, pixels)
    assert np.abs(sharded.forward(ids, pixels) - reference).max() / np.abs(reference).max() <= 1e-5
    llm_sharded = internvl_jax.LLM(converted, tensor_parallel_size=model, data_parallel_size=data,
                                   mm_encoder_tp_mode=mode, **{**SMALL, "max_model_len": 512})
    llm_single = internvl_jax.LLM(converted, **{**SMALL, "max_model_len": 512})
    conversation = CONVERSATIONS["one-image"]
    assert (llm_sharded.chat(conversation, GREEDY)[0].outputs[0].token_ids
            == llm_single.chat(conversation, GREEDY)[0].outputs[0].token_ids)


def test_data_parallel_replicas_prefill_only_their_own_prompts(checkpoint, monkeypatch):
    """-dp 2: every replica prefills the prompts of its own slots (it used to run the whole batch, replicated),
    slots are spread over the replicas, and the tokens equal one device's."""
    from internvl_jax.runner import Runner

    options = {**SMALL, "max_model_len": 512}
    llm_dp = internvl_jax.LLM(checkpoint[0], data_parallel_size=2, **options)
    llm_one = internvl_jax.LLM(checkpoint[0], **options)
    runner = llm_dp.engine.runner
    batches = []
    real_prefill = Runner.prefill

    def recording_prefill(self, new, want_top):
        if self is runner:
            batches.append(new.slots.copy())
        return real_prefill(self, new, want_top)

    monkeypatch.setattr(Runner, "prefill", recording_prefill)
    conversations = [CONVERSATIONS[name] for name in ("text-only", "one-image", "two-images", "multi-turn")]
    tokens_dp = [out.outputs[0].token_ids for out in llm_dp.chat(conversations, GREEDY)]
    assert tokens_dp == [out.outputs[0].token_ids for out in llm_one.chat(conversations, GREEDY)]
    # Four prompts, two per replica, in one call: rows [0, width) hold replica 0's slots, the rest replica 1's.
    for slots in batches:
        width = len(slots) // 2
        for replica, half in enumerate((slots[:width], slots[width:])):
            real = half[half < runner.num_slots]
            assert all(runner.slot_replica(int(slot)) == replica for slot in real), (slots, replica)
    assert sorted(runner.slot_replica(int(s)) for s in batches[0] if s < runner.num_slots) == [0, 0, 1, 1]
    # Half the work per device, and nothing of cache size gathered.
    rows, length = llm_dp.engine.prefill_shapes()[-1]
    costs = []
    for engine in (llm_dp.engine, llm_one.engine):
        compiled = engine.runner.lower("prefill", engine._new_requests(rows, length), True).compile()
        cost = compiled.cost_analysis()
        costs.append((cost[0] if isinstance(cost, list) else cost)["flops"])
        cache_elements = math.prod(engine.runner.caches[0][0].shape) // engine.data_shards
        for operand in re.findall(r"= \w+\[([0-9,]*)\][^ ]* all-gather", compiled.as_text()):
            assert math.prod(int(d) for d in operand.split(",") if d) < cache_elements / 8, operand
    assert costs[0] / costs[1] == pytest.approx(0.5, rel=0.05)


def count_collectives(hlo: str) -> dict[str, int]:
    return {name: len(re.findall(rf"= [^ ]+ {name}(-start)?\(", hlo)) for name in ("all-reduce", "all-gather")}


def test_data_parallel_prefill_rows_are_paired_across_replicas(checkpoint, monkeypatch):
    """-dp 2, slots freeing one at a time: a prompt that would take a prefill row while the other replica has no
    free slot waits (up to PAIR_WAIT_SECONDS) for one there, so that both replicas' rows are real; without the
    wait each such prompt costs the other replica a padding row. The tokens are one device's either way."""
    from internvl_jax.runner import Runner

    options = {**SMALL, "max_model_len": 256, "max_num_seqs": 4, "decode_steps": 2}
    llm_dp = internvl_jax.LLM(checkpoint[0], data_parallel_size=2, **options)
    runner = llm_dp.engine.runner
    prompts = [f"Question number {i}: what comes next?" for i in range(10)]
    params = [SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
              for tokens in (3, 9, 15, 21, 5, 11, 17, 7, 13, 19)]  # slots free one at a time
    single = internvl_jax.LLM(checkpoint[0], **options)
    expected = [out.outputs[0].token_ids for out in single.generate(prompts, params)]
    real_prefill, padding = Runner.prefill, []

    def recording_prefill(self, new, want_top):
        if self is runner:
            width = len(new.slots) // 2
            real = [int((half < runner.num_slots).sum()) for half in (new.slots[:width], new.slots[width:])]
            padding.append(2 * max(real) - sum(real))
        return real_prefill(self, new, want_top)

    monkeypatch.setattr(Runner, "prefill", recording_prefill)
    results = {}
    for wait in (0.0, 3600.0):
        monkeypatch.setattr(engine_module, "PAIR_WAIT_SECONDS", wait)
        padding.clear()
        results[wait] = [out.outputs[0].token_ids for out in llm_dp.generate(prompts, params)]
        results[wait, "padding"] = sum(padding)
    assert results[0.0] == results[3600.0] == expected
    # Ten prompts, two at a time: only an odd one out at the end may go alone.
    assert results[3600.0, "padding"] <= 1 < results[0.0, "padding"], results


def count_kernel_calls(monkeypatch) -> collections.Counter:
    """Counts the traces of the encoder's Pallas kernels (`kernels.layer_norm`, `kernels.gelu`) from here on: once
    per program that holds them (`kernels.sharded_layer_norm` and `sharded_gelu` are jitted)."""
    from internvl_jax import kernels

    calls = collections.Counter()
    for name in ("layer_norm", "gelu"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, _name=name, _real=real, **k: calls.update([_name]) or _real(*a, **k))
    return calls


@pytest.mark.parametrize("mode", ["data", "weights"])
def test_encoder_collectives_follow_the_mode(checkpoint, mode, monkeypatch):
    """Encoder data mode runs its layers without collectives, weights mode reduces each layer's attention and MLP
    outputs; the LayerNorm and GELU kernels (interpreted here; an MLP width of 64 so that the GELU's applies, 16 per
    device in weights mode) add none: each runs on its device's own block."""
    from internvl_jax.runner import Runner

    mesh = sharding.make_mesh(1, 4)
    config = internvl_jax.InternVLConfig.load(checkpoint[0])
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, intermediate_size=64))
    model = weights.dummy_model(config, jnp.float32, lambda state: sharding.param_shardings(state, mesh, mode))
    traced = count_kernel_calls(monkeypatch)
    runner = Runner(model, mesh, mode, num_slots=4, max_model_len=64, pool_tiles=8)
    assert all(layer.layer_scale_folded for layer in model.vision.layers)  # the runner serves the folded tower
    pixels = jax.device_put(np.zeros((4, 3, 64, 64), np.float32), runner.tile_sharding)
    counts = {}
    for norm in ("xla", "pallas"):
        lowered = runner._encode_jit.lower(runner.encoder_leaves, runner.pool, pixels, jnp.zeros(4, jnp.int32), norm)
        counts[norm] = count_collectives(lowered.compile().as_text())
    layers = model.config.vision.layers_used
    if mode == "data":
        assert counts["xla"]["all-reduce"] == 0, counts  # no collective inside the layers: tiles are split
        assert counts["xla"]["all-gather"] >= 1, counts  # the features are gathered at the end
    else:
        assert counts["xla"]["all-reduce"] >= 2 * layers, counts  # attention and MLP outputs of every layer
    assert counts["pallas"] == counts["xla"]
    assert traced == {"layer_norm": 1, "gelu": 1}  # both kernels are in the pallas program (traced once each)


def test_runner_times_each_decode_attention(checkpoint):
    """The warm-up's (and `bench profile`'s) timing of the decode attentions: seconds per dispatch for each
    candidate asked for, every slot at the given context afterwards."""
    from internvl_jax.runner import Runner

    mesh = sharding.make_mesh(1, 1)
    model = weights.load_safetensors(
        checkpoint[0], internvl_jax.InternVLConfig.load(checkpoint[0]), jnp.float32,
        lambda state: sharding.param_shardings(state, mesh, "data"))
    runner = Runner(model, mesh, "data", num_slots=2, max_model_len=64, pool_tiles=2)
    timings = runner.time_decode_attentions(["xla"], 16, 2, "greedy")
    assert list(timings) == ["xla"] and timings["xla"] > 0
    assert np.asarray(runner.slots.lengths).tolist() == [16 + 4 * 2] * 2  # four dispatches of two steps


def tiny_runner(checkpoint, mesh, slots):
    from internvl_jax.runner import Runner

    model = weights.load_safetensors(
        checkpoint[0], internvl_jax.InternVLConfig.load(checkpoint[0]), jnp.float32,
        lambda state: sharding.param_shardings(state, mesh, "data"))
    return Runner(model, mesh, "data", num_slots=slots, max_model_len=64, pool_tiles=2)


@pytest.mark.parametrize("data,model", [(1, 1), (1, 2), (2, 2)])
def test_the_pallas_decode_mlp_gives_the_tokens_of_xlas(checkpoint, data, model):
    """The decode step with the MLP's Pallas kernels (interpreted here) against XLA's GEMMs: the same tokens
    and logprobs for 16 rows per replica, under tensor parallelism (the MLP width split) and data parallelism."""
    mesh = sharding.make_mesh(data, model)
    slots = 16 * data
    outputs = {}
    for mlp in ("xla", "pallas"):
        runner = tiny_runner(checkpoint, mesh, slots)
        runner.decode_mlp = mlp
        runner.set_lengths(np.arange(slots) % 5 + 3)
        runner.slots = runner.slots._replace(tokens=jax.device_put(np.arange(slots, dtype=np.int32) * 7 + 11,
                                                                   runner.slot_sharding))
        out = runner.decode(np.ones(slots, bool), 3, False, "xla", "greedy")
        # the keys and values the steps wrote in layer 1 come from layer 0's MLP output: a direct check
        outputs[mlp] = (np.asarray(out.tokens), np.asarray(out.logprobs),
                        np.stack([np.asarray(c) for c in runner.caches[1]]))
        # the program's key names the MLP: a stored program of the other kernels is never loaded for it
        assert runner.step_call("decode", np.ones(slots, bool), 3, False, "xla", "greedy").key[-1] == mlp
    assert len(np.unique(outputs["xla"][0])) > 3  # the rows differ
    np.testing.assert_array_equal(outputs["pallas"][0], outputs["xla"][0])
    np.testing.assert_allclose(outputs["pallas"][1], outputs["xla"][1], atol=1e-4)
    cache = outputs["xla"][2]
    assert np.abs(cache).max() > 0
    np.testing.assert_allclose(outputs["pallas"][2], cache, rtol=0, atol=1e-5 * np.abs(cache).max())


@pytest.mark.parametrize("mode,model", [("data", 1), ("data", 2), ("weights", 2)])
def test_the_pallas_encoder_kernels_give_xlas_features(checkpoint, mode, model, monkeypatch):
    """The encode step with the vision layers' LayerNorm and GELU kernels (interpreted here; an MLP width of 64 so
    that the GELU kernel applies, 32 per device in weights mode) against XLA's fusions: the same image features, in
    data mode (tiles split over the devices) and weights mode (heads and MLP split)."""
    from internvl_jax.runner import Runner
    from internvl_jax.vision import LayerKernels

    config = internvl_jax.InternVLConfig.load(checkpoint[0])
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, intermediate_size=64))
    mesh = sharding.make_mesh(1, model)
    state = weights.dummy_model(config, jnp.float32, lambda s: sharding.param_shardings(s, mesh, mode), seed=3)
    runner = Runner(state, mesh, mode, num_slots=2, max_model_len=64, pool_tiles=4)
    chosen = runner._layer_kernels("pallas")
    assert chosen.layer_norm is not None and chosen.gelu is not None and runner._layer_kernels("xla") == LayerKernels()
    traced = count_kernel_calls(monkeypatch)
    pixels = np.random.default_rng(4).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    features = {}
    for impl in ("xla", "pallas"):
        runner.encoder_kernels = impl
        runner.encode(pixels, np.arange(4))
        features[impl] = np.asarray(runner.pool, np.float32)
        # the program's key names the kernels: a stored program of the other kernels is never loaded for it
        assert runner.step_call("encode", pixels, np.arange(4)).key[-1] == impl
    # the kernels ran in the pallas program: traced once each (jitted: every layer's call reuses the trace)
    assert traced == {"layer_norm": 1, "gelu": 1}
    assert np.abs(features["xla"]).max() > 0
    np.testing.assert_allclose(features["pallas"], features["xla"], rtol=0, atol=1e-5 * np.abs(features["xla"]).max())


def test_mm_encoder_gelu_tanh_runs_the_tanh_gelu_in_the_vision_mlp(checkpoint, monkeypatch):
    """`mm_encoder_gelu="tanh"` on an exact-GELU tower: its features are those of the same weights with the tanh
    GELU as the tower's own activation (`gelu_pytorch_tanh`), not the exact GELU's; with XLA's fusions and with the
    Pallas LayerNorm (interpreted) alike, whose exact-GELU kernel it replaces; the programs' fingerprint names it."""
    from internvl_jax import kernels, programs
    from internvl_jax.layers import gelu_tanh_in_dtype
    from internvl_jax.runner import Runner

    base = internvl_jax.InternVLConfig.load(checkpoint[0])
    base = dataclasses.replace(base, vision=dataclasses.replace(base.vision, intermediate_size=64))
    mesh = sharding.make_mesh(1, 1)
    pixels = np.random.default_rng(4).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    monkeypatch.setattr(kernels, "available", lambda: True)

    def encoder(config, vision_gelu):
        model = weights.dummy_model(config, jnp.float32, lambda s: sharding.param_shardings(s, mesh, "data"), seed=3)
        for layer in model.vision.layers:  # GELU inputs of order 1, where the two GELUs differ (up to 4.7e-4)
            layer.mlp["fc1"]["kernel"].set_value(layer.mlp["fc1"]["kernel"][...] * 30)
        return Runner(model, mesh, "data", num_slots=2, max_model_len=64, pool_tiles=2, vision_gelu=vision_gelu)

    def features(runner, impl):
        runner.encoder_kernels = impl
        runner.encode(pixels, np.arange(2))
        return np.asarray(runner.pool, np.float32)

    exact, tanh = encoder(base, "exact"), encoder(base, "tanh")
    declared = encoder(dataclasses.replace(base, vision=dataclasses.replace(base.vision,
                                                                             hidden_act="gelu_pytorch_tanh")), "exact")
    assert tanh._layer_kernels("xla").gelu is gelu_tanh_in_dtype is tanh._layer_kernels("pallas").gelu
    assert tanh._layer_kernels("pallas").layer_norm is not None
    assert tanh.encoder_kernel_candidates() == ["xla", "pallas"]
    reference = features(declared, "xla")
    scale = np.abs(reference).max()
    assert np.abs(features(exact, "xla") - reference).max() > 5e-5 * scale  # the exact GELU's features differ
    for impl in ("xla", "pallas"):
        np.testing.assert_allclose(features(tanh, impl), reference, rtol=0, atol=5e-6 * scale)
    assert programs.runner_fingerprint(tanh) != programs.runner_fingerprint(exact)
    with pytest.raises(ValueError, match=r"vision_gelu='fast': expected one of \['exact', 'tanh'\]"):
        encoder(base, "fast")


def test_mm_encoder_gelu_is_a_server_flag_and_an_engine_argument(capsys):
    from serve.cli import engine_args, parse_args

    assert engine_args(parse_args([])).mm_encoder_gelu == "exact"
    assert engine_args(parse_args(["--mm-encoder-gelu", "tanh"])).mm_encoder_gelu == "tanh"
    with pytest.raises(SystemExit):
        parse_args(["--mm-encoder-gelu", "fast"])
    assert "--mm-encoder-gelu: invalid choice: 'fast'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"mm_encoder_gelu='fast': expected one of \['exact', 'tanh'\]"):
        internvl_jax.LLM(mm_encoder_gelu="fast")


def test_encoder_kernels_are_offered_where_they_apply(checkpoint, monkeypatch):
    """On a GPU (simulated: `kernels.available`) the Pallas kernels are a candidate for InternViT-300M's
    LayerNorm; not for InternViT-6B's RMSNorm and 3,200-wide, 12,800-wide MLP; never off GPU. Both are timed."""
    from internvl_jax import kernels

    runner = tiny_runner(checkpoint, sharding.make_mesh(1, 1), 2)
    assert runner.encoder_kernel_candidates() == ["xla"]
    timings = runner.time_encoder_kernels(["xla", "pallas"], layers=1, tiles=1, rounds=1, repeats=1)
    assert set(timings) == {"xla", "pallas"} and all(seconds > 0 for seconds in timings.values())
    monkeypatch.setattr(kernels, "available", lambda: True)
    assert runner.encoder_kernel_candidates() == ["xla", "pallas"]
    vision = runner.config.vision
    runner.config = dataclasses.replace(runner.config, vision=dataclasses.replace(
        vision, norm_type="rms_norm", hidden_size=3200, intermediate_size=12800))
    assert runner.encoder_kernel_candidates() == ["xla"]
    with pytest.raises(ValueError, match="encoder kernels 'triton': expected 'xla' or 'pallas'"):
        runner._layer_kernels("triton")


def test_runner_times_each_decode_mlp(checkpoint):
    runner = tiny_runner(checkpoint, sharding.make_mesh(1, 1), 16)
    assert runner.decode_mlp_candidates() == ["xla"]  # CPU: the Pallas kernels are not offered
    timings = runner.time_decode_mlps(["xla", "pallas"], repeats=2)
    assert set(timings) == {"xla", "pallas"} and all(seconds > 0 for seconds in timings.values())
    small = tiny_runner(checkpoint, sharding.make_mesh(1, 1), 8)  # 8 rows: the kernels do not apply
    with pytest.raises(ValueError, match="decode MLP 'pallas': not usable here"):
        small._mlp_kernel("pallas")


def test_decode_reuses_the_devices_mask_while_the_running_slots_stay(checkpoint):
    """One transfer of the active-slot mask while it does not change; a changed mask is the one applied."""
    from internvl_jax.runner import Runner

    mesh = sharding.make_mesh(1, 1)
    model = weights.load_safetensors(
        checkpoint[0], internvl_jax.InternVLConfig.load(checkpoint[0]), jnp.float32,
        lambda state: sharding.param_shardings(state, mesh, "data"))
    runner = Runner(model, mesh, "data", num_slots=2, max_model_len=64, pool_tiles=2)
    runner.set_lengths(np.array([16, 16]))
    runner.decode(np.array([True, False]), 2, False, "xla", "greedy")
    first = runner._last_mask[1]
    runner.decode(np.array([True, False]), 2, False, "xla", "greedy")
    assert runner._last_mask[1] is first
    assert np.asarray(runner.slots.lengths).tolist() == [20, 16]  # only the active slot advanced
    runner.decode(np.array([False, True]), 2, False, "xla", "greedy")
    assert runner._last_mask[1] is not first
    assert np.asarray(runner.slots.lengths).tolist() == [20, 18]


def test_heads_not_dividing_the_axis_fall_back_to_data(caplog):
    import dataclasses

    config = internvl_jax.InternVLConfig()
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, num_heads=25, hidden_size=3200))
    assert sharding.resolve_encoder_mode(config, "weights", 4) == "data"
    assert "not divisible" in caplog.text
    assert sharding.resolve_encoder_mode(config, "weights", 1) == "weights"
    with pytest.raises(ValueError, match="mm_encoder_tp_mode"):
        sharding.resolve_encoder_mode(config, "rows", 2)


def test_one_tile_on_four_devices(checkpoint):
    mesh = sharding.make_mesh(1, 4)
    assert sharding.padded_tiles(1, mesh, "data") == 4
    llm = internvl_jax.LLM(checkpoint[0], tensor_parallel_size=4, mm_encoder_tp_mode="data",
                           **{**SMALL, "max_model_len": 512, "mm_processor_kwargs": {"max_dynamic_patch": 1}})
    out = llm.chat(CONVERSATIONS["one-image"], GREEDY)[0]
    assert out.num_image_tiles == 1 and len(out.outputs[0].token_ids) == 16


def test_precomputed_image_embeddings_match_pixels(llm, checkpoint):
    """An image given as its projector output [tiles, tokens, E] gives the same tokens as its pixels."""
    prepared = llm.processor.chat(CONVERSATIONS["one-image"], mm_processor_kwargs=SMALL["mm_processor_kwargs"])
    pixels = normalise(np.concatenate([image.pixels for image in prepared.images]))
    embeddings = internvl_jax.load(checkpoint[0]).image_features(pixels)
    text = llm.processor.prompter.render(CONVERSATIONS["one-image"]).text
    picture = CONVERSATIONS["one-image"][0]["content"][0]["image"]
    from_pixels = llm.generate({"prompt": text, "multi_modal_data": {"image": picture},
                                "mm_processor_kwargs": SMALL["mm_processor_kwargs"]}, GREEDY)[0]
    from_embeddings = llm.generate({"prompt": text, "multi_modal_data": {"image": [embeddings]}}, GREEDY)[0]
    assert from_embeddings.prompt_token_ids == from_pixels.prompt_token_ids
    assert from_embeddings.outputs[0].token_ids == from_pixels.outputs[0].token_ids
    with pytest.raises(InputError, match="embeddings must be"):
        llm.generate({"prompt": text, "multi_modal_data": {"image": [embeddings[:, :5]]}}, GREEDY)


def test_a_recompile_while_serving_is_detected(llm, caplog):
    engine = llm.engine
    before = engine.stats.recompiles
    engine.runner.decode(np.zeros(engine.runner.num_slots, bool), engine.config.decode_steps + 1, False)
    engine.step()
    assert engine.stats.recompiles == before + 1
    assert "recompiled while serving" in caplog.text


def test_decode_and_prefill_do_not_copy_the_cache(llm):
    """The donated cache is updated in place: no copy of a cache-sized buffer in the compiled steps."""
    runner = llm.engine.runner
    cache_shape = ",".join(str(d) for d in runner.caches[0][0].shape)
    decode_hlo = runner.lower("decode", np.ones(runner.num_slots, bool), 4, False, runner.decode_attention,
                              "filtered").compile().as_text()
    new = llm.engine._new_requests(1, 64)
    prefill_hlo = runner._prefill_jit.lower(runner.text_leaves, runner.caches, runner.slots, runner.pool,
                                            type(new)(*(jnp.asarray(x) for x in new)), True).compile().as_text()
    for hlo in (decode_hlo, prefill_hlo):
        copies = [line for line in hlo.splitlines() if re.search(rf"\[{cache_shape}\][^=]*copy\(", line)]
        assert not copies, copies[:3]


def test_uint8_tiles_are_normalised_on_the_device_exactly_as_on_the_host(llm):
    """The serving path ships raw uint8 tiles; the device applies the preprocessing's table."""
    runner = llm.engine.runner
    tiles = np.random.default_rng(3).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    rows = np.array([0, 1], np.int32)
    runner.encode(tiles, rows)
    from_device = np.asarray(runner.pool[:2])
    runner.encode(normalise(tiles), rows)
    from_host = np.asarray(runner.pool[:2])
    np.testing.assert_array_equal(from_device, from_host)


def test_a_failing_sink_does_not_stop_the_engine(llm, caplog):
    engine = llm.engine
    prompt = llm.processor.chat(CONVERSATIONS["text-only"])
    results = {}

    def broken(output):
        raise RuntimeError("client code failed")

    engine.add_request("broken", prompt.prompt_ids, GREEDY, sink=broken)
    engine.add_request("fine", prompt.prompt_ids, GREEDY, sink=lambda out: results.__setitem__(out.request_id, out))
    engine.run_until_done()
    assert results["fine"].finished and len(results["fine"].outputs[0].token_ids) == 16
    assert "output sink of request broken failed" in caplog.text
    assert not engine.running and "broken" not in engine.requests


def test_two_decode_attention_candidates_compile_everything_serving_needs(checkpoint, monkeypatch, caplog):
    """On a GPU the warm-up compiles cuDNN and XLA decode attention (with and without logprobs) and keeps
    the faster by measurement. Here both candidates run XLA's kernel ('cudnn' is routed to it), so the CPU
    exercises that path: no request, with or without logprobs, may recompile while serving."""
    from internvl_jax.runner import Runner

    real_attention = jax.nn.dot_product_attention
    monkeypatch.setattr(Runner, "decode_attention_candidates", lambda self: ["xla", "cudnn"])
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *args, implementation=None, **kwargs: real_attention(*args, implementation="xla",
                                                                                     **kwargs))
    with caplog.at_level(logging.WARNING, logger="jax._src.interpreters.pxla"), jax.log_compiles(True):
        # Without the program store: every program is lowered and compiled here (none loaded).
        llm = internvl_jax.LLM(checkpoint[0], compile_workers=3, compilation_cache=False, **SMALL)
    engine = llm.engine
    # Compiled ahead in threads, then called: the calls must find those executables, not lower again.
    lowered = collections.Counter(re.findall(r"Compiling jit\((encode|prefill|decode)\)", caplog.text))
    report = engine.warmup_report
    assert lowered == {kind: programs for kind, (programs, _) in report.items()}, lowered
    # 2 attentions x with and without logprobs x 3 sampling variants
    assert report["decode"][0] == 12 and report["encode"][0] == len(engine.tile_buckets)
    assert report["prefill"][0] == len(engine.prefill_shapes()) and all(s > 0 for _, s in report.values())
    assert engine.runner.decode_attention in ("xla", "cudnn")
    smallest = engine.prefill_shapes()[0]
    assert len(llm.get_tokenizer()("Hi")["input_ids"]) <= smallest[1]  # a raw prompt in the smallest bucket
    for params in (GREEDY, SamplingParams(temperature=0, max_tokens=4, logprobs=2),
                   SamplingParams(temperature=0.8, max_tokens=4), SamplingParams(top_p=0.5, max_tokens=4, logprobs=1)):
        llm.generate("Hi", params)
        llm.chat([{"role": "user", "content": [{"type": "image", "image": image(64, 64, 9)},
                                               {"type": "text", "text": "Hi"}]}], params)
    assert engine.stats.recompiles == 0
    runner = engine.runner
    assert collections.Counter(step for step, *_ in runner.programs) == {
        "decode": 12, "prefill": len(engine.prefill_shapes()), "encode": len(engine.tile_buckets)}
    # Serving ran every step through those executables: no jit traced or compiled one of its own.
    assert [getattr(runner, name)._cache_size() for name in ("_encode_jit", "_prefill_jit", "_decode_jit")] == [0] * 3


@pytest.mark.parametrize("mode", sampling.SAMPLING_MODES)
def test_serving_steps_hold_no_device_side_branch(llm, mode):
    """A data-dependent branch (lax.cond) in a serving step makes XLA:GPU copy its predicate to the host and
    wait for the GPU, so the dispatch returns only when everything queued before it has run (measured:
    docs/PERF.md). The host picks the sampling variant instead; no step may hold a `case` or an `if`."""
    engine = llm.engine
    runner = engine.runner
    idle = np.zeros(runner.num_slots, bool)
    programs = {"decode": runner.lower("decode", idle, engine.config.decode_steps, True, None, mode),
                "prefill": runner.lower("prefill", engine._new_requests(*engine.prefill_shapes()[0]), True)}
    for name, lowered in programs.items():
        text = lowered.as_text()
        assert "stablehlo.case" not in text and "stablehlo.if" not in text, name


@pytest.mark.parametrize("data", [1, 2])
def test_the_top_p_filter_sorts_whole_rows_under_tensor_parallelism(checkpoint, data):
    """With the vocabulary split over "model", XLA partitioned the filter's prefix sum into a padded windowed
    sum of quadratic cost (8B at TP=2: prefill took 274 of 315 s serving arena-c64, docs/PERF.md) and sorted
    half-rows after an all-to-all. The logits are gathered first: every sort in prefill and filtered decode
    takes whole rows (each data-parallel replica its own rows)."""
    from internvl_jax.config import InternVLConfig
    from internvl_jax.runner import NewRequests, Runner

    config = InternVLConfig.load(checkpoint[0])
    mesh = sharding.make_mesh(data, 2)
    module = weights.load_safetensors(checkpoint[0], config, "float32",
                                      lambda state: sharding.param_shardings(state, mesh, "weights"))
    runner = Runner(module, mesh, "weights", num_slots=4, max_model_len=128, pool_tiles=8)
    vocab = config.text.vocab_size
    compiled = {"prefill": runner.lower("prefill", NewRequests.empty(2, 64, runner.num_slots), False),
                "decode": runner.lower("decode", np.ones(4, bool), 2, False, "xla", "filtered")}
    for name, lowered in compiled.items():
        rows = (2 if name == "prefill" else 4) // data
        sorts = re.findall(r"= \w+\[(\d+),(\d+)\]\S* sort\(", lowered.compile().as_text())
        assert sorts and all((int(b), int(v)) == (rows, vocab) for b, v in sorts), (name, sorts)


def test_sampling_mode_is_the_cheapest_that_covers_every_row():
    greedy, drawn = SamplingParams(temperature=0), SamplingParams(temperature=0.7)
    cut = SamplingParams(temperature=0.7, top_k=40)
    assert sampling.sampling_mode([greedy, greedy]) == "greedy"
    assert sampling.sampling_mode([greedy, drawn]) == "random"
    assert sampling.sampling_mode([drawn, cut, greedy]) == "filtered"
    assert sampling.sampling_mode([SamplingParams(temperature=0, top_p=0.5)]) == "greedy"  # greedy ignores cuts
    assert sampling.sampling_mode([SamplingParams(top_p=0.9)]) == "filtered"


def test_cuda_graph_modes_compute_the_same_tokens(checkpoint):
    """`--cuda-graphs` only sets an XLA option per step (no effect off the GPU): every mode builds, runs the
    serving steps and draws the same tokens; an unknown mode is refused by name. Each step's programs carry
    their options (CUDA graphs per mode, cuBLAS GEMMs for encode and prefill)."""
    from internvl_jax.runner import CUDA_GRAPH_STEPS, NewRequests, Runner

    mesh = sharding.make_mesh(1, 1)
    config = internvl_jax.InternVLConfig.load(checkpoint[0])
    model = weights.load_safetensors(checkpoint[0], config, jnp.float32,
                                                  lambda state: sharding.param_shardings(state, mesh, "data"))
    with pytest.raises(ValueError, match="cuda_graphs='sometimes'"):
        Runner(model, mesh, "data", num_slots=4, max_model_len=64, pool_tiles=8, cuda_graphs="sometimes")
    tokens = {}
    for mode in ("all", "decode", "none"):
        runner = Runner(model, mesh, "data", num_slots=4, max_model_len=64, pool_tiles=8, cuda_graphs=mode)
        new = NewRequests.empty(1, 16, runner.num_slots)
        new.ids[0, :5] = [3, 1, 4, 1, 5]
        new.lengths[0], new.slots[0] = 5, 0
        first = runner.prefill(new, False).tokens
        rest = runner.decode(np.eye(runner.num_slots, dtype=bool)[0], 3, False, sampling_mode="greedy").tokens
        tokens[mode] = (np.asarray(first)[0, 0], *np.asarray(rest)[:, 0])
        for step in ("encode", "prefill", "decode"):  # the XLA options each step's programs are compiled with
            options = runner.compiler_options(step)
            assert dict(runner._jit(step, lambda x: x + 1).lower(1.0)._lowering._compiler_options_kvs) == options
            assert ("xla_gpu_enable_command_buffer" in options) == (step not in CUDA_GRAPH_STEPS[mode]), options
            # cuBLAS for the large-row products of encode and prefill (a cold start's Triton autotuning)
            assert options.get("xla_gpu_enable_triton_gemm", True) == (step == "decode"), (step, options)
    assert tokens["all"] == tokens["decode"] == tokens["none"], tokens
