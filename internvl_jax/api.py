"""`internvl_jax.load(path)`: a converted directory or an HF checkpoint directory -> a `Model` with
numpy-in, numpy-out `forward` and `image_features` (the reference-comparison API).

The model is split into (graphdef, flat leaves) once; each call is a plain `jax.jit` over the leaves,
never `nnx.jit` (which re-walks the object graph on every call).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax import weights
from internvl_jax.config import CONFIG_FILE, InternVLConfig
from internvl_jax.model import InternVL


class Model:
    """A loaded InternVL with the transformers-style tensors as numpy arrays."""

    def __init__(self, module: InternVL, config: InternVLConfig, path: Path | None = None):
        self.config = config
        self.path = path
        self.graphdef, state = nnx.split(module)
        self.leaves, self.treedef = jax.tree.flatten(state)

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def dtype(self):
        return self.leaves[0].dtype

    def module(self, leaves=None) -> InternVL:
        """The NNX module (inside a jitted function, pass the traced leaves)."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves if leaves is not None else self.leaves))

    @functools.cached_property
    def _forward(self):
        def run(leaves, ids, lengths, pixels):
            return self.module(leaves)(ids, lengths, pixels)
        return jax.jit(run)

    @functools.cached_property
    def _image_features(self):
        return jax.jit(lambda leaves, pixels: self.module(leaves).image_features(pixels))

    def forward(self, input_ids, pixel_values=None, attention_mask=None) -> np.ndarray:
        """Logits float32[B, T, V] for `input_ids` int[B, T] that already hold `image_token_id` at the
        image positions; `pixel_values` float[tiles, 3, H, W] as transformers takes it, tiles in
        prompt order. `attention_mask` [B, T] (optional) marks right-padded rows' valid prefix.
        """
        ids = np.asarray(input_ids, dtype=np.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {ids.shape}")
        if attention_mask is None:
            lengths = np.full((ids.shape[0],), ids.shape[1], np.int32)
        else:
            lengths = np.asarray(attention_mask).astype(np.int32).sum(-1)
        image_tokens = int((ids == self.image_token_id).sum())
        pixels = None
        if pixel_values is not None:
            pixels = self._check_pixels(pixel_values)
            expected = pixels.shape[0] * self.config.tokens_per_tile
            if image_tokens != expected:
                raise ValueError(f"input_ids hold {image_tokens} image tokens but {pixels.shape[0]} tiles give "
                                 f"{expected} image features")
        elif image_tokens:
            raise ValueError(f"input_ids hold {image_tokens} image tokens but no pixel_values were given")
        return np.asarray(self._forward(self.leaves, ids, lengths, pixels))

    def image_features(self, pixel_values) -> np.ndarray:
        """[tiles, tokens_per_tile, E] projector output for pixel_values float[tiles, 3, H, W]."""
        return np.asarray(self._image_features(self.leaves, self._check_pixels(pixel_values)))

    def _check_pixels(self, pixel_values) -> jax.Array:
        pixels = np.asarray(pixel_values)
        patch = self.config.vision.patch_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] % patch or pixels.shape[3] % patch:
            raise ValueError(f"pixel_values must be [tiles, 3, H, W] with H and W multiples of {patch}, "
                             f"got shape {pixels.shape}")
        return jnp.asarray(pixels, dtype=self.dtype)


def load(path: str | Path, dtype: str | None = None, shardings_fn=None) -> Model:
    """Loads a converted directory (`python -m convert`) or an HF checkpoint directory (either InternVL
    layout, converted in memory). `dtype`: "float32", "bfloat16", "float16" or None for the
    checkpoint's."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    if (path / CONFIG_FILE).is_file():
        config = InternVLConfig.load(path)
        module = weights.load_safetensors(path, config, weights.dtype_of(dtype, config), shardings_fn)
    else:
        from convert.converter import iter_converted

        config, tensors = iter_converted(path)
        module = weights.load_arrays(config, tensors, weights.dtype_of(dtype, config), shardings_fn)
    return Model(module, config, path)
