"""The key tables: source checkpoint keys -> our Flax parameter paths, with shapes and a transform.

Each `Rule` reads: destination path and its shape <- source key(s) and their shapes, via a transform.
Shapes are written in the letters of docs/CONVERT.md and evaluated against the config:
  D vision hidden, N vision heads, Hd vision head dim, F vision MLP, P patch, G grid (image / patch),
  Dp projector input (D * k * k for downsample 1/k), E text hidden, Nq / Nk text q / kv heads,
  Ht text head dim, I text MLP, V vocab.
Source keys are templates: {v} {p} {t} are the vision / projector / text prefixes of the layout,
{head} the full lm_head key, {i} the layer index. They are templates and not regexes because the
converter enumerates the keys the config implies, so that a missing key can be named.

Kernels are [in, ..., out]: torch's Linear weight [out, in] is transposed, and the in / out axes are
split into heads where our modules want them (vision q [D, N, Hd], text q [E, Nq, Ht], ...).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from convert.readers import ConversionError
from internvl_jax.config import InternVLConfig

Transform = Callable[..., np.ndarray]  # (*source arrays, shape=destination shape, dims=letters) -> array


# ---- transforms ----------------------------------------------------------------------------------


def reshape(array: np.ndarray, *, shape, dims) -> np.ndarray:
    """Same values, leading singleton axes dropped or heads split: cls [1,1,D] -> [D], bias [3D] -> [3,N,Hd]."""
    return array.reshape(shape)


def kernel(weight: np.ndarray, *, shape, dims) -> np.ndarray:
    """torch [out, in...] -> [in..., out] split to `shape`. A conv weight [D, 3, P, P] flattens its input
    axes in (channel, row, column) order, so the kernel multiplies patches flattened the same way."""
    return weight.reshape(weight.shape[0], -1).T.reshape(shape)


def fused_part(index: int) -> Transform:
    """Part `index` (0 q, 1 k, 2 v) of the original InternViT's fused `attn.qkv` (rows q | k | v): the weight
    [3D, D] -> kernel [D, N, Hd], the bias [3D] -> [N, Hd]."""

    def transform(array: np.ndarray, *, shape, dims) -> np.ndarray:
        part = np.split(array, 3)[index]
        return kernel(part, shape=shape, dims=dims) if array.ndim == 2 else part.reshape(shape)

    transform.__name__ = f"fused_qkv_{'qkv'[index]}"
    return transform


def internlm2_part(part: str) -> Transform:
    """Picks q, k or v out of InternLM2's grouped `wqkv`.

    wqkv rows are grouped per KV head: (Nk, Nq/Nk + 2, Ht) = the KV head's Nq/Nk query heads, then its
    key head, then its value head (`rearrange(qkv, "b q (h gs d) -> b q h gs d")` in modeling_internlm2).
    Query head j of group h is head h * Nq/Nk + j, the order GQA expects.
    """

    def transform(weight: np.ndarray, *, shape, dims) -> np.ndarray:
        group = dims["Nq"] // dims["Nk"]
        grouped = weight.reshape(dims["Nk"], group + 2, dims["Ht"], *weight.shape[1:])
        piece = {"q": grouped[:, :group], "k": grouped[:, group], "v": grouped[:, group + 1]}[part]
        rows = piece.reshape(-1, *weight.shape[1:])
        return kernel(rows, shape=shape, dims=dims) if weight.ndim == 2 else rows.reshape(shape)

    transform.__name__ = f"internlm2_{part}"
    return transform


def tied_embedding(embedding: np.ndarray, lm_head: np.ndarray, *, shape, dims) -> np.ndarray:
    """A tied checkpoint that still stores lm_head: it must be the embedding, else the config's tie flag
    is wrong and converting either way would give a model that differs from the reference."""
    if not np.array_equal(embedding, lm_head):
        raise ConversionError("tie_word_embeddings is true but the checkpoint's lm_head weight differs from "
                                "the token embedding; fix tie_word_embeddings in config.json")
    return embedding.reshape(shape)


# ---- rules ---------------------------------------------------------------------------------------


def _always(config: InternVLConfig) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Rule:
    destination: str
    shape: str
    sources: tuple[tuple[str, str], ...]  # (source key template, source shape)
    transform: Transform
    when: Callable[[InternVLConfig], bool] = _always


def rule(destination: str, shape: str, *sources: tuple[str, str], transform: Transform = reshape,
         when: Callable[[InternVLConfig], bool] = _always) -> Rule:
    return Rule(destination, shape, tuple(sources), transform, when)


def _vision_layer_norm(c: InternVLConfig) -> bool:
    return c.vision.norm_type == "layer_norm"


def _vision_qkv_bias(c: InternVLConfig) -> bool:
    return c.vision.qkv_bias


def _vision_qk_norm(c: InternVLConfig) -> bool:
    return c.vision.qk_norm


def _text_qkv_bias(c: InternVLConfig) -> bool:
    return c.text.qkv_bias


def _text_o_bias(c: InternVLConfig) -> bool:
    return c.text.o_bias


def _text_qk_norm(c: InternVLConfig) -> bool:
    return c.text.qk_norm


def _untied(c: InternVLConfig) -> bool:
    return not c.text.tie_word_embeddings


L = "vision.layers.{i}."  # destination prefixes, to keep the rows short
T = "text.layers.{i}."

# HF-native InternViT (`InternVLVisionModel`): separate q/k/v, `lambda_*`, `layernorm_before/after`.
_HV = "{v}encoder.layer.{i}."
VISION_HF = (
    rule("vision.embeddings.patch.kernel", "3*P*P, D", ("{v}embeddings.patch_embeddings.projection.weight",
                                                        "D, 3, P, P"), transform=kernel),
    rule("vision.embeddings.patch.bias", "D", ("{v}embeddings.patch_embeddings.projection.bias", "D")),
    rule("vision.embeddings.cls", "D", ("{v}embeddings.cls_token", "1, 1, D")),
    rule("vision.embeddings.position", "1+G*G, D", ("{v}embeddings.position_embeddings", "1, 1+G*G, D")),
    rule(L + "norm1.scale", "D", (_HV + "layernorm_before.weight", "D")),
    rule(L + "norm1.bias", "D", (_HV + "layernorm_before.bias", "D"), when=_vision_layer_norm),
    *(rule(L + f"attn.{x}.kernel", "D, N, Hd", (_HV + f"attention.{x}_proj.weight", "D, D"), transform=kernel)
      for x in "qkv"),
    *(rule(L + f"attn.{x}.bias", "N, Hd", (_HV + f"attention.{x}_proj.bias", "D"), when=_vision_qkv_bias)
      for x in "qkv"),
    rule(L + "attn.q_norm.scale", "D", (_HV + "attention.q_norm.weight", "D"), when=_vision_qk_norm),
    rule(L + "attn.k_norm.scale", "D", (_HV + "attention.k_norm.weight", "D"), when=_vision_qk_norm),
    rule(L + "attn.out.kernel", "N, Hd, D", (_HV + "attention.projection_layer.weight", "D, D"), transform=kernel),
    rule(L + "attn.out.bias", "D", (_HV + "attention.projection_layer.bias", "D")),
    rule(L + "ls1", "D", (_HV + "lambda_1", "D")),
    rule(L + "norm2.scale", "D", (_HV + "layernorm_after.weight", "D")),
    rule(L + "norm2.bias", "D", (_HV + "layernorm_after.bias", "D"), when=_vision_layer_norm),
    rule(L + "mlp.fc1.kernel", "D, F", (_HV + "mlp.fc1.weight", "F, D"), transform=kernel),
    rule(L + "mlp.fc1.bias", "F", (_HV + "mlp.fc1.bias", "F")),
    rule(L + "mlp.fc2.kernel", "F, D", (_HV + "mlp.fc2.weight", "D, F"), transform=kernel),
    rule(L + "mlp.fc2.bias", "D", (_HV + "mlp.fc2.bias", "D")),
    rule(L + "ls2", "D", (_HV + "lambda_2", "D")),
)

# Original InternViT (`InternVisionModel`): fused qkv with rows q | k | v, `ls1/ls2`, `norm1/norm2`.
_OV = "{v}encoder.layers.{i}."
VISION_ORIGINAL = (
    rule("vision.embeddings.patch.kernel", "3*P*P, D", ("{v}embeddings.patch_embedding.weight", "D, 3, P, P"),
         transform=kernel),
    rule("vision.embeddings.patch.bias", "D", ("{v}embeddings.patch_embedding.bias", "D")),
    rule("vision.embeddings.cls", "D", ("{v}embeddings.class_embedding", "1, 1, D")),
    rule("vision.embeddings.position", "1+G*G, D", ("{v}embeddings.position_embedding", "1, 1+G*G, D")),
    rule(L + "norm1.scale", "D", (_OV + "norm1.weight", "D")),
    rule(L + "norm1.bias", "D", (_OV + "norm1.bias", "D"), when=_vision_layer_norm),
    *(rule(L + f"attn.{x}.kernel", "D, N, Hd", (_OV + "attn.qkv.weight", "3*D, D"), transform=fused_part(index))
      for index, x in enumerate("qkv")),
    *(rule(L + f"attn.{x}.bias", "N, Hd", (_OV + "attn.qkv.bias", "3*D"), transform=fused_part(index),
           when=_vision_qkv_bias) for index, x in enumerate("qkv")),
    rule(L + "attn.q_norm.scale", "D", (_OV + "attn.q_norm.weight", "D"), when=_vision_qk_norm),
    rule(L + "attn.k_norm.scale", "D", (_OV + "attn.k_norm.weight", "D"), when=_vision_qk_norm),
    rule(L + "attn.out.kernel", "N, Hd, D", (_OV + "attn.proj.weight", "D, D"), transform=kernel),
    rule(L + "attn.out.bias", "D", (_OV + "attn.proj.bias", "D")),
    rule(L + "ls1", "D", (_OV + "ls1", "D")),
    rule(L + "norm2.scale", "D", (_OV + "norm2.weight", "D")),
    rule(L + "norm2.bias", "D", (_OV + "norm2.bias", "D"), when=_vision_layer_norm),
    rule(L + "mlp.fc1.kernel", "D, F", (_OV + "mlp.fc1.weight", "F, D"), transform=kernel),
    rule(L + "mlp.fc1.bias", "F", (_OV + "mlp.fc1.bias", "F")),
    rule(L + "mlp.fc2.kernel", "F, D", (_OV + "mlp.fc2.weight", "D, F"), transform=kernel),
    rule(L + "mlp.fc2.bias", "D", (_OV + "mlp.fc2.bias", "D")),
    rule(L + "ls2", "D", (_OV + "ls2", "D")),
)

# `multi_modal_projector` (HF) is `mlp1` (original): LayerNorm(Dp), Linear(Dp, E), GELU, Linear(E, E).
PROJECTOR_HF = (
    rule("projector.norm.scale", "Dp", ("{p}layer_norm.weight", "Dp")),
    rule("projector.norm.bias", "Dp", ("{p}layer_norm.bias", "Dp")),
    rule("projector.fc1.kernel", "Dp, E", ("{p}linear_1.weight", "E, Dp"), transform=kernel),
    rule("projector.fc1.bias", "E", ("{p}linear_1.bias", "E")),
    rule("projector.fc2.kernel", "E, E", ("{p}linear_2.weight", "E, E"), transform=kernel),
    rule("projector.fc2.bias", "E", ("{p}linear_2.bias", "E")),
)
PROJECTOR_ORIGINAL = (  # nn.Sequential indices: 0 LayerNorm, 1 Linear, 2 GELU (no weights), 3 Linear
    rule("projector.norm.scale", "Dp", ("{p}0.weight", "Dp")),
    rule("projector.norm.bias", "Dp", ("{p}0.bias", "Dp")),
    rule("projector.fc1.kernel", "Dp, E", ("{p}1.weight", "E, Dp"), transform=kernel),
    rule("projector.fc1.bias", "E", ("{p}1.bias", "E")),
    rule("projector.fc2.kernel", "E, E", ("{p}3.weight", "E, E"), transform=kernel),
    rule("projector.fc2.bias", "E", ("{p}3.bias", "E")),
)

# Qwen2 / Qwen3 / Llama decoders, the same names under either layout's prefix.
_TL = "{t}layers.{i}."
TEXT_HF = (
    rule("text.embed.embedding", "V, E", ("{t}embed_tokens.weight", "V, E")),
    rule(T + "input_norm.scale", "E", (_TL + "input_layernorm.weight", "E")),
    rule(T + "attn.q.kernel", "E, Nq, Ht", (_TL + "self_attn.q_proj.weight", "Nq*Ht, E"), transform=kernel),
    rule(T + "attn.q.bias", "Nq, Ht", (_TL + "self_attn.q_proj.bias", "Nq*Ht"), when=_text_qkv_bias),
    rule(T + "attn.k.kernel", "E, Nk, Ht", (_TL + "self_attn.k_proj.weight", "Nk*Ht, E"), transform=kernel),
    rule(T + "attn.k.bias", "Nk, Ht", (_TL + "self_attn.k_proj.bias", "Nk*Ht"), when=_text_qkv_bias),
    rule(T + "attn.v.kernel", "E, Nk, Ht", (_TL + "self_attn.v_proj.weight", "Nk*Ht, E"), transform=kernel),
    rule(T + "attn.v.bias", "Nk, Ht", (_TL + "self_attn.v_proj.bias", "Nk*Ht"), when=_text_qkv_bias),
    rule(T + "attn.o.kernel", "Nq, Ht, E", (_TL + "self_attn.o_proj.weight", "E, Nq*Ht"), transform=kernel),
    rule(T + "attn.o.bias", "E", (_TL + "self_attn.o_proj.bias", "E"), when=_text_o_bias),
    rule(T + "attn.q_norm.scale", "Ht", (_TL + "self_attn.q_norm.weight", "Ht"), when=_text_qk_norm),
    rule(T + "attn.k_norm.scale", "Ht", (_TL + "self_attn.k_norm.weight", "Ht"), when=_text_qk_norm),
    rule(T + "post_attn_norm.scale", "E", (_TL + "post_attention_layernorm.weight", "E")),
    rule(T + "mlp.gate.kernel", "E, I", (_TL + "mlp.gate_proj.weight", "I, E"), transform=kernel),
    rule(T + "mlp.up.kernel", "E, I", (_TL + "mlp.up_proj.weight", "I, E"), transform=kernel),
    rule(T + "mlp.down.kernel", "I, E", (_TL + "mlp.down_proj.weight", "E, I"), transform=kernel),
    rule("text.final_norm.scale", "E", ("{t}norm.weight", "E")),
    rule("text.lm_head.kernel", "E, V", ("{head}", "V, E"), transform=kernel, when=_untied),
)

# InternLM2 (InternVL2/2.5 2B, 8B, 26B): grouped wqkv split into Llama-shaped q, k, v.
_QKV = "(Nq+2*Nk)*Ht"
TEXT_INTERNLM2 = (
    rule("text.embed.embedding", "V, E", ("{t}tok_embeddings.weight", "V, E")),
    rule(T + "input_norm.scale", "E", (_TL + "attention_norm.weight", "E")),
    rule(T + "attn.q.kernel", "E, Nq, Ht", (_TL + "attention.wqkv.weight", _QKV + ", E"),
         transform=internlm2_part("q")),
    rule(T + "attn.q.bias", "Nq, Ht", (_TL + "attention.wqkv.bias", _QKV), transform=internlm2_part("q"),
         when=_text_qkv_bias),
    rule(T + "attn.k.kernel", "E, Nk, Ht", (_TL + "attention.wqkv.weight", _QKV + ", E"),
         transform=internlm2_part("k")),
    rule(T + "attn.k.bias", "Nk, Ht", (_TL + "attention.wqkv.bias", _QKV), transform=internlm2_part("k"),
         when=_text_qkv_bias),
    rule(T + "attn.v.kernel", "E, Nk, Ht", (_TL + "attention.wqkv.weight", _QKV + ", E"),
         transform=internlm2_part("v")),
    rule(T + "attn.v.bias", "Nk, Ht", (_TL + "attention.wqkv.bias", _QKV), transform=internlm2_part("v"),
         when=_text_qkv_bias),
    rule(T + "attn.o.kernel", "Nq, Ht, E", (_TL + "attention.wo.weight", "E, Nq*Ht"), transform=kernel),
    rule(T + "attn.o.bias", "E", (_TL + "attention.wo.bias", "E"), when=_text_o_bias),
    rule(T + "post_attn_norm.scale", "E", (_TL + "ffn_norm.weight", "E")),
    rule(T + "mlp.gate.kernel", "E, I", (_TL + "feed_forward.w1.weight", "I, E"), transform=kernel),
    rule(T + "mlp.up.kernel", "E, I", (_TL + "feed_forward.w3.weight", "I, E"), transform=kernel),
    rule(T + "mlp.down.kernel", "I, E", (_TL + "feed_forward.w2.weight", "E, I"), transform=kernel),
    rule("text.final_norm.scale", "E", ("{t}norm.weight", "E")),
    rule("text.lm_head.kernel", "E, V", ("{head}", "V, E"), transform=kernel, when=_untied),
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """One checkpoint layout: its key prefixes and the tables that apply."""

    name: str
    description: str
    vision: str  # {v}
    projector: str  # {p}
    text: str  # {t}
    lm_head: str  # {head}
    rules: tuple[Rule, ...]

    def source_key(self, template: str, layer: int | None = None) -> str:
        return template.format(v=self.vision, p=self.projector, t=self.text, head=self.lm_head, i=layer)

    def dropped_vision_layer(self) -> re.Pattern[str]:
        """Matches keys of a vision layer; layers the config does not use are dropped on purpose."""
        block = "layer" if self.name.startswith("hf") else "layers"
        return re.compile(re.escape(self.vision + "encoder." + block + ".") + r"(\d+)\.")


LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout("hf", "HF-native (transformers >= 4.52 prefixes model.vision_tower / model.language_model)",
               "model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head.weight",
               VISION_HF + PROJECTOR_HF + TEXT_HF),
        Layout("hf_legacy", "HF-native (older prefixes vision_tower / language_model.model)",
               "vision_tower.", "multi_modal_projector.", "language_model.model.", "language_model.lm_head.weight",
               VISION_HF + PROJECTOR_HF + TEXT_HF),
        Layout("original", "original OpenGVLab InternVLChatModel",
               "vision_model.", "mlp1.", "language_model.model.", "language_model.lm_head.weight",
               VISION_ORIGINAL + PROJECTOR_ORIGINAL + TEXT_HF),
        Layout("original_internlm2", "original OpenGVLab InternVLChatModel with an InternLM2 decoder",
               "vision_model.", "mlp1.", "language_model.model.", "language_model.output.weight",
               VISION_ORIGINAL + PROJECTOR_ORIGINAL + TEXT_INTERNLM2),
    )
}

# Buffers some .bin checkpoints carry that are not weights (recomputed from the config): dropped on purpose.
IGNORED_SOURCE_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def shape_letters(config: InternVLConfig) -> dict[str, int]:
    v, t = config.vision, config.text
    return {"D": v.hidden_size, "N": v.num_heads, "Hd": v.head_dim, "F": v.intermediate_size, "P": v.patch_size,
            "G": v.grid, "Dp": config.projector.input_size, "E": t.hidden_size, "Nq": t.num_heads,
            "Nk": t.num_kv_heads, "Ht": t.head_dim, "I": t.intermediate_size, "V": t.vocab_size}


def evaluate_shape(spec: str, letters: dict[str, int]) -> tuple[int, ...]:
    """'1+G*G, D' -> (65, 32). The specs are the literals in this file, so eval sees only arithmetic."""
    return tuple(int(eval(axis, {"__builtins__": {}}, letters)) for axis in spec.split(","))  # noqa: S307
