"""Where does a decode step's time go? Times `Runner.decode` for the InternVL3-1B preset under
variants (attention kernel, slots, steps per dispatch, decoder depth) so each cost can be separated:

    python -m bench.decode_probe --out $OUT/probe.json

Run it once per XLA_FLAGS setting to compare command-buffer options.
"""

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax import sharding, weights
from internvl_jax.config import InternVLConfig
from internvl_jax.presets import preset_dir
from internvl_jax.runner import Runner


def time_decode(runner, active, steps, impl, context, repeats=5):
    runner.set_lengths(np.full(runner.num_slots, context))
    jax.block_until_ready(runner.decode(active, steps, False, impl, "greedy").tokens)
    runner.set_lengths(np.full(runner.num_slots, context))
    start = time.perf_counter()
    for _ in range(repeats):
        output = runner.decode(active, steps, False, impl, "greedy")
    jax.block_until_ready(output.tokens)
    return (time.perf_counter() - start) / repeats / steps * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="probe.json")
    parser.add_argument("--preset", default="InternVL3-1B")
    parser.add_argument("--layers", default="24,1")
    parser.add_argument("--slots", default="1,8,64")
    parser.add_argument("--impls", default="xla,cudnn")
    parser.add_argument("--steps", default="1,16")
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args()
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    base = InternVLConfig.from_pretrained(preset_dir(args.preset))
    mesh = sharding.make_mesh(1, 1)
    rows = []
    for layers in ints(args.layers):
        config = dataclasses.replace(base, text=dataclasses.replace(base.text, num_layers=layers))
        model = weights.dummy_model(config, jnp.bfloat16, lambda s: sharding.param_shardings(s, mesh, "data"))
        for slots in ints(args.slots):
            runner = Runner(model, mesh, "data", num_slots=slots, max_model_len=4096, pool_tiles=1)
            for impl in args.impls.split(","):
                for steps in ints(args.steps):
                    for active_count in sorted({1, slots}):
                        active = np.zeros(slots, bool)
                        active[:active_count] = True
                        ms = time_decode(runner, active, steps, impl, context=args.context)
                        row = dict(layers=layers, slots=slots, active=active_count, impl=impl, steps=steps,
                                   ms_per_step=round(ms, 4))
                        print(row, flush=True)
                        rows.append(row)
            del runner
    result = {"devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__,
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
