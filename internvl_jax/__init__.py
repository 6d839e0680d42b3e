"""InternVL vision-language models in JAX/Flax: `load` for parity work, `LLM` for inference."""

from internvl_jax.api import Model, load
from internvl_jax.config import InternVLConfig
from internvl_jax.offline import LLM, EngineArgs
from internvl_jax.outputs import CompletionOutput, RequestOutput
from internvl_jax.sampling import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineArgs", "InternVLConfig", "Model", "RequestOutput", "SamplingParams",
           "load"]
