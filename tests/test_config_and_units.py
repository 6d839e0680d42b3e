"""Config parsing (both layouts, clear errors) and the model pieces whose reference is not covered by
the transformers parity tests: the v1 pixel shuffle of original checkpoints, the rope scaling types,
a truncated vision encoder (select_layer)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import internvl_jax
from internvl_jax.config import ConfigError, InternVLConfig
from internvl_jax.presets import preset_config
from internvl_jax.sharding import resolve_encoder_mode
from internvl_jax.vision import pixel_shuffle
from internvl_jax.weights import abstract_model
from tests.test_parity import convert_cli, make_inputs, relative_error
from tests.tiny_models import save_tiny_hf, tiny_hf_config


def hf_native(**changes):
    config = preset_config("InternVL3-1B")
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            config[section] = {**config[section], field: value}
        else:
            config[section] = value
    return config


def test_presets_parse_to_the_published_shapes():
    one_b = InternVLConfig.from_hf_config(preset_config("InternVL3-1B"))
    assert (one_b.text.hidden_size, one_b.text.num_layers, one_b.text.num_heads, one_b.text.num_kv_heads) == (
        896, 24, 14, 2)
    assert one_b.vision.layers_used == 24 and one_b.tokens_per_tile == 256 and one_b.image_token_id == 151667
    big = InternVLConfig.from_hf_config(preset_config("InternVL3-78B"))  # InternViT-6B + Qwen2.5-72B
    assert (big.vision.hidden_size, big.vision.layers_used, big.vision.num_heads, big.vision.qk_norm,
            big.vision.qkv_bias, big.vision.norm_type) == (3200, 45, 25, True, False, "rms_norm")
    assert (big.text.hidden_size, big.text.num_layers, big.text.num_heads, big.text.num_kv_heads,
            big.text.intermediate_size, big.text.vocab_size, big.vision.intermediate_size,
            big.projector.vision_hidden_size) == (8192, 80, 64, 8, 29568, 151674, 12800, 3200)
    _, state = nnx.split(abstract_model(big, jnp.bfloat16))
    assert sum(v.get_value().size for _, v in nnx.to_flat_state(state)) / 1e9 == pytest.approx(78.4, abs=0.1)
    # 25 heads: 'weights' falls back to 'data' at every tensor-parallel size but 1
    assert [resolve_encoder_mode(big, "weights", tp) for tp in (1, 2, 4, 8)] == ["weights", "data", "data", "data"]
    original = InternVLConfig.from_hf_config(preset_config("InternVL2-1B"))
    assert original.source_layout == "original" and original.projector.ps_version == "v2"
    assert (original.min_dynamic_patch, original.max_dynamic_patch, original.template) == (1, 12, "Hermes-2")


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}, "unsupported model"),
    ({"text_config__model_type": "gemma", "text_config__architectures": ["GemmaForCausalLM"]},
     "unsupported language model"),
    ({"text_config__hidden_act": "gelu"}, "hidden_act"),
    ({"vision_config__norm_type": "batch_norm"}, "norm_type"),
    ({"vision_config__hidden_act": "relu"}, "hidden_act"),
    ({"downsample_ratio": 0.3}, "downsample_ratio"),
    ({"vision_feature_layer": -30}, "out of range"),
    ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy"),
    ({"text_config__rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    ({"vision_config__image_size": [448, 224]}, "square"),
    ({"image_seq_length": 100}, "image_seq_length"),
])
def test_unsupported_values_name_the_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        InternVLConfig.from_hf_config(hf_native(**changes))


def test_original_layout_fields():
    config = preset_config("InternVL2-1B")
    config.update(select_layer=-2, ps_version="v1", max_dynamic_patch=6, force_image_size=448)
    parsed = InternVLConfig.from_hf_config(config)
    assert parsed.vision.layers_used == 23 and parsed.projector.ps_version == "v1"
    assert parsed.max_dynamic_patch == 6
    with pytest.raises(ConfigError, match="min_dynamic_patch"):
        InternVLConfig.from_hf_config({**config, "min_dynamic_patch": 8, "max_dynamic_patch": 2})


def test_our_config_round_trips(tmp_path):
    config = InternVLConfig.from_hf_config(preset_config("InternVL3-8B"))
    config.save(tmp_path)
    assert InternVLConfig.load(tmp_path) == config


@pytest.mark.parametrize("ps_version", ["v1", "v2"])
def test_pixel_shuffle_follows_the_reference_op_sequence(ps_version):
    """The reference (vLLM / OpenGVLab `pixel_shuffle`) written in torch, both versions."""
    x = torch.randn(2, 8, 8, 6)
    n, w, h, c = x.size()
    ref = x.view(n, w, int(h * 0.5), int(c / 0.5)).permute(0, 2, 1, 3).contiguous()
    ref = ref.view(n, int(h * 0.5), int(w * 0.5), int(c / 0.25))
    if ps_version != "v1":
        ref = ref.permute(0, 2, 1, 3).contiguous()
    ours = pixel_shuffle(jnp.asarray(x.numpy()), 2, ps_version)
    np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
}


@pytest.mark.parametrize("name", list(ROPE_SCALINGS))
def test_rope_scaling_types_match_transformers(tmp_path, name):
    config = tiny_hf_config("llama", "300m", text_config={"rope_parameters": ROPE_SCALINGS[name]})
    hf_dir = save_tiny_hf(tmp_path / "hf", config, seed=9)
    from transformers import InternVLForConditionalGeneration

    reference = InternVLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    model = internvl_jax.load(convert_cli(hf_dir, tmp_path / "converted"))
    assert model.config.text.rope.rope_type == name
    ids, _ = make_inputs(config, [], text_len=100)  # long enough for low frequencies to matter
    with torch.no_grad():
        ref = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert relative_error(model.forward(ids), ref) <= 1e-5


def test_truncated_vision_encoder_matches_select_layer(tmp_path):
    config = tiny_hf_config("qwen2", "300m", vision_feature_layer=-2)
    hf_dir = save_tiny_hf(tmp_path / "hf", config, seed=2)
    from transformers import InternVLForConditionalGeneration

    reference = InternVLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    model = internvl_jax.load(convert_cli(hf_dir, tmp_path / "converted"))
    assert model.config.vision.layers_used == 1
    ids, pixels = make_inputs(config, [2])
    with torch.no_grad():
        ref = reference(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels)).logits.numpy()
    assert relative_error(model.forward(ids, pixels), ref) <= 1e-5


def test_config_variants_are_dataclass_replacements():
    config = InternVLConfig()
    variant = dataclasses.replace(config, text=dataclasses.replace(config.text, num_layers=2))
    assert variant.text.num_layers == 2 and config.text.num_layers == 24
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.image_token_id = 1


def test_exact_gelu_follows_torch_in_float32_and_bfloat16():
    """torch computes a bf16 GELU as x/2 * (1 + erf(x/sqrt 2)) in float32 and rounds once; so do we (the
    erfc form of jax.nn.gelu with bf16 steps agreed on fewer than 60% of values)."""
    from internvl_jax.layers import activation

    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 4
    reference = torch.nn.functional.gelu(torch.tensor(x)).numpy()
    assert relative_error(np.asarray(activation("gelu", jnp.asarray(x))), reference) < 1e-6
    x_bf16 = torch.tensor(x).to(torch.bfloat16)
    reference = torch.nn.functional.gelu(x_bf16).float().numpy()
    ours = np.asarray(activation("gelu", jnp.asarray(x_bf16.float().numpy(), jnp.bfloat16)).astype(jnp.float32))
    assert np.mean(ours == reference) > 0.9  # the rest differ by erf's last float32 bits at a rounding edge
    assert np.all(np.abs(ours - reference) <= 2.0**-7 * np.abs(reference) + 1e-6)  # at most one bf16 step


def test_78b_preset_fits_eight_80gb_gpus_at_tp8():
    """Issue 7's big model: at TP=8 (encoder in 'data' mode, replicated) the bf16 weights per GPU leave
    room for a KV cache on an 80 GB H100; on one GPU the start-up stops with a clear error before
    allocating. Checked on the abstract model, nothing allocated."""
    from internvl_jax.sharding import make_mesh, param_shardings
    from internvl_jax.weights import bytes_per_device, check_fits

    config = InternVLConfig.from_hf_config(preset_config("InternVL3-78B"))

    def shardings_for(tp):
        mesh = make_mesh(1, tp)
        return lambda state: param_shardings(state, mesh, resolve_encoder_mode(config, "weights", tp))

    # text 72.7 B params / 8 (vocab 151,674 is not divisible by 8: embedding and lm_head replicated, 2.5 GB
    # each) + the 5.5 B-parameter encoder and the projector replicated (11.4 GB)
    assert 30e9 < bytes_per_device(config, jnp.bfloat16, shardings_for(8)) < 36e9

    class H100:  # what a CUDA device's memory_stats() reports (the CPU reports None: never checked)
        def memory_stats(self):
            return {"bytes_limit": 79 * 2**30}

    check_fits(config, jnp.bfloat16, shardings_for(8), [H100()])
    with pytest.raises(ValueError, match=r"146\.0 GiB per device.*raise --tensor-parallel-size"):
        check_fits(config, jnp.bfloat16, shardings_for(1), [H100()])


def test_odd_tile_batches_are_padded_and_the_padding_is_not_attended():
    """A 448 px tile is 1,025 tokens: at 1, 2 or 4 tiles the GEMMs' rows are not a multiple of 8 and the tower
    pads each tile to 1,032 tokens, masked out of the keys. A tile's features must not depend on that: encoded
    alone (padded) they equal its features among 8 tiles (not padded), here with heads and MLP split over 2
    devices. Unmasked padding (7 zero tokens among the keys) would change them."""
    from internvl_jax import sharding, weights
    from internvl_jax.presets import demo_config
    from internvl_jax.vision import token_padding

    assert [token_padding(batch, 1025) for batch in (1, 2, 4, 8, 16)] == [7, 7, 7, 0, 0]
    assert token_padding(3, 256) == 0 and token_padding(1, 65) == 7
    config = demo_config()
    assert config.vision.num_patches + 1 == 1025
    mesh = sharding.make_mesh(1, 2)
    model = weights.dummy_model(config, jnp.float32, lambda state: sharding.param_shardings(state, mesh, "weights"))
    rng = np.random.default_rng(1)
    for layer in model.vision.layers:  # non-zero biases: a padded query or key row is then not all zeros
        for projection in (layer.attn.q, layer.attn.k, layer.attn.v):
            bias = projection["bias"]
            bias.set_value(jax.device_put(rng.normal(size=bias[...].shape).astype(np.float32), bias[...].sharding))
    size = config.vision.image_size
    pixels = jnp.asarray(rng.normal(size=(8, 3, size, size)), jnp.float32)
    together = np.asarray(model.vision(pixels))
    assert together.shape == (8, 1025, config.vision.hidden_size)
    for batch in (1, 2, 4):
        alone = np.asarray(model.vision(pixels[:batch]))
        assert alone.shape == (batch, 1025, config.vision.hidden_size)
        np.testing.assert_allclose(alone, together[:batch], rtol=2e-5, atol=2e-5 * np.max(np.abs(together)))


def test_folding_the_layer_scales_keeps_the_vision_tower():
    """The serving form of InternViT multiplies ls1/ls2 into the out and fc2 weights (so XLA can put the residual
    add into the GEMM): same features, the scales become ones, two multiplies per layer fewer in the program,
    every weight keeps its sharding (here heads and MLP split over 2 devices), and a second fold changes
    nothing. The scales are random per channel, so a fold along the wrong axis would show."""
    from internvl_jax import sharding, weights
    from internvl_jax.presets import demo_config

    config = demo_config()
    mesh = sharding.make_mesh(1, 2)
    model = weights.dummy_model(config, jnp.float32, lambda state: sharding.param_shardings(state, mesh, "weights"))
    rng = np.random.default_rng(0)
    for layer in model.vision.layers:
        for scale in (layer.ls1, layer.ls2):
            scale.set_value(jax.device_put(rng.uniform(0.05, 2.0, scale[...].shape).astype(np.float32),
                                           scale[...].sharding))
        for bias in (layer.attn.out["bias"], layer.mlp["fc2"]["bias"]):
            bias.set_value(jax.device_put(rng.normal(size=bias[...].shape).astype(np.float32), bias[...].sharding))
    size = config.vision.image_size
    pixels = jnp.asarray(rng.normal(size=(2, 3, size, size)), jnp.float32)

    def multiplies(tower):
        return str(jax.make_jaxpr(lambda p: tower(p))(pixels)).count(" mul ")

    before, muls_before = np.asarray(model.vision(pixels)), multiplies(model.vision)
    shardings_before = [leaf.sharding for leaf in jax.tree.leaves(nnx.state(model.vision))]
    model.vision.fold_layer_scales()
    after = np.asarray(model.vision(pixels))
    assert np.max(np.abs(after - before)) <= 1e-5 * np.max(np.abs(before))
    assert multiplies(model.vision) == muls_before - 2 * len(model.vision.layers)
    assert [leaf.sharding for leaf in jax.tree.leaves(nnx.state(model.vision))] == shardings_before
    for layer in model.vision.layers:
        assert layer.layer_scale_folded
        assert np.all(np.asarray(layer.ls1[...]) == 1) and np.all(np.asarray(layer.ls2[...]) == 1)
    model.vision.fold_layer_scales()
    np.testing.assert_array_equal(np.asarray(model.vision(pixels)), after)
