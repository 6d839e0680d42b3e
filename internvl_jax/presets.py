"""Presets (the public InternVL shapes, for `load_format="dummy"`) and the built-in demo model.

No real weights or tokenizers can be downloaded where this project is built and benchmarked, so a
preset is a checkpoint directory without weights: the model's `config.json` plus a synthetic tokenizer
whose special tokens sit at the real ids. The demo model is a small random InternVL (real 448 px
tiling and 256 tokens per tile, tiny widths) written once in our converted format and cached.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from internvl_jax.config import CONFIG_FILE, InternVLConfig

log = logging.getLogger(__name__)

DEMO_NAME = "internvl-jax-demo"
DEMO_VERSION = 1  # bump when the demo's config changes: the cache key includes it


def cache_dir() -> Path:
    return Path(os.environ.get("INTERNVL_JAX_CACHE", Path.home() / ".cache" / "internvl_jax"))


def preset_names() -> list[str]:
    files = resources.files("internvl_jax").joinpath("presets").iterdir()
    return sorted(f.name.removesuffix(".json") for f in files if f.name.endswith(".json"))


def preset_config(name: str) -> dict:
    if name not in preset_names():
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    text = resources.files("internvl_jax").joinpath("presets", f"{name}.json").read_text()
    return json.loads(text)


def _write_atomically(target: Path, fill) -> Path:
    """Builds a directory in a temporary sibling and renames it into place (safe against a crash or a
    concurrent builder: the loser's copy is discarded)."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fill(staging)
        staging.rename(target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_tokenizer(directory: Path, config: InternVLConfig) -> None:
    from internvl_jax.prompts import builtin_template
    from internvl_jax.tokenizer import make_tokenizer, save_tokenizer

    template = builtin_template("internvl_hf" if config.source_layout == "hf" else "internvl2_5")
    save_tokenizer(make_tokenizer(config.text.vocab_size, chat_template=template), directory)


def preset_dir(name: str) -> Path:
    """A weightless checkpoint directory for a preset (config.json + synthetic tokenizer), cached."""
    hf = preset_config(name)

    def fill(directory: Path) -> None:
        (directory / "config.json").write_text(json.dumps(hf, indent=2))
        _write_tokenizer(directory, InternVLConfig.from_hf_config(hf))

    return _write_atomically(cache_dir() / "presets" / name, fill)


def demo_config() -> InternVLConfig:
    """Real tiling (448 px tiles, 14 px patches, 256 tokens per tile) at toy widths: fast on a CPU."""
    hf = {
        "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
        "vision_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "intermediate_size": 128, "image_size": 448, "patch_size": 14, "attention_bias": True},
        "text_config": {"model_type": "qwen2", "vocab_size": 4096, "hidden_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256,
                        "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False},
        "image_token_id": 4096 - 7, "downsample_ratio": 0.5, "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    from internvl_jax.tokenizer import special_token_ids

    config = InternVLConfig.from_hf_config(hf)
    ids = special_token_ids(config.text.vocab_size)
    assert ids["<IMG_CONTEXT>"] == config.image_token_id
    import dataclasses

    return dataclasses.replace(config, eos_token_ids=(ids["<|im_end|>"], ids["<|endoftext|>"]),
                               max_dynamic_patch=6)


def demo_dir() -> Path:
    """The built-in demo model (random weights) in converted form; made on first use, then cached."""
    from internvl_jax import weights

    def fill(directory: Path) -> None:
        log.warning("building the demo model (a small RANDOM InternVL) in %s", directory)
        config = demo_config()
        config.save(directory)
        _write_tokenizer(directory, config)
        weights.save_safetensors(weights.dummy_model(config, seed=DEMO_VERSION), directory)

    target = _write_atomically(cache_dir() / f"{DEMO_NAME}-v{DEMO_VERSION}", fill)
    assert (target / CONFIG_FILE).is_file()
    return target
