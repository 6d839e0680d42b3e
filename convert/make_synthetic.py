"""Writes a synthetic HF-native InternVL checkpoint (random weights, real names and shapes) without torch.

    python -m convert.make_synthetic DIR [--preset internvl3-1b|small] [--shards 2] [--seed 0]

Used to measure the converter's peak memory on a checkpoint of real size (docs/CONVERT.md) and, with the
small preset, by the streaming test. The tensor names are spelled out here from transformers'
InternVLForConditionalGeneration (transformers >= 4.52 `model.*` prefixes), independently of the
converter's tables. Each tensor is generated and written on its own, so writing 1.6 GB needs ~1 GB of RAM.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from convert.readers import NUMPY_DTYPES, SafetensorsWriter

PRESETS = {
    # InternVL3-1B: InternViT-300M-448px-V2_5 + Qwen2.5-0.5B, untied (vocab 151674 with the InternVL tokens).
    "internvl3-1b": {
        "vision": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                   "image_size": 448, "patch_size": 14},
        "text": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                 "head_dim": 64, "intermediate_size": 4864, "vocab_size": 151674},
    },
    # ~65 MB of bf16 in many small tensors (largest ~4 MB): the streaming test's checkpoint.
    "small": {
        "vision": {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 1024,
                   "image_size": 224, "patch_size": 14},
        "text": {"hidden_size": 256, "num_hidden_layers": 24, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "head_dim": 64, "intermediate_size": 1024, "vocab_size": 8192},
    },
}


def hf_config(preset: str) -> dict:
    """config.json as transformers 5 writes it for InternVLForConditionalGeneration (qwen2 text, untied)."""
    vision, text = PRESETS[preset]["vision"], PRESETS[preset]["text"]
    grid = vision["image_size"] // vision["patch_size"]
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "dtype": "bfloat16",
        "downsample_ratio": 0.5,
        "image_seq_length": grid * grid // 4,
        "image_token_id": text["vocab_size"] - 7,
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "vision_config": {
            "model_type": "internvl_vision", **vision,
            "image_size": [vision["image_size"]] * 2, "patch_size": [vision["patch_size"]] * 2,
            "attention_bias": True, "use_qk_norm": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6,
            "hidden_act": "gelu", "num_channels": 3, "use_mask_token": False,
            "use_absolute_position_embeddings": True, "use_mean_pooling": True, "layer_scale_init_value": 0.1,
        },
        "text_config": {
            "model_type": "qwen2", **text, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "tie_word_embeddings": False, "use_sliding_window": False, "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
    }


def tensor_shapes(preset: str) -> dict[str, tuple[int, ...]]:
    """Names and torch shapes of every weight, in the order save_pretrained lists them."""
    vision, text = PRESETS[preset]["vision"], PRESETS[preset]["text"]
    d, f, p = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    positions = (vision["image_size"] // p) ** 2 + 1
    e, i, v = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    q, kv = text["num_attention_heads"] * text["head_dim"], text["num_key_value_heads"] * text["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.vision_tower.embeddings.cls_token": (1, 1, d),
        "model.vision_tower.embeddings.position_embeddings": (1, positions, d),
        "model.vision_tower.embeddings.patch_embeddings.projection.weight": (d, 3, p, p),
        "model.vision_tower.embeddings.patch_embeddings.projection.bias": (d,),
    }
    for layer in range(vision["num_hidden_layers"]):
        prefix = f"model.vision_tower.encoder.layer.{layer}."
        shapes |= {prefix + "lambda_1": (d,), prefix + "lambda_2": (d,)}
        for name in ("q_proj", "k_proj", "v_proj", "projection_layer"):
            shapes |= {prefix + f"attention.{name}.weight": (d, d), prefix + f"attention.{name}.bias": (d,)}
        shapes |= {prefix + "mlp.fc1.weight": (f, d), prefix + "mlp.fc1.bias": (f,),
                   prefix + "mlp.fc2.weight": (d, f), prefix + "mlp.fc2.bias": (d,)}
        for name in ("layernorm_before", "layernorm_after"):
            shapes |= {prefix + f"{name}.weight": (d,), prefix + f"{name}.bias": (d,)}
    projector = "model.multi_modal_projector."
    shapes |= {projector + "layer_norm.weight": (4 * d,), projector + "layer_norm.bias": (4 * d,),
               projector + "linear_1.weight": (e, 4 * d), projector + "linear_1.bias": (e,),
               projector + "linear_2.weight": (e, e), projector + "linear_2.bias": (e,)}
    shapes["model.language_model.embed_tokens.weight"] = (v, e)
    for layer in range(text["num_hidden_layers"]):
        prefix = f"model.language_model.layers.{layer}."
        shapes |= {prefix + "self_attn.q_proj.weight": (q, e), prefix + "self_attn.q_proj.bias": (q,),
                   prefix + "self_attn.k_proj.weight": (kv, e), prefix + "self_attn.k_proj.bias": (kv,),
                   prefix + "self_attn.v_proj.weight": (kv, e), prefix + "self_attn.v_proj.bias": (kv,),
                   prefix + "self_attn.o_proj.weight": (e, q),
                   prefix + "mlp.gate_proj.weight": (i, e), prefix + "mlp.up_proj.weight": (i, e),
                   prefix + "mlp.down_proj.weight": (e, i),
                   prefix + "input_layernorm.weight": (e,), prefix + "post_attention_layernorm.weight": (e,)}
    shapes["model.language_model.norm.weight"] = (e,)
    shapes["lm_head.weight"] = (v, e)
    return shapes


def write_synthetic(directory: str | Path, preset: str = "internvl3-1b", shards: int = 2, seed: int = 0) -> Path:
    """Writes config.json, the shards and (when sharded) model.safetensors.index.json; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config(preset), indent=2))
    shapes = tensor_shapes(preset)
    bf16 = NUMPY_DTYPES["BF16"]
    total = sum(math.prod(shape) for shape in shapes.values()) * bf16.itemsize
    groups: list[list[str]] = [[] for _ in range(shards)]
    written = 0
    for name, shape in shapes.items():  # contiguous groups of about equal bytes, like save_pretrained
        groups[min(shards - 1, written * shards // total)].append(name)
        written += math.prod(shape) * bf16.itemsize
    rng = np.random.default_rng(seed)
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file_name = "model.safetensors" if shards == 1 else f"model-{number:05d}-of-{shards:05d}.safetensors"
        writer = SafetensorsWriter(directory / file_name, [(name, shapes[name], "BF16") for name in group],
                                   {"format": "pt"})
        for name in group:
            values = rng.standard_normal(shapes[name], dtype=np.float32) * np.float32(0.02)
            writer.write(name, values.astype(bf16))
        writer.close()
        weight_map.update(dict.fromkeys(group, file_name))
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m convert.make_synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="internvl3-1b")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_synthetic(args.directory, args.preset, args.shards, args.seed)
    sizes = {p.name: p.stat().st_size for p in sorted(path.glob("*.safetensors"))}
    print(f"wrote {path}: {sum(sizes.values()) / 1e9:.3f} GB in {len(sizes)} file(s), largest "
          f"{max(sizes.values()) / 1e9:.3f} GB")


if __name__ == "__main__":
    main()
