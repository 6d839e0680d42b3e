"""Parity with the PyTorch reference (transformers' InternVLForConditionalGeneration) on tiny random
models: saved with `save_pretrained`, converted with the CLI, loaded with `internvl_jax.load`.

Metric: max|ours - ref| / max|ref|, per block and end to end.
"""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import internvl_jax
from tests.tiny_models import save_tiny_hf, tiny_hf_config

FLOAT32_TOLERANCE = 1e-5
BFLOAT16_TOLERANCE = 2e-2

VARIANTS = {
    "qwen2-300m-untied": dict(text="qwen2", vision="300m", tie=False),
    "qwen3-6b-untied": dict(text="qwen3", vision="6b", tie=False),
    "llama-6b-tied": dict(text="llama", vision="6b", tie=True),
    "qwen2-300m-tied": dict(text="qwen2", vision="300m", tie=True),
}


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def convert_cli(src, dst, *extra):
    result = subprocess.run([sys.executable, "-m", "convert", str(src), str(dst), "--quiet", *extra],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return dst


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(torch reference, our converted model, HF config, converted dir) for one variant."""
    root = tmp_path_factory.mktemp(request.param)
    config = tiny_hf_config(**VARIANTS[request.param])
    hf_dir = save_tiny_hf(root / "hf", config, seed=3)
    from transformers import InternVLForConditionalGeneration

    reference = InternVLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    converted = convert_cli(hf_dir, root / "converted")
    return reference, internvl_jax.load(converted), config, converted


def make_inputs(config, image_tiles: list[int], seed: int = 0, text_len: int = 12):
    """input_ids [1, T] with one run of image tokens per image, and pixel_values [tiles, 3, S, S]."""
    generator = np.random.default_rng(seed)
    per_tile = config.image_seq_length
    ids = list(generator.integers(0, 250, text_len))
    for index, tiles in enumerate(image_tiles):
        at = 2 + index * 3
        ids[at:at] = [config.image_token_id] * (per_tile * tiles)
    size = config.vision_config.image_size[0]
    pixels = generator.standard_normal((sum(image_tiles), 3, size, size)).astype(np.float32)
    return np.asarray([ids]), (pixels if image_tiles else None)


def test_vision_blocks_match(pair):
    reference, model, _, _ = pair
    pixels = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        hidden = reference.model.vision_tower(pixel_values=torch.from_numpy(pixels),
                                              output_hidden_states=True).hidden_states
    module = model.module()
    ours_embeddings = module.vision.embeddings(jnp.asarray(pixels))
    assert relative_error(ours_embeddings, hidden[0]) <= FLOAT32_TOLERANCE
    for index, layer in enumerate(module.vision.layers):
        ours = layer(jnp.asarray(hidden[index].numpy()))
        assert relative_error(ours, hidden[index + 1]) <= FLOAT32_TOLERANCE, f"vision layer {index}"


def test_projector_matches(pair):
    reference, model, _, _ = pair
    vision_out = np.random.default_rng(2).standard_normal((2, 65, 32)).astype(np.float32)
    with torch.no_grad():
        features = torch.from_numpy(vision_out)[:, 1:].reshape(2, 8, 8, 32)
        ref = reference.model.multi_modal_projector(reference.model.pixel_shuffle(features).reshape(2, 16, -1))
    ours = model.module().projector(jnp.asarray(vision_out))
    assert relative_error(ours, ref) <= FLOAT32_TOLERANCE


def test_decoder_layers_match(pair):
    reference, model, config, _ = pair
    ids, _ = make_inputs(config, [], text_len=20)
    with torch.no_grad():
        hidden = reference(input_ids=torch.from_numpy(ids), output_hidden_states=True).hidden_states
    text = model.module().text
    from internvl_jax.layers import rope_inverse_frequencies, rope_tables

    positions = jnp.arange(ids.shape[1])[None]
    cos, sin = rope_tables(positions, rope_inverse_frequencies(text.config.rope, text.config.head_dim))
    lengths = jnp.array([ids.shape[1]])
    for index, layer in enumerate(text.layers):
        ours, _ = layer(jnp.asarray(hidden[index].numpy()), cos, sin, lengths)
        if index == len(text.layers) - 1:  # the reference's last hidden state is after the final norm
            ours = text.final_norm(ours)
        assert relative_error(ours, hidden[index + 1]) <= FLOAT32_TOLERANCE, f"decoder layer {index}"


@pytest.mark.parametrize("image_tiles", [[], [3], [2, 4]], ids=["no-image", "one-image", "two-images"])
def test_logits_and_image_features_match(pair, image_tiles):
    reference, model, config, _ = pair
    ids, pixels = make_inputs(config, image_tiles)
    with torch.no_grad():
        kwargs = {"pixel_values": torch.from_numpy(pixels)} if pixels is not None else {}
        ref = reference(input_ids=torch.from_numpy(ids), **kwargs).logits.numpy()
        if pixels is not None:
            ref_features = reference.model.get_image_features(pixel_values=torch.from_numpy(pixels),
                                                              return_dict=True).pooler_output.numpy()
            assert relative_error(model.image_features(pixels), ref_features) <= FLOAT32_TOLERANCE
    assert relative_error(model.forward(ids, pixels), ref) <= FLOAT32_TOLERANCE


def test_bfloat16_weights_stay_close(pair):
    reference, _, config, converted = pair
    model = internvl_jax.load(converted, dtype="bfloat16")
    assert model.dtype == jnp.bfloat16
    ids, pixels = make_inputs(config, [2])
    with torch.no_grad():
        ref = reference(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels)).logits.numpy()
    error = relative_error(model.forward(ids, pixels), ref)
    print(f"bfloat16 logits relative error: {error:.2e}")
    assert error <= BFLOAT16_TOLERANCE


def test_position_embeddings_interpolate_like_reference(pair):
    reference, model, _, _ = pair
    pixels = np.random.default_rng(4).standard_normal((2, 3, 80, 80)).astype(np.float32)  # a 10x10 grid, not 8x8
    with torch.no_grad():
        ref = reference.model.vision_tower(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    ours = model.module().vision(jnp.asarray(pixels))
    assert relative_error(ours, ref) <= FLOAT32_TOLERANCE


def test_hf_directory_loads_directly(pair, tmp_path):
    """load() on an HF checkpoint converts in memory and gives the CLI's weights."""
    reference, model, config, converted = pair
    ids, pixels = make_inputs(config, [1])
    from_hf = internvl_jax.load(converted.parent / "hf")
    np.testing.assert_array_equal(from_hf.forward(ids, pixels), model.forward(ids, pixels))


def test_forward_rejects_mismatched_images(pair):
    _, model, config, _ = pair
    ids, pixels = make_inputs(config, [2])
    with pytest.raises(ValueError, match="image tokens"):
        model.forward(ids, pixels[:1])
    with pytest.raises(ValueError, match="no pixel_values"):
        model.forward(ids)


def test_greedy_16_tokens_equal_transformers_generate(pair):
    """Through the engine (prefill + multi-step decode over the KV cache), prompt with two images."""
    reference, _, config, converted = pair
    llm = internvl_jax.LLM(converted, max_model_len=256, max_num_seqs=2, max_prefill_batch=1,
                           feature_cache_tiles=8, decode_steps=8, dtype="float32")
    ids, pixels = make_inputs(config, [2, 1], seed=7)
    # The images go in as their projector output (checked against the reference above), so that this
    # test isolates the engine's prefill and decode.
    features = internvl_jax.load(converted).image_features(pixels)
    prompt_ids = ids[0].tolist()
    images = [features[:2], features[2:]]
    from internvl_jax.engine import ImageInput

    inputs = [ImageInput(key=f"image-{i}", num_tiles=len(e), embeddings=np.asarray(e)) for i, e in enumerate(images)]
    results = {}
    llm.engine.add_request("greedy", prompt_ids, internvl_jax.SamplingParams(temperature=0, max_tokens=16,
                                                                              ignore_eos=True), inputs,
                           sink=lambda out: results.__setitem__("greedy", out))
    llm.engine.run_until_done()
    with torch.no_grad():
        expected = reference.generate(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
                                      max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
    assert results["greedy"].outputs[0].token_ids == expected.tolist()
