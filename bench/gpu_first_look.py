"""First GPU look (issue 3): DP/TP equivalence on the available GPUs and first timings of the encoder
and the decode step for the InternVL3-1B preset (dummy weights). Usage:

    python -m bench.gpu_first_look --out results.json

Writes a JSON of the measurements; docs/PERF.md quotes it with the card and date.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax import LLM, SamplingParams, sharding, weights
from internvl_jax.config import InternVLConfig
from internvl_jax.presets import preset_dir
from internvl_jax.runner import Runner


def timed(fn, repeats):
    fn()
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def equivalence(results):
    prompt = {"prompt_token_ids": list(range(1000, 1100))}
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    common = dict(load_format="dummy", dtype="float32", max_model_len=512, max_num_seqs=4, max_prefill_batch=2,
                  feature_cache_tiles=16)
    tokens = {}
    for name, extra in {"single": {}, "tp2-weights": {"tensor_parallel_size": 2, "mm_encoder_tp_mode": "weights"},
                        "tp2-data": {"tensor_parallel_size": 2, "mm_encoder_tp_mode": "data"},
                        "dp2": {"data_parallel_size": 2}}.items():
        if len(jax.devices()) < 2 and name != "single":
            continue
        llm = LLM("InternVL3-1B", **common, **extra)
        tokens[name] = llm.generate(prompt, params)[0].outputs[0].token_ids
        del llm
    results["equivalence_tokens"] = tokens
    results["equivalent"] = all(t == tokens["single"] for t in tokens.values())


def timings(results):
    config = InternVLConfig.from_pretrained(preset_dir("InternVL3-1B"))
    mesh = sharding.make_mesh(1, 1)
    model = weights.dummy_model(config, jnp.bfloat16, lambda s: sharding.param_shardings(s, mesh, "data"))
    runner = Runner(model, mesh, "data", num_slots=64, max_model_len=4096, pool_tiles=128)
    encoder = {}
    for tiles in (1, 8, 32, 64):
        pixels = np.zeros((tiles, 3, 448, 448), np.float32)
        rows = np.arange(tiles, dtype=np.int32)
        seconds = timed(lambda pixels=pixels, rows=rows: (runner.encode(pixels, rows), runner.pool)[1], 10)
        encoder[tiles] = {"ms": seconds * 1e3, "tiles_per_s": tiles / seconds}
    results["encoder"] = encoder
    decode = {}
    steps = 16
    for batch in (1, 64):
        active = np.zeros(64, bool)
        active[:batch] = True
        seconds = timed(lambda active=active: runner.decode(active, steps, False, sampling_mode="greedy").tokens, 5)
        decode[batch] = {"ms_per_step": seconds * 1e3 / steps}
    results["decode_context_len_short"] = decode


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_first_look.json")
    args = parser.parse_args()
    results = {"devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
               "date": time.strftime("%Y-%m-%d")}
    timings(results)
    equivalence(results)
    print(json.dumps(results, indent=1))
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
