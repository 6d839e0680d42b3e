"""The checkpoint converter (convert/): every layout and file format, checked three ways.

1. Output keys and shapes against the destination table, written out here from the spec.
2. Output values against a reference mapping of the torch state dict, also written out here, and the
   documented transforms against what the torch modules compute (conv flattening, head splits).
3. Every other layout / file format against the HF-native conversion, array-equal.
Then each kind of bad input, which must fail with a message naming the problem and leave nothing at DST.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from convert import ConversionError, convert, iter_converted, parameter_shapes, plan_conversion
from convert.__main__ import main
from convert.make_synthetic import write_synthetic
from internvl_jax.config import CONFIG_FILE, WEIGHTS_FILE, InternVLConfig
from internvl_jax.tokenizer import special_token_ids
from tests.tiny_models import (
    load_hf_state_dict,
    save_tiny_hf,
    tiny_hf_config,
    write_hf_layout,
    write_original_layout,
)

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "qwen2": {"text": "qwen2", "vision": "300m"},
    "qwen3_6b": {"text": "qwen3", "vision": "6b"},
    "llama_tied": {"text": "llama", "vision": "300m", "tie": True},
    # Two vision layers, the projector fed from the first: layer 1 must be dropped, not reported.
    "llama_6b_select": {"text": "llama", "vision": "6b", "vision_feature_layer": -2},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny")
    return {name: save_tiny_hf(base / name, tiny_hf_config(**kwargs)) for name, kwargs in VARIANTS.items()}


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> dict[str, tuple[InternVLConfig, dict[str, np.ndarray]]]:
    """Each variant converted from its save_pretrained directory: what every other layout must match."""
    base = tmp_path_factory.mktemp("reference")
    out = {}
    for name, source in tiny.items():
        config = convert(source, base / name, progress=False)
        out[name] = (config, load_file(str(base / name / WEIGHTS_FILE)))
    return out


def hf_config(directory: Path) -> transformers.InternVLConfig:
    return transformers.InternVLConfig.from_pretrained(str(directory))


# ---- the spec, written out independently of convert/tables.py ------------------------------------


def expected_shapes(hf: transformers.InternVLConfig) -> dict[str, tuple[int, ...]]:
    """The destination table of the brief, for a transformers config."""
    v, t = hf.vision_config, hf.text_config
    d, n, f, p = v.hidden_size, v.num_attention_heads, v.intermediate_size, v.patch_size[0]
    hd, g = d // n, v.image_size[0] // p
    e, nq, nk, i, vocab = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size, t.vocab_size
    ht = getattr(t, "head_dim", None) or e // nq
    feature_layer = hf.vision_feature_layer
    layers = v.num_hidden_layers + feature_layer + 1 if feature_layer < 0 else feature_layer
    layer_norm = v.norm_type == "layer_norm"
    shapes = {"vision.embeddings.patch.kernel": (3 * p * p, d), "vision.embeddings.patch.bias": (d,),
              "vision.embeddings.cls": (d,), "vision.embeddings.position": (1 + g * g, d)}
    for layer in range(layers):
        a = f"vision.layers.{layer}."
        shapes |= {a + "norm1.scale": (d,), **{a + f"attn.{x}.kernel": (d, n, hd) for x in "qkv"},
                   a + "attn.out.kernel": (n, hd, d),
                   a + "attn.out.bias": (d,), a + "ls1": (d,), a + "ls2": (d,), a + "norm2.scale": (d,),
                   a + "mlp.fc1.kernel": (d, f), a + "mlp.fc1.bias": (f,), a + "mlp.fc2.kernel": (f, d),
                   a + "mlp.fc2.bias": (d,)}
        if layer_norm:
            shapes |= {a + "norm1.bias": (d,), a + "norm2.bias": (d,)}
        if v.attention_bias:
            shapes |= {a + f"attn.{x}.bias": (n, hd) for x in "qkv"}
        if v.use_qk_norm:
            shapes |= {a + "attn.q_norm.scale": (d,), a + "attn.k_norm.scale": (d,)}
    shapes |= {"projector.norm.scale": (4 * d,), "projector.norm.bias": (4 * d,), "projector.fc1.kernel": (4 * d, e),
               "projector.fc1.bias": (e,), "projector.fc2.kernel": (e, e), "projector.fc2.bias": (e,),
               "text.embed.embedding": (vocab, e), "text.final_norm.scale": (e,)}
    qkv_bias = t.model_type == "qwen2" or getattr(t, "attention_bias", False)
    for layer in range(t.num_hidden_layers):
        a = f"text.layers.{layer}."
        shapes |= {a + "input_norm.scale": (e,), a + "attn.q.kernel": (e, nq, ht), a + "attn.k.kernel": (e, nk, ht),
                   a + "attn.v.kernel": (e, nk, ht), a + "attn.o.kernel": (nq, ht, e),
                   a + "post_attn_norm.scale": (e,), a + "mlp.gate.kernel": (e, i), a + "mlp.up.kernel": (e, i),
                   a + "mlp.down.kernel": (i, e)}
        if qkv_bias:
            shapes |= {a + "attn.q.bias": (nq, ht), a + "attn.k.bias": (nk, ht), a + "attn.v.bias": (nk, ht)}
        if t.model_type == "qwen3":
            shapes |= {a + "attn.q_norm.scale": (ht,), a + "attn.k_norm.scale": (ht,)}
    if not hf.tie_word_embeddings:
        shapes["text.lm_head.kernel"] = (e, vocab)
    return shapes


def reference_params(state: dict[str, torch.Tensor], hf: transformers.InternVLConfig) -> dict[str, np.ndarray]:
    """The documented transforms applied to the torch state dict ("model" prefixes)."""
    sd = {k: t.numpy() for k, t in state.items()}
    shapes = expected_shapes(hf)
    out = {}
    for path, shape in shapes.items():
        parts = path.split(".")
        if parts[0] == "vision" and parts[1] == "embeddings":
            src = {"patch": "model.vision_tower.embeddings.patch_embeddings.projection.",
                   "cls": "model.vision_tower.embeddings.cls_token",
                   "position": "model.vision_tower.embeddings.position_embeddings"}[parts[2]]
            if parts[2] == "patch":
                w = sd[src + parts[3].replace("kernel", "weight")]
                out[path] = w.reshape(w.shape[0], -1).T if parts[3] == "kernel" else w
            else:
                out[path] = sd[src].reshape(shape)
        elif parts[0] == "vision":
            a = f"model.vision_tower.encoder.layer.{parts[2]}."
            name = ".".join(parts[3:])
            if parts[3] == "attn" and parts[4] in ("q", "k", "v"):
                source = sd[a + f"attention.{parts[4]}_proj.{'weight' if parts[5] == 'kernel' else 'bias'}"]
                out[path] = (source.T if source.ndim == 2 else source).reshape(shape)
            elif name == "attn.out.kernel":
                out[path] = sd[a + "attention.projection_layer.weight"].T.reshape(shape)
            elif name.endswith("kernel"):
                out[path] = sd[a + name.replace("kernel", "weight")].T
            else:
                source = {"norm1.scale": "layernorm_before.weight", "norm1.bias": "layernorm_before.bias",
                          "norm2.scale": "layernorm_after.weight", "norm2.bias": "layernorm_after.bias",
                          "ls1": "lambda_1", "ls2": "lambda_2", "attn.out.bias": "attention.projection_layer.bias",
                          "attn.q_norm.scale": "attention.q_norm.weight",
                          "attn.k_norm.scale": "attention.k_norm.weight"}.get(name, name)
                out[path] = sd[a + source]
        elif parts[0] == "projector":
            module = {"norm": "layer_norm", "fc1": "linear_1", "fc2": "linear_2"}[parts[1]]
            w = sd[f"model.multi_modal_projector.{module}.{'bias' if parts[2] == 'bias' else 'weight'}"]
            out[path] = w.T if parts[2] == "kernel" else w
        elif path == "text.embed.embedding":
            out[path] = sd["model.language_model.embed_tokens.weight"]
        elif path == "text.final_norm.scale":
            out[path] = sd["model.language_model.norm.weight"]
        elif path == "text.lm_head.kernel":
            out[path] = sd["lm_head.weight"].T
        else:
            a = f"model.language_model.layers.{parts[2]}."
            name = ".".join(parts[3:])
            modules = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
                       "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
                       "mlp.down": "mlp.down_proj", "attn.q_norm": "self_attn.q_norm",
                       "attn.k_norm": "self_attn.k_norm", "input_norm": "input_layernorm",
                       "post_attn_norm": "post_attention_layernorm"}
            module, kind = name.rsplit(".", 1)
            w = sd[a + modules[module] + (".bias" if kind == "bias" else ".weight")]
            out[path] = w.T.reshape(shape) if kind == "kernel" else w.reshape(shape)
    return out


def assert_same_params(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    wrong = [k for k in want if got[k].shape != want[k].shape or not np.array_equal(got[k], want[k])]
    assert not wrong, f"{len(wrong)} tensors differ: {wrong[:10]}"


# ---- conversion of each variant ------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cli_converts_each_variant(variant, tiny, tmp_path):
    source, target = tiny[variant], tmp_path / "converted"
    assert main([str(source), str(target), "--quiet"]) == 0
    params = load_file(str(target / WEIGHTS_FILE))
    hf = hf_config(source)

    assert {k: v.shape for k, v in params.items()} == expected_shapes(hf)
    assert_same_params(params, reference_params(load_hf_state_dict(source), hf))
    with safe_open(str(target / WEIGHTS_FILE), framework="numpy") as file:
        assert {file.get_slice(k).get_dtype() for k in file.keys()} == {"F32"}  # noqa: SIM118
    if hf.tie_word_embeddings:
        assert "text.lm_head.kernel" not in params

    config = InternVLConfig.load(target)
    source_config = InternVLConfig.from_pretrained(source)
    assert (config.vision, config.projector, config.text) == (source_config.vision, source_config.projector,
                                                              source_config.text)
    assert parameter_shapes(config) == {k: v.shape for k, v in params.items()}
    specials = special_token_ids(hf.text_config.vocab_size)
    assert config.image_token_id == specials["<IMG_CONTEXT>"] == hf.image_token_id
    assert config.eos_token_ids == (specials["<|im_end|>"],)
    assert config.dtype == "float32" and config.source_layout == "hf"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (target / name).read_bytes() == (source / name).read_bytes()
    assert (target / "source_config.json").read_bytes() == (source / "config.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no staging directory left


def test_vision_layers_past_select_layer_are_dropped_not_reported(tiny, reference):
    plan = plan_conversion(tiny["llama_6b_select"])
    plan.close()
    assert plan.config.vision.layers_used == 1
    assert plan.dropped and all(key.startswith("vision_tower.encoder.layer.1.") for key in plan.dropped)
    assert not any(k.startswith("vision.layers.1.") for k in reference["llama_6b_select"][1])


@pytest.mark.parametrize("variant", ["qwen2", "qwen3_6b"])
def test_documented_transforms_compute_what_the_torch_modules_compute(variant, tiny, reference):
    """Conv flattening order, the q | k | v axis and head split, transposes: checked by running the torch
    modules and the einsums our model uses on the converted kernels."""
    model = transformers.InternVLForConditionalGeneration.from_pretrained(str(tiny[variant])).eval()
    params = reference[variant][1]
    vision, text = model.model.vision_tower, model.model.language_model
    rng = np.random.default_rng(0)
    close = {"rtol": 1e-5, "atol": 1e-5}

    def torch_apply(module, x):
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    # Patch embedding: patches flattened as (channel, row, column), times the kernel.
    cfg = model.config.vision_config
    p, g, d = cfg.patch_size[0], cfg.image_size[0] // cfg.patch_size[0], cfg.hidden_size
    pixels = rng.standard_normal((1, 3, g * p, g * p), dtype=np.float32)
    want = torch_apply(vision.embeddings.patch_embeddings.projection, pixels)[0].transpose(1, 2, 0).reshape(g * g, d)
    patches = pixels[0].reshape(3, g, p, g, p).transpose(1, 3, 0, 2, 4).reshape(g * g, 3 * p * p)
    got = patches @ params["vision.embeddings.patch.kernel"] + params["vision.embeddings.patch.bias"]
    np.testing.assert_allclose(got, want, **close)

    # Vision attention: q, k, v kernels [D, N, Hd] give q, k, v per head; out kernel [N, Hd, D].
    attention = vision.encoder.layer[0].attention
    n = cfg.num_attention_heads
    h = rng.standard_normal((5, d), dtype=np.float32)
    for x, module in zip("qkv", (attention.q_proj, attention.k_proj, attention.v_proj), strict=True):
        got = np.einsum("td,dnh->tnh", h, params[f"vision.layers.0.attn.{x}.kernel"])
        if f"vision.layers.0.attn.{x}.bias" in params:
            got = got + params[f"vision.layers.0.attn.{x}.bias"]
        np.testing.assert_allclose(got, torch_apply(module, h).reshape(5, n, d // n), **close)
    heads = rng.standard_normal((5, n, d // n), dtype=np.float32)
    got = np.einsum("tnh,nhd->td", heads, params["vision.layers.0.attn.out.kernel"]) + params[
        "vision.layers.0.attn.out.bias"]
    np.testing.assert_allclose(got, torch_apply(attention.projection_layer, heads.reshape(5, d)), **close)
    mlp = vision.encoder.layer[0].mlp
    got = h @ params["vision.layers.0.mlp.fc1.kernel"] + params["vision.layers.0.mlp.fc1.bias"]
    np.testing.assert_allclose(got, torch_apply(mlp.fc1, h), **close)

    # Projector.
    projector = model.model.multi_modal_projector
    x = rng.standard_normal((3, 4 * d), dtype=np.float32)
    got = x @ params["projector.fc1.kernel"] + params["projector.fc1.bias"]
    np.testing.assert_allclose(got, torch_apply(projector.linear_1, x), **close)

    # Text attention: q [E, Nq, Ht], k / v [E, Nk, Ht], o [Nq, Ht, E]; MLP and lm_head.
    layer = text.layers[0]
    t = model.config.text_config
    e, ht = t.hidden_size, layer.self_attn.head_dim
    x = rng.standard_normal((4, e), dtype=np.float32)
    for name in ("q", "k", "v"):
        got = np.einsum("te,enh->tnh", x, params[f"text.layers.0.attn.{name}.kernel"])
        if f"text.layers.0.attn.{name}.bias" in params:
            got = got + params[f"text.layers.0.attn.{name}.bias"]
        module = getattr(layer.self_attn, f"{name}_proj")
        np.testing.assert_allclose(got, torch_apply(module, x).reshape(4, -1, ht), **close)
    heads = rng.standard_normal((4, t.num_attention_heads, ht), dtype=np.float32)
    got = np.einsum("tnh,nhe->te", heads, params["text.layers.0.attn.o.kernel"])
    np.testing.assert_allclose(got, torch_apply(layer.self_attn.o_proj, heads.reshape(4, -1)), **close)
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj")):
        got = x @ params[f"text.layers.0.mlp.{ours}.kernel"]
        np.testing.assert_allclose(got, torch_apply(getattr(layer.mlp, theirs), x), **close)
    np.testing.assert_allclose(x @ params["text.lm_head.kernel"], torch_apply(model.lm_head, x), **close)


# ---- every layout and file format gives the same weights -----------------------------------------

LAYOUT_CASES = {
    "hf-model-prefixes": ("qwen2", lambda s, d: write_hf_layout(s, d, prefixes="model")),
    "hf-model-prefixes-3-shards": ("qwen3_6b", lambda s, d: write_hf_layout(s, d, prefixes="model", shards=3)),
    "hf-legacy-bin-2-shards": ("qwen2", lambda s, d: write_hf_layout(s, d, prefixes="legacy", shards=2,
                                                                      bin_format=True)),
    "original": ("qwen2", lambda s, d: write_original_layout(s, d)),
    "original-3-shards": ("qwen2", lambda s, d: write_original_layout(s, d, shards=3)),
    "original-6b-bin": ("qwen3_6b", lambda s, d: write_original_layout(s, d, bin_format=True)),
    "original-6b-bin-2-shards": ("llama_6b_select", lambda s, d: write_original_layout(s, d, bin_format=True,
                                                                                      shards=2)),
    "original-internlm2-tied": ("llama_tied", lambda s, d: write_original_layout(s, d, internlm2=True)),
    "original-internlm2-2-shards": ("llama_6b_select", lambda s, d: write_original_layout(s, d, internlm2=True,
                                                                                         shards=2)),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_every_layout_converts_to_the_same_weights(case, tiny, reference, tmp_path):
    variant, write = LAYOUT_CASES[case]
    source = write(tiny[variant], tmp_path / "source")
    config = convert(source, tmp_path / "converted", progress=False)
    want_config, want = reference[variant]
    assert_same_params(load_file(str(tmp_path / "converted" / WEIGHTS_FILE)), want)
    assert (config.vision, config.projector, config.text) == (want_config.vision, want_config.projector,
                                                              want_config.text)
    # The original layout has no image token id: it must come from the tokenizer files.
    assert config.image_token_id == want_config.image_token_id
    assert config.eos_token_ids == want_config.eos_token_ids
    assert config.source_layout == ("original" if case.startswith("original") else "hf")
    if case.startswith("original"):
        assert config.template == "internvl2_5"
        assert json.loads((source / "config.json").read_text())["model_type"] == "internvl_chat"


def test_internlm2_wqkv_is_really_grouped(tiny, tmp_path):
    """The InternLM2 helper must write the grouped rows (not q | k | v), or the test above proves nothing."""
    source = write_original_layout(tiny["llama_6b_select"], tmp_path / "internlm2", internlm2=True)
    wqkv = load_file(str(source / "model.safetensors"))["language_model.model.layers.0.attention.wqkv.weight"]
    state = load_hf_state_dict(tiny["llama_6b_select"])
    q = state["model.language_model.layers.0.self_attn.q_proj.weight"].numpy()
    k = state["model.language_model.layers.0.self_attn.k_proj.weight"].numpy()
    ht, group = 16, 2  # 4 query heads over 2 KV heads
    np.testing.assert_array_equal(wqkv[: group * ht], q[: group * ht])  # group 0's query heads first
    np.testing.assert_array_equal(wqkv[group * ht: (group + 1) * ht], k[:ht])  # then KV head 0's key
    assert not np.array_equal(wqkv[group * ht: 2 * group * ht], q[group * ht: 2 * group * ht])


def test_iter_converted_matches_the_written_file(tiny, reference):
    config, tensors = iter_converted(tiny["qwen3_6b"])
    assert config == reference["qwen3_6b"][0]
    assert_same_params(dict(tensors), reference["qwen3_6b"][1])


# ---- dtypes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "numpy_dtype", "name"), [("bfloat16", ml_dtypes.bfloat16, "BF16"),
                                                            ("float16", np.float16, "F16")])
def test_dtype_option(dtype, numpy_dtype, name, tiny, reference, tmp_path):
    assert main([str(tiny["qwen2"]), str(tmp_path / "out"), "--dtype", dtype, "--quiet"]) == 0
    params = load_file(str(tmp_path / "out" / WEIGHTS_FILE))
    with safe_open(str(tmp_path / "out" / WEIGHTS_FILE), framework="numpy") as file:
        assert {file.get_slice(k).get_dtype() for k in file.keys()} == {name}  # noqa: SIM118
    want = {k: v.astype(numpy_dtype) for k, v in reference["qwen2"][1].items()}
    assert_same_params(params, want)
    assert InternVLConfig.load(tmp_path / "out").dtype == dtype


# ---- bad input -----------------------------------------------------------------------------------


def _edit_tensors(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def _truncate(d: Path) -> None:
    path = d / "model.safetensors"
    os.truncate(path, path.stat().st_size - 1000)


def _transpose_fc1(t):
    key = "vision_tower.encoder.layer.0.mlp.fc1.weight"
    t[key] = np.ascontiguousarray(t[key].T)


def _several_problems(t):
    t["vision_tower.encoder.layer.0.attention.extra.weight"] = np.zeros(3, np.float32)
    del t["language_model.model.layers.1.mlp.up_proj.weight"]
    t["multi_modal_projector.linear_2.bias"] = np.zeros(7, np.float32)


def _many_extra_keys(t):
    for n in range(30):
        t[f"language_model.model.extra.{n:02d}"] = np.zeros(1, np.float32)


def _untied_lm_head(t):
    t["language_model.lm_head.weight"] = t["language_model.model.embed_tokens.weight"] + 1


def _write_garbage_bin(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not a zip archive" * 100)


BAD_INPUTS = {
    # name: (variant, layout writer or None, mutation, substrings the message must contain)
    "truncated-safetensors": ("qwen2", None, _truncate, ["model.safetensors", "truncated"]),
    "missing-shard": ("qwen2", lambda s, d: write_hf_layout(s, d, shards=3),
                      lambda d: (d / "model-00002-of-00003.safetensors").unlink(),
                      ["missing", "model-00002-of-00003.safetensors"]),
    "unknown-architecture": ("qwen2", None,
                             lambda d: _edit_config(d, lambda c: c.update(model_type="llava",
                                                                          architectures=["LlavaForConditional"])),
                             ["config.json", "unsupported model", "llava"]),
    "unknown-text-architecture": ("qwen2", None,
                                  lambda d: _edit_config(d, lambda c: c["text_config"].update(model_type="gemma")),
                                  ["unsupported language model", "gemma"]),
    "shape-mismatch": ("qwen2", None, lambda d: _edit_tensors(d, _transpose_fc1),
                       ["1 tensors whose shape differs", "vision_tower.encoder.layer.0.mlp.fc1.weight",
                        "checkpoint [32, 80], config implies [80, 32] (F, D)"]),
    "unmapped-key": ("qwen2", None,
                     lambda d: _edit_tensors(d, lambda t: t.update({"vision_tower.extra.weight": np.zeros(2)})),
                     ["1 unmapped tensors", "vision_tower.extra.weight"]),
    "vision-layer-beyond-config": ("qwen2", None, lambda d: _edit_tensors(d, lambda t: t.update(
        {"vision_tower.encoder.layer.2.lambda_1": np.zeros(32, np.float32)})),
        ["unmapped", "vision_tower.encoder.layer.2.lambda_1"]),
    "missing-key": ("qwen2", None,
                    lambda d: _edit_tensors(d, lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight")),
                    ["1 missing tensors", "language_model.model.layers.1.mlp.up_proj.weight"]),
    "several-problems-one-message": ("qwen2", None, lambda d: _edit_tensors(d, _several_problems),
                                     ["missing", "layers.1.mlp.up_proj.weight", "unmapped",
                                      "layer.0.attention.extra.weight", "shape differs", "linear_2.bias"]),
    "capped-list": ("qwen2", None, lambda d: _edit_tensors(d, _many_extra_keys),
                    ["30 unmapped", "extra.19", "... and 10 more"]),
    "tied-but-lm-head-differs": ("llama_tied", None, lambda d: _edit_tensors(d, _untied_lm_head),
                                 ["tie_word_embeddings", "lm_head weight differs"]),
    "original-without-image-token": ("qwen2", lambda s, d: write_original_layout(s, d),
                                     lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
                                     ["<IMG_CONTEXT>", "tokenizer.json"]),
    "config-and-weights-disagree": ("qwen2", None,
                                    lambda d: shutil.copyfile(write_original_layout(d, d.parent / "orig") /
                                                              "config.json", d / "config.json"),
                                    ["describes the 'original' layout", "older prefixes"]),
    "no-weights": ("qwen2", None, lambda d: (d / "model.safetensors").unlink(), ["no weights found"]),
    "corrupt-bin": ("qwen2", None, _write_garbage_bin, ["pytorch_model.bin", "cannot load PyTorch checkpoint"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_with_a_clear_message_and_leaves_nothing(case, tiny, tmp_path, capsys):
    variant, layout, mutate, needles = BAD_INPUTS[case]
    source = tmp_path / "source"
    if layout:
        layout(tiny[variant], source)
    else:
        shutil.copytree(tiny[variant], source)
    mutate(source)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    capsys.readouterr()
    assert main([str(source), str(out_parent / "converted"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ")
    for needle in needles:
        assert needle in error, f"{needle!r} not in:\n{error}"
    assert list(out_parent.iterdir()) == []  # neither DST nor a staging directory


def test_float16_overflow_fails_midway_and_leaves_nothing(tiny, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(tiny["qwen2"], source)
    _edit_tensors(source, lambda t: t["language_model.model.norm.weight"].__setitem__(0, 1e6))
    with pytest.raises(ConversionError, match="text.final_norm.scale .* outside the float16 range"):
        convert(source, tmp_path / "out" / "converted", dtype="float16", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_dst_is_refused_unless_overwrite(tiny, tmp_path, capsys):
    target = tmp_path / "converted"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert main([str(tiny["qwen2"]), str(target), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (target / "keep.txt").read_text() == "mine"
    assert main([str(tiny["qwen2"]), str(target), "--quiet", "--overwrite", "--dtype", "bfloat16"]) == 0
    assert not (target / "keep.txt").exists()
    assert InternVLConfig.load(target).dtype == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]
    with pytest.raises(ConversionError, match="holds the source checkpoint"):
        convert(tiny["qwen2"], tiny["qwen2"], overwrite=True, progress=False)


def test_python_dash_m_entrypoint(tiny, tmp_path):
    """The real command line: exit 0 and a converted directory; exit 2 and `error:` without a traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "convert", str(tiny["qwen2"]), str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / WEIGHTS_FILE).is_file() and (tmp_path / "out" / CONFIG_FILE).is_file()
    assert "converted" in done.stderr  # progress bar and summary go to stderr
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr


# ---- streaming -----------------------------------------------------------------------------------

_MEASURE = """
import json, sys
import convert
def high_water_kb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
before = high_water_kb()
convert.convert(sys.argv[1], sys.argv[2], progress=False)
print(json.dumps({"before_kb": before, "after_kb": high_water_kb()}))
"""


def test_conversion_streams_instead_of_loading_the_checkpoint(tmp_path):
    """Peak RSS while converting a 66 MB bf16 checkpoint (2 shards, largest tensor 4 MB) must stay far below
    the checkpoint size: loading it whole, or mapping it all, would add at least 66 MB. The full-size
    measurement (InternVL3-1B shapes) is in docs/CONVERT.md."""
    source = write_synthetic(tmp_path / "synthetic", preset="small", shards=2)
    checkpoint_kb = sum(p.stat().st_size for p in source.glob("*.safetensors")) / 1024
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(source), str(tmp_path / "out")], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    assert rss["after_kb"] - rss["before_kb"] < 0.3 * checkpoint_kb, (rss, checkpoint_kb)

    # The default dtype is the checkpoint's (bf16), and the values went through.
    with safe_open(str(tmp_path / "out" / WEIGHTS_FILE), framework="numpy") as file:
        lm_head = file.get_tensor("text.lm_head.kernel")
    with safe_open(str(source / "model-00002-of-00002.safetensors"), framework="numpy") as file:
        assert lm_head.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(lm_head, file.get_tensor("lm_head.weight").T)


def test_weights_of_the_fused_vision_qkv_layout_are_refused_with_the_fix():
    """Conversions made before the vision tower's q, k and v became separate weights hold `attn.qkv.*`: loading
    them names the missing and unexpected weights and says to convert again."""
    import jax.numpy as jnp
    from flax import nnx

    from internvl_jax import weights
    from internvl_jax.presets import demo_config

    config = demo_config()
    model = weights.dummy_model(config, jnp.float32)
    arrays = {weights.path_name(path): np.asarray(var.get_value())
              for path, var in nnx.to_flat_state(nnx.state(model))}
    assert weights.load_arrays(config, arrays, jnp.float32) is not None
    old = dict(arrays)
    for layer in range(len(model.vision.layers)):
        prefix = f"vision.layers.{layer}.attn."
        old[prefix + "qkv.kernel"] = np.stack([old.pop(prefix + f"{x}.kernel") for x in "qkv"], axis=1)
        old[prefix + "qkv.bias"] = np.stack([old.pop(prefix + f"{x}.bias") for x in "qkv"])
    with pytest.raises(weights.WeightsError) as error:
        weights.load_arrays(config, old, jnp.float32)
    message = str(error.value)
    assert "missing weight vision.layers.0.attn.q.kernel" in message
    assert "unexpected weight vision.layers.0.attn.qkv.kernel" in message
    assert "python -m convert" in message
