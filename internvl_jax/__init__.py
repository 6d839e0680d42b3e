"""InternVL vision-language models in JAX/Flax."""

from internvl_jax.config import InternVLConfig

__all__ = ["InternVLConfig"]
