"""InternVL vision-language models in JAX/Flax: `load` for parity work, `LLM` for inference.

Names are imported lazily: `python -m convert` needs only the config and must not pay for JAX,
Flax and transformers at start-up.
"""

import importlib

_EXPORTS = {
    "InternVLConfig": "internvl_jax.config",
    "Model": "internvl_jax.api",
    "load": "internvl_jax.api",
    "LLM": "internvl_jax.offline",
    "EngineArgs": "internvl_jax.offline",
    "CompletionOutput": "internvl_jax.outputs",
    "RequestOutput": "internvl_jax.outputs",
    "SamplingParams": "internvl_jax.sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'internvl_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
