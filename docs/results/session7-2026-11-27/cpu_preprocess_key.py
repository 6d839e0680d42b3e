"""The ttft-7tile request's preprocessing on the CPU (docs/PERF.md, 7th session): `InputProcessor.chat` on 12 new
1344 x 896 noise JPEGs (quality 75) with ~90 words, median of the last 11, with the default processed-image cache
and without it. Run it in two trees to compare (from each tree's root):

    PYTHONPATH=. python docs/results/session7-2026-11-27/cpu_preprocess_key.py
"""
import io
import statistics
import time

import numpy as np
from PIL import Image

from internvl_jax import presets
from internvl_jax.config import InternVLConfig
from internvl_jax.inputs import InputProcessor, tiling_for
from internvl_jax.prompts import ChatPrompter
from internvl_jax.tokenizer import load_tokenizer

path = presets.preset_dir("InternVL3-1B")
config = InternVLConfig.from_pretrained(path)
prompter = ChatPrompter.from_pretrained(path, tokenizer=load_tokenizer(path), tokens_per_tile=config.tokens_per_tile)
rng = np.random.default_rng(0)


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (896, 1344, 3), np.uint8)).save(buffer, "JPEG", quality=75)
    return buffer.getvalue()


images = [jpeg() for _ in range(12)]
for cache_gb in (4, 0):
    processor = InputProcessor(prompter, config, tiling_for(path, config), cache_gb=cache_gb)
    times = []
    for data in images:
        started = time.perf_counter()
        processor.chat([{"role": "user", "content": [{"type": "image", "image": data},
                                                     {"type": "text", "text": "describe " * 90}]}])
        times.append((time.perf_counter() - started) * 1e3)
    print(f"cache_gb {cache_gb}: median {statistics.median(times[1:]):.2f} ms", flush=True)
