"""InternVL = InternViT -> pixel-shuffle projector -> decoder, with image features placed at the
`<IMG_CONTEXT>` positions of the prompt.

Shapes: B batch, T tokens, E LLM width, V vocabulary; tiles are 448 px squares (`[tiles, 3, S, S]`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from internvl_jax.config import InternVLConfig
from internvl_jax.text import TextModel
from internvl_jax.vision import XLA_KERNELS, LayerKernels, Projector, VisionEncoder


def image_features(vision: VisionEncoder, projector: Projector, pixels_BCHW, hidden_sharding=None,
                   kernels: LayerKernels = XLA_KERNELS):
    """The encoder path on its own (the serving runner jits it without the decoder's weights). `kernels`: the
    vision layers' `LayerKernels`."""
    with jax.named_scope("vision"):
        hidden = vision(pixels_BCHW, hidden_sharding, kernels)
    with jax.named_scope("projector"):
        return projector(hidden)


class InternVL(nnx.Module):
    def __init__(self, config: InternVLConfig, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None):
        self.config = config
        self.vision = VisionEncoder(config.vision, dtype, rngs)
        self.projector = Projector(config.projector, dtype, rngs)
        self.text = TextModel(config.text, dtype, rngs)

    def image_features(self, pixels_BCHW, hidden_sharding=None):
        """float[tiles, 3, S, S] -> [tiles, tokens_per_tile, E] (the projector output)."""
        return image_features(self.vision, self.projector, pixels_BCHW, hidden_sharding)

    def embed(self, ids_BT, image_features_ME=None):
        """Token embeddings [B, T, E] with image features placed at the image-token positions.

        `image_features_ME` is [M, E], the features of all images' tiles flattened in prompt order
        (row-major over the batch); the k-th image token of the batch receives row k. Rows past the
        number of image tokens are padding and never read.
        """
        embeds = self.text.embed_tokens(ids_BT)
        if image_features_ME is None:
            return embeds
        is_image = ids_BT == self.config.image_token_id
        # The k-th image token (counting over the flattened batch) takes feature row k.
        rows = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
        rows = jnp.clip(rows, 0, image_features_ME.shape[0] - 1)
        placed = jnp.take(image_features_ME.astype(embeds.dtype), rows, axis=0)
        return jnp.where(is_image[..., None], placed, embeds)

    def __call__(self, ids_BT, lengths_B, pixels_BCHW=None):
        """Full-sequence forward (no cache): float32 logits [B, T, V]."""
        features = None
        if pixels_BCHW is not None:
            features = self.image_features(pixels_BCHW)
            features = features.reshape(-1, features.shape[-1])
        embeds = self.embed(ids_BT, features)
        positions = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
        hidden, _ = self.text(embeds, positions, lengths_B)
        return self.text.logits(hidden)
