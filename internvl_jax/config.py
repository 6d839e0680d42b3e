"""Model configuration: frozen dataclasses built from either InternVL `config.json` layout.

Two layouts exist in the wild:
  * HF-native (`InternVLForConditionalGeneration`, model_type "internvl"): `vision_config` + `text_config`.
  * Original OpenGVLab (`InternVLChatModel`, model_type "internvl_chat"): `vision_config` + `llm_config`
    plus top-level `downsample_ratio`, `ps_version`, `select_layer`, `template`, tiling fields.

Both become one `InternVLConfig`. Variants are made with `dataclasses.replace`, never subclasses.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# Names of the files that a converted directory holds.
CONFIG_FILE = "internvl_jax_config.json"
WEIGHTS_FILE = "model.safetensors"

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
VISION_ACTIVATIONS = ("gelu", "quick_gelu", "gelu_pytorch_tanh", "gelu_new")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

# Decoder families we implement. InternLM2 checkpoints become Llama-shaped weights in the converter.
TEXT_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "InternLM2ForCausalLM": "internlm2",
}
TEXT_MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "internlm2": "internlm2"}


class ConfigError(ValueError):
    """A config.json that we cannot serve: names the field and the value."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """InternViT encoder."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    qkv_bias: bool = True
    qk_norm: bool = False  # the 6B variant: RMSNorm over the full width of q and k
    norm_type: str = "layer_norm"  # or "rms_norm"
    norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    # Which hidden state feeds the projector: -1 = last layer, -2 = one before... Only the layers
    # needed are built, as the reference truncates the encoder to `select_layer`.
    feature_layer: int = -1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def layers_used(self) -> int:
        """Number of encoder layers that run: hidden_states[feature_layer] needs this many."""
        if self.feature_layer < 0:
            return self.num_layers + self.feature_layer + 1
        return self.feature_layer


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Pixel shuffle + LayerNorm + Linear + GELU + Linear (`mlp1` / `multi_modal_projector`)."""

    vision_hidden_size: int = 1024
    text_hidden_size: int = 896
    downsample_ratio: float = 0.5
    ps_version: str = "v2"  # "v1" skips the final transpose of the pixel shuffle
    norm_eps: float = 1e-5  # nn.LayerNorm's default, not the ViT's 1e-6
    hidden_act: str = "gelu"

    @property
    def shuffle_factor(self) -> int:
        factor = round(1 / self.downsample_ratio)
        return factor

    @property
    def input_size(self) -> int:
        return self.vision_hidden_size * self.shuffle_factor**2


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Decoder-only LLM (Qwen2/Qwen2.5, Qwen3, Llama; InternLM2 as Llama-shaped weights)."""

    architecture: str = "qwen2"
    vocab_size: int = 151674
    hidden_size: int = 896
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 4864
    norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig(theta=1_000_000.0)
    max_position_embeddings: int = 32768
    qkv_bias: bool = True
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of q and k
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
    vision: VisionConfig = VisionConfig()
    projector: ProjectorConfig = ProjectorConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151667
    tokens_per_tile: int = 256
    # Preprocessing defaults carried by the checkpoint (original layout) or set by us.
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    template: str | None = None  # the original layout's conversation template name
    source_layout: str = "hf"  # "hf" or "original": which checkpoint layout it came from
    dtype: str = "bfloat16"  # the checkpoint's dtype
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    # ---- serialisation of our own config --------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": "internvl_jax", "version": 1, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InternVLConfig:
        data = {k: v for k, v in data.items() if k not in ("format", "version")}
        text = dict(data.pop("text"))
        text["rope"] = RopeConfig(**text["rope"])
        return cls(
            vision=VisionConfig(**data.pop("vision")),
            projector=ProjectorConfig(**data.pop("projector")),
            text=TextConfig(**text),
            eos_token_ids=tuple(data.pop("eos_token_ids", ())),
            **data,
        )

    def save(self, directory: str | Path) -> None:
        Path(directory, CONFIG_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> InternVLConfig:
        return cls.from_dict(json.loads(Path(directory, CONFIG_FILE).read_text()))

    # ---- the checkpoint layouts ------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> InternVLConfig:
        """Builds our config from a checkpoint's `config.json` dict (either layout)."""
        model_type = hf.get("model_type")
        architectures = hf.get("architectures") or []
        if model_type == "internvl" or "InternVLForConditionalGeneration" in architectures:
            return _from_hf_native(hf)
        if model_type == "internvl_chat" or "InternVLChatModel" in architectures:
            return _from_original(hf)
        raise ConfigError(
            f"unsupported model: model_type={model_type!r}, architectures={architectures!r}; expected "
            "'internvl' (InternVLForConditionalGeneration) or 'internvl_chat' (InternVLChatModel)"
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> InternVLConfig:
        path = Path(directory, "config.json")
        if not path.is_file():
            raise ConfigError(f"{directory}: no config.json")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from error
        return cls.from_hf_config(hf)


# ---- helpers for the two layouts ---------------------------------------------------------------


def _pair_to_int(value: Any, field: str) -> int:
    """image_size / patch_size may be an int or an (h, w) pair; we support square only."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"vision_config.{field}={value!r}: only square sizes are supported")
        return int(value[0])
    return int(value)


def _check_choice(value: Any, allowed: tuple[str, ...], field: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{field}={value!r} is not supported; expected one of {list(allowed)}")
    return value


def _dtype_name(hf: dict[str, Any]) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
    name = str(name).removeprefix("torch.")
    return name if name in SUPPORTED_DTYPES else "bfloat16"


def _rope_config(text: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
    params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", text.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    _check_choice(rope_type, ROPE_TYPES, "rope_scaling.rope_type")
    return RopeConfig(
        rope_type=rope_type,
        theta=theta,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _text_config(text: dict[str, Any], where: str) -> TextConfig:
    architectures = text.get("architectures") or []
    family = None
    for name in architectures:
        family = TEXT_ARCHITECTURES.get(name)
        if family:
            break
    if family is None:
        family = TEXT_MODEL_TYPES.get(text.get("model_type", ""))
    if family is None:
        raise ConfigError(
            f"{where}: unsupported language model (model_type={text.get('model_type')!r}, "
            f"architectures={architectures!r}); supported: {sorted(TEXT_ARCHITECTURES)}"
        )
    hidden = int(text["hidden_size"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ConfigError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    act = text.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}.hidden_act={act!r} is not supported; expected 'silu'")
    if text.get("mlp_bias"):
        raise ConfigError(f"{where}.mlp_bias=true is not supported")
    if text.get("use_sliding_window"):
        raise ConfigError(f"{where}.use_sliding_window=true is not supported")
    if family == "qwen2":
        qkv_bias, o_bias = True, False
    elif family == "qwen3" or family == "llama":
        qkv_bias = o_bias = bool(text.get("attention_bias", False))
    else:  # internlm2: `bias` covers wqkv and wo
        qkv_bias = o_bias = bool(text.get("bias", False))
    return TextConfig(
        architecture="llama" if family == "internlm2" else family,
        vocab_size=int(text["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(text["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(text["intermediate_size"]),
        norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope=_rope_config(text),
        max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=family == "qwen3",
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
    )


def _vision_config(vision: dict[str, Any], feature_layer: int, *, original: bool) -> VisionConfig:
    hidden = int(vision["hidden_size"])
    heads = int(vision["num_attention_heads"])
    if hidden % heads:
        raise ConfigError(f"vision_config: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    if original:
        qkv_bias = bool(vision.get("qkv_bias", True))
        qk_norm = bool(vision.get("qk_normalization", False))
    else:
        qkv_bias = bool(vision.get("attention_bias", False))
        qk_norm = bool(vision.get("use_qk_norm", False))
        if vision.get("use_mask_token"):
            raise ConfigError("vision_config.use_mask_token=true is not supported")
        if not vision.get("use_absolute_position_embeddings", True):
            raise ConfigError("vision_config.use_absolute_position_embeddings=false is not supported")
        if not vision.get("use_mean_pooling", True):
            raise ConfigError("vision_config.use_mean_pooling=false (a final LayerNorm) is not supported")
    if int(vision.get("num_channels", 3)) != 3:
        raise ConfigError(f"vision_config.num_channels={vision.get('num_channels')}: only 3 is supported")
    layers = int(vision["num_hidden_layers"])
    config = VisionConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=int(vision["intermediate_size"]),
        image_size=_pair_to_int(vision.get("image_size", 448), "image_size"),
        patch_size=_pair_to_int(vision.get("patch_size", 14), "patch_size"),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        norm_type=_check_choice(vision.get("norm_type", "layer_norm"), ("layer_norm", "rms_norm"),
                                "vision_config.norm_type"),
        norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
        hidden_act=_check_choice(vision.get("hidden_act", "gelu"), VISION_ACTIVATIONS, "vision_config.hidden_act"),
        feature_layer=int(feature_layer),
    )
    if not 0 < config.layers_used <= layers:
        raise ConfigError(f"vision feature layer {feature_layer} is out of range for {layers} layers")
    if config.image_size % config.patch_size:
        raise ConfigError(f"vision_config: image_size={config.image_size} is not a multiple of "
                          f"patch_size={config.patch_size}")
    return config


def _projector_and_tokens(vision: VisionConfig, text: TextConfig, downsample_ratio: float, ps_version: str,
                          act: str = "gelu") -> tuple[ProjectorConfig, int]:
    factor = 1 / downsample_ratio
    if abs(factor - round(factor)) > 1e-6 or round(factor) < 1:
        raise ConfigError(f"downsample_ratio={downsample_ratio}: only 1/k for an integer k is supported")
    if vision.grid % round(factor):
        raise ConfigError(f"downsample_ratio={downsample_ratio} does not divide the {vision.grid}x{vision.grid} grid")
    _check_choice(ps_version, ("v1", "v2"), "ps_version")
    if act != "gelu":
        raise ConfigError(f"projector_hidden_act={act!r} is not supported; expected 'gelu'")
    projector = ProjectorConfig(vision_hidden_size=vision.hidden_size, text_hidden_size=text.hidden_size,
                                downsample_ratio=downsample_ratio, ps_version=ps_version)
    tokens = int(vision.num_patches * downsample_ratio**2)
    return projector, tokens


def _eos_ids(*values: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for value in values:
        if value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if int(item) not in ids:
                ids.append(int(item))
    return tuple(ids)


def _from_hf_native(hf: dict[str, Any]) -> InternVLConfig:
    text_dict = dict(hf.get("text_config") or {})
    vision_dict = dict(hf.get("vision_config") or {})
    if not text_dict or not vision_dict:
        raise ConfigError("config.json (internvl): 'text_config' and 'vision_config' are required")
    text_dict.setdefault("model_type", "qwen2")
    # The top-level flag decides tying for the HF-native model (`_tied_weights_keys` on the top class).
    if "tie_word_embeddings" in hf:
        text_dict["tie_word_embeddings"] = hf["tie_word_embeddings"]
    text = _text_config(text_dict, "text_config")
    feature_layer = hf.get("vision_feature_layer", -1)
    if not isinstance(feature_layer, int):
        raise ConfigError(f"vision_feature_layer={feature_layer!r}: only a single layer index is supported")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ConfigError(f"vision_feature_select_strategy={strategy!r} is not supported; expected 'default'")
    vision = _vision_config(vision_dict, feature_layer, original=False)
    # The HF-native pixel shuffle always applies the final transpose (ps_version v2).
    projector, tokens = _projector_and_tokens(vision, text, float(hf.get("downsample_ratio", 0.5)), "v2",
                                              hf.get("projector_hidden_act", "gelu"))
    declared = hf.get("image_seq_length")
    if declared is not None and int(declared) != tokens:
        raise ConfigError(f"image_seq_length={declared} does not match the {tokens} tokens per tile that "
                          "image_size, patch_size and downsample_ratio give")
    return InternVLConfig(
        vision=vision, projector=projector, text=text,
        image_token_id=int(hf.get("image_token_id", 151667)),
        tokens_per_tile=tokens,
        source_layout="hf",
        dtype=_dtype_name(hf),
        eos_token_ids=_eos_ids(text_dict.get("eos_token_id"), hf.get("eos_token_id")),
        bos_token_id=text_dict.get("bos_token_id"),
    )


def _from_original(hf: dict[str, Any]) -> InternVLConfig:
    llm = dict(hf.get("llm_config") or {})
    vision_dict = dict(hf.get("vision_config") or {})
    if not llm or not vision_dict:
        raise ConfigError("config.json (internvl_chat): 'llm_config' and 'vision_config' are required")
    text = _text_config(llm, "llm_config")
    if hf.get("force_image_size"):
        vision_dict["image_size"] = hf["force_image_size"]
    vision = _vision_config(vision_dict, int(hf.get("select_layer", -1)), original=True)
    projector, tokens = _projector_and_tokens(vision, text, float(hf.get("downsample_ratio", 0.5)),
                                              hf.get("ps_version", "v1"))
    min_patch, max_patch = int(hf.get("min_dynamic_patch", 1)), int(hf.get("max_dynamic_patch", 12))
    if not 1 <= min_patch <= max_patch:
        raise ConfigError(f"min_dynamic_patch={min_patch}, max_dynamic_patch={max_patch}: need 1 <= min <= max")
    return InternVLConfig(
        vision=vision, projector=projector, text=text,
        # The original checkpoints do not store the context token id; the converter resolves it from the
        # tokenizer (`<IMG_CONTEXT>`); -1 marks it unresolved.
        image_token_id=int(hf.get("img_context_token_id") or -1),
        tokens_per_tile=tokens,
        min_dynamic_patch=min_patch,
        max_dynamic_patch=max_patch,
        dynamic_image_size=bool(hf.get("dynamic_image_size", True)),
        use_thumbnail=bool(hf.get("use_thumbnail", True)),
        template=hf.get("template"),
        source_layout="original",
        dtype=_dtype_name(llm) if "torch_dtype" in llm or "dtype" in llm else _dtype_name(hf),
        eos_token_ids=_eos_ids(llm.get("eos_token_id")),
        bos_token_id=llm.get("bos_token_id"),
    )
