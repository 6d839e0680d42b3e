"""Checkpoint converter: InternVL (HF-native or original OpenGVLab layout) -> internvl_jax Flax weights.

    python -m convert SRC DST [--dtype float32|bfloat16|float16] [--overwrite] [--quiet]

Library use: `convert(src, dst)` writes a converted directory; `iter_converted(src)` yields the
converted parameters in memory without writing anything. See docs/CONVERT.md.
"""

from convert.converter import (
    ConversionPlan,
    convert,
    find_token_id,
    iter_converted,
    parameter_shapes,
    plan_conversion,
)
from convert.readers import ConversionError

__all__ = [
    "ConversionError",
    "ConversionPlan",
    "convert",
    "find_token_id",
    "iter_converted",
    "parameter_shapes",
    "plan_conversion",
]
