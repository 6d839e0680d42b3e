"""Tiny random InternVL checkpoints for tests, in every layout the converter reads.

Stable API (used by several test files; import as `from tests.tiny_models import ...`, the repository
root is on pytest's pythonpath):

    tiny_hf_config(text="qwen2"|"qwen3"|"llama", vision="300m"|"6b", tie=False, **overrides)
        -> transformers.InternVLConfig
    build_tiny_hf(config, seed=0) -> InternVLForConditionalGeneration   (float32, eval mode)
    save_tiny_hf(directory, config, seed=0, tokenizer=True) -> Path
        `save_pretrained` output (transformers 5.24 writes the OLDER prefixes vision_tower.*,
        multi_modal_projector.*, language_model.model.*, language_model.lm_head.*), plus the synthetic
        tokenizer of internvl_jax.tokenizer and a generation_config.json that stops on <|im_end|>.
    write_hf_layout(hf_dir, dst_dir, *, prefixes="model"|"legacy", shards=1, bin_format=False) -> Path
        The same weights under the transformers >= 4.52 prefixes ("model": model.vision_tower.*, ...,
        lm_head.*) or the older ones ("legacy"), optionally sharded and/or as PyTorch .bin.
    write_original_layout(hf_dir, dst_dir, *, internlm2=False, bin_format=False, shards=1) -> Path
        The same weights in the original OpenGVLab InternVLChatModel layout (fused qkv, mlp1.0/1/3,
        language_model.model.*), with internlm2=True as an InternLM2 decoder (grouped wqkv, ...).
    load_hf_state_dict(directory) -> dict[str, torch.Tensor]
        Any of the HF-native directories above, keys under the "model" prefixes.

Sizes: vision D=32, 2 layers, 4 heads (Hd 8), F=80, image 64 / patch 8 (8x8 grid, 16 tokens per tile
after the pixel shuffle); text E=64, 2 layers, 4 / 2 heads, head dim 16 (Qwen3: 12, so that head_dim
differs from E / heads), I=96, vocab 320, image_token_id = vocab - 7 (`<IMG_CONTEXT>` of the synthetic
tokenizer), rope_theta 10000. The sizes all differ so that a transposed or mis-split weight changes shape.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

VOCAB_SIZE = 320
IMAGE_TOKEN_OFFSET = 7  # <IMG_CONTEXT> sits 7 ids below the top, as 151667 in InternVL3's 151674
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
)

_VISION = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 80,
    "image_size": 64, "patch_size": 8, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
}
_VISION_STYLES = {
    "300m": {"norm_type": "layer_norm", "attention_bias": True, "use_qk_norm": False},
    "6b": {"norm_type": "rms_norm", "attention_bias": False, "use_qk_norm": True},
}
_TEXT = {
    "vocab_size": VOCAB_SIZE, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 96, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048, "hidden_act": "silu",
}
_TEXT_STYLES = {
    "qwen2": {"model_type": "qwen2"},
    "qwen3": {"model_type": "qwen3", "head_dim": 12},
    "llama": {"model_type": "llama", "head_dim": 16},
}


def tiny_hf_config(text: str = "qwen2", vision: str = "300m", tie: bool = False,
                   **overrides: Any) -> transformers.InternVLConfig:
    """A tiny `transformers.InternVLConfig`. `overrides` are top-level fields (e.g.
    `vision_feature_layer=-2`), except `vision_config` / `text_config` dicts, merged into the defaults."""
    vision_config = {**_VISION, **_VISION_STYLES[vision], **overrides.pop("vision_config", {})}
    text_config = {**_TEXT, **_TEXT_STYLES[text], "tie_word_embeddings": tie, **overrides.pop("text_config", {})}
    vocab = text_config["vocab_size"]
    # The chat turn ends with <|im_end|>: a converted config then carries the stop token a server needs.
    text_config.setdefault("eos_token_id", _im_end_id(vocab))
    grid = vision_config["image_size"] // vision_config["patch_size"]
    fields = {
        "image_token_id": vocab - IMAGE_TOKEN_OFFSET,
        "image_seq_length": grid * grid // 4,
        "downsample_ratio": 0.5,
        "vision_feature_layer": -1,
        "tie_word_embeddings": tie,
        **overrides,
    }
    return transformers.InternVLConfig(vision_config=vision_config, text_config=text_config, **fields)


def build_tiny_hf(config: transformers.InternVLConfig, seed: int = 0) -> transformers.InternVLForConditionalGeneration:
    """Random float32 model. Parameters still at a constant init (norm weights 1, biases 0, layer scale
    0.1, cls token 0) get noise, so that a swapped or dropped weight cannot hide behind equal values."""
    torch.manual_seed(seed)
    model = transformers.InternVLForConditionalGeneration(config).to(torch.float32).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, parameter in model.named_parameters():  # tied weights appear once
            flat = parameter.reshape(-1)
            if bool((flat == flat[0]).all()):
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def save_tiny_hf(directory: str | Path, config: transformers.InternVLConfig, seed: int = 0,
                 tokenizer: bool = True) -> Path:
    directory = Path(directory)
    model = build_tiny_hf(config, seed)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(str(directory))
    if tokenizer:
        from internvl_jax.tokenizer import make_tokenizer, save_tokenizer

        save_tokenizer(make_tokenizer(config.text_config.vocab_size), directory)
    return directory


def save_converted_tiny(root: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny Qwen2 InternVL (300M-style vision) saved as an HF checkpoint under root/hf and converted with
    the `python -m convert` CLI into root/converted. Returns (hf_dir, converted_dir)."""
    import subprocess
    import sys

    root = Path(root)
    hf_dir = save_tiny_hf(root / "hf", tiny_hf_config("qwen2", "300m"), seed=seed)
    converted = root / "converted"
    result = subprocess.run([sys.executable, "-m", "convert", str(hf_dir), str(converted), "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return hf_dir, converted


def _im_end_id(vocab_size: int) -> int:
    from internvl_jax.tokenizer import special_token_ids

    return special_token_ids(vocab_size)["<|im_end|>"]


# ---- reading and writing state dicts -------------------------------------------------------------

_LEGACY_TO_MODEL = (  # older HF-native prefix -> transformers >= 4.52 prefix (first match wins)
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", _load_bin)):
        if (directory / index_name).is_file():
            shards = sorted(set(json.loads((directory / index_name).read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in loader(str(directory / shard)).items()}
    if (directory / "model.safetensors").is_file():
        return load_file(str(directory / "model.safetensors"))
    return _load_bin(str(directory / "pytorch_model.bin"))


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_hf_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """The weights of an HF-native directory (either prefix set), keyed by the "model" prefixes."""
    state = {}
    for key, tensor in _read_tensors(Path(directory)).items():
        for old, new in _LEGACY_TO_MODEL:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        state[key] = tensor
    return state


def _write_tensors(directory: Path, tensors: dict[str, torch.Tensor], shards: int, bin_format: bool) -> None:
    """Writes `tensors` as one file or `shards` files of about equal size, with an index, like save_pretrained."""
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}  # no shared storage
    names = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    written = 0
    for name in names:  # split by bytes, in order, so that a layer's q / k / v may straddle two shards
        groups[min(shards - 1, written * shards // total)].append(name)
        written += tensors[name].numel() * tensors[name].element_size()
    stem, suffix = ("pytorch_model", ".bin") if bin_format else ("model", ".safetensors")
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file_name = f"{stem}{suffix}" if shards == 1 else f"{stem}-{number:05d}-of-{shards:05d}{suffix}"
        part = {name: tensors[name] for name in group}
        if bin_format:
            torch.save(part, directory / file_name)  # zip format, so the converter can mmap it
        else:
            save_file(part, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file_name))
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / f"{stem}{suffix}.index.json").write_text(json.dumps(index, indent=2))


def _copy_tokenizer_files(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def write_hf_layout(hf_dir: str | Path, dst_dir: str | Path, *, prefixes: str = "model", shards: int = 1,
                    bin_format: bool = False) -> Path:
    """Rewrites an HF-native directory with the "model" (>= 4.52) or "legacy" prefixes."""
    source, target = Path(hf_dir), Path(dst_dir)
    target.mkdir(parents=True, exist_ok=True)
    state = load_hf_state_dict(source)
    if prefixes == "legacy":
        renamed = {}
        for key, tensor in state.items():
            for old, new in _LEGACY_TO_MODEL:
                if key.startswith(new):
                    key = old + key[len(new):]
                    break
            renamed[key] = tensor
        state = renamed
    elif prefixes != "model":
        raise ValueError(f"prefixes={prefixes!r}: expected 'model' or 'legacy'")
    _write_tensors(target, state, shards, bin_format)
    shutil.copyfile(source / "config.json", target / "config.json")
    _copy_tokenizer_files(source, target)
    return target


# ---- the original OpenGVLab layout ---------------------------------------------------------------


def _original_vision_config(vision: dict[str, Any]) -> dict[str, Any]:
    size = vision["image_size"]
    patch = vision["patch_size"]
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": vision["hidden_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "intermediate_size": vision["intermediate_size"],
        "image_size": size[0] if isinstance(size, list) else size,
        "patch_size": patch[0] if isinstance(patch, list) else patch,
        "num_channels": 3,
        "qkv_bias": vision["attention_bias"],
        "qk_normalization": vision["use_qk_norm"],
        "norm_type": vision["norm_type"],
        "layer_norm_eps": vision["layer_norm_eps"],
        "hidden_act": vision["hidden_act"],
        "dropout": 0.0, "attention_dropout": 0.0, "drop_path_rate": 0.0,
        "initializer_range": 0.02, "initializer_factor": 0.1, "use_flash_attn": False,
        "torch_dtype": "float32",
    }


def _original_llm_config(text: dict[str, Any], tie: bool, internlm2: bool) -> dict[str, Any]:
    # Original checkpoints were saved by transformers 4.3x: flat rope_theta / rope_scaling, torch_dtype.
    theta = (text.get("rope_parameters") or {}).get("rope_theta", text.get("rope_theta", 10000.0))
    common = {
        "hidden_size": text["hidden_size"], "num_hidden_layers": text["num_hidden_layers"],
        "num_attention_heads": text["num_attention_heads"], "num_key_value_heads": text["num_key_value_heads"],
        "intermediate_size": text["intermediate_size"], "vocab_size": text["vocab_size"],
        "rms_norm_eps": text["rms_norm_eps"], "max_position_embeddings": text["max_position_embeddings"],
        "hidden_act": "silu", "rope_theta": theta, "rope_scaling": None, "tie_word_embeddings": tie,
        "eos_token_id": text.get("eos_token_id"), "bos_token_id": text.get("bos_token_id"),
        "torch_dtype": "float32",
    }
    if internlm2:
        return {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
                "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                             "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
                "bias": bool(text.get("attention_bias", False)), "attn_implementation": "eager", **common}
    architecture = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
    extra = {k: text[k] for k in ("head_dim", "attention_bias", "use_sliding_window", "sliding_window")
             if k in text}
    return {"architectures": [architecture[text["model_type"]]], "model_type": text["model_type"], **extra,
            **common}


def _original_state(state: dict[str, torch.Tensor], text: dict[str, Any], internlm2: bool
                    ) -> dict[str, torch.Tensor]:
    """The inverse of the official original -> HF mapping (transformers' convert_internvl_weights_to_hf)."""
    out: dict[str, torch.Tensor] = {}
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    group = heads // kv_heads
    renames = (  # HF substring -> original substring, inside the vision tower
        ("embeddings.cls_token", "embeddings.class_embedding"),
        ("embeddings.patch_embeddings.projection.", "embeddings.patch_embedding."),
        ("embeddings.position_embeddings", "embeddings.position_embedding"),
        ("encoder.layer.", "encoder.layers."),
        ("attention.projection_layer.", "attn.proj."),
        ("attention.q_norm.", "attn.q_norm."),
        ("attention.k_norm.", "attn.k_norm."),
        ("layernorm_before.", "norm1."),
        ("layernorm_after.", "norm2."),
        ("lambda_1", "ls1"),
        ("lambda_2", "ls2"),
    )
    internlm2_renames = (
        ("embed_tokens.", "tok_embeddings."), ("self_attn.o_proj.", "attention.wo."),
        ("mlp.gate_proj.", "feed_forward.w1."), ("mlp.up_proj.", "feed_forward.w3."),
        ("mlp.down_proj.", "feed_forward.w2."), ("input_layernorm.", "attention_norm."),
        ("post_attention_layernorm.", "ffn_norm."),
    )
    for key, tensor in state.items():
        if key.startswith("model.vision_tower."):
            name = "vision_model." + key.removeprefix("model.vision_tower.")
            if ".attention.q_proj." in name:  # fuse q | k | v rows, as the original Linear(D, 3D)
                fused = [state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                name = name.replace("attention.q_proj", "attn.qkv").replace("encoder.layer.", "encoder.layers.")
                out[name] = torch.cat(fused)
                continue
            if ".attention.k_proj." in name or ".attention.v_proj." in name:
                continue
            for old, new in renames:
                name = name.replace(old, new)
            out[name] = tensor
        elif key.startswith("model.multi_modal_projector."):
            name = key.removeprefix("model.multi_modal_projector.")
            for old, new in (("layer_norm.", "0."), ("linear_1.", "1."), ("linear_2.", "3.")):
                name = name.replace(old, new)
            out["mlp1." + name] = tensor
        elif key == "lm_head.weight":
            out["language_model.output.weight" if internlm2 else "language_model.lm_head.weight"] = tensor
        elif key.startswith("model.language_model."):
            name = "language_model.model." + key.removeprefix("model.language_model.")
            if internlm2 and ".self_attn.q_proj." in name:
                # wqkv rows per KV head h: its `group` query heads, then k head h, then v head h.
                parts = [state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                q, k, v = (p.reshape(-1, head_dim, *p.shape[1:]) for p in parts)
                grouped = [torch.cat([q[h * group:(h + 1) * group], k[h:h + 1], v[h:h + 1]]) for h in range(kv_heads)]
                out[name.replace("self_attn.q_proj", "attention.wqkv")] = torch.cat(grouped).reshape(
                    -1, *parts[0].shape[1:])
                continue
            if internlm2 and (".self_attn.k_proj." in name or ".self_attn.v_proj." in name):
                continue
            if internlm2:
                for old, new in internlm2_renames:
                    name = name.replace(old, new)
            out[name] = tensor
        else:
            raise ValueError(f"unexpected HF key {key}")
    return out


def write_original_layout(hf_dir: str | Path, dst_dir: str | Path, *, internlm2: bool = False,
                          bin_format: bool = False, shards: int = 1) -> Path:
    """The HF-native checkpoint in `hf_dir` as an original OpenGVLab InternVLChatModel checkpoint."""
    source, target = Path(hf_dir), Path(dst_dir)
    target.mkdir(parents=True, exist_ok=True)
    hf = json.loads((source / "config.json").read_text())
    text, vision = hf["text_config"], hf["vision_config"]
    if internlm2:
        heads = text["num_attention_heads"]
        if text.get("head_dim", text["hidden_size"] // heads) != text["hidden_size"] // heads:
            raise ValueError("InternLM2 has no head_dim field: needs head_dim == hidden_size / heads")
        if text["model_type"] == "qwen2" or text["model_type"] == "qwen3":
            raise ValueError("InternLM2 has one bias flag for wqkv and wo: use a llama text config")
    # transformers 5 ties on the top-level flag; the original model ties on llm_config's.
    tie = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    config = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "torch_dtype": "float32",
        "vision_config": _original_vision_config(vision),
        "llm_config": _original_llm_config(text, tie, internlm2),
        "downsample_ratio": hf["downsample_ratio"],
        "ps_version": "v2",
        "select_layer": hf["vision_feature_layer"],
        "template": "internvl2_5",
        "force_image_size": _original_vision_config(vision)["image_size"],
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
    }
    (target / "config.json").write_text(json.dumps(config, indent=2))
    _write_tensors(target, _original_state(load_hf_state_dict(source), text, internlm2), shards, bin_format)
    _copy_tokenizer_files(source, target)
    return target
