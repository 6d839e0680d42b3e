"""A/B in one process: a preset's InternViT tower (dummy weights, bf16) as it was vs with the layer scales folded,
compiled as the runner compiles encode (cuBLAS GEMMs on a GPU), at several tile counts; four alternating rounds
of 10 calls each, median ms per call.

    PYTHONPATH=. python docs/results/session8-2026-11-28/fold_ab.py InternVL3-1B 1,8,32   (OUT=folder for foldab.json)

(Call 9 of the eighth session ran this as .devrun/foldab.py: the same code on fewer lines.)
"""
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import load_config
from internvl_jax import sharding, weights

preset = sys.argv[1] if len(sys.argv) > 1 else "demo"
tiles_list = [int(t) for t in (sys.argv[2] if len(sys.argv) > 2 else "1,32").split(",")]
config, _ = load_config(preset)
mesh = sharding.make_mesh(1, 1)
model = weights.dummy_model(config, jnp.bfloat16, lambda state: sharding.param_shardings(state, mesh, "data"))
before_def, before_state = nnx.split(model.vision)  # keeps the unfolded arrays alive
model.vision.fold_layer_scales()
folded_def, folded_state = nnx.split(model.vision)
options = {"xla_gpu_enable_triton_gemm": False} if jax.default_backend() == "gpu" else None
size = config.vision.image_size
out = {"device": jax.devices()[0].device_kind, "preset": preset, "rows": []}
for tiles in tiles_list:
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(tiles, 3, size, size)), jnp.bfloat16)
    programs = {}
    for name, graph, state in (("as before", before_def, before_state), ("folded", folded_def, folded_state)):
        function = jax.jit(lambda state, pixels, graph=graph: nnx.merge(graph, state)(pixels))
        programs[name] = (function.lower(state, pixels).compile(compiler_options=options), state)
        jax.block_until_ready(programs[name][0](state, pixels))
    times = {name: [] for name in programs}
    for _ in range(4):
        for name, (program, state) in programs.items():
            started = time.perf_counter()
            for _ in range(10):
                result = program(state, pixels)
            jax.block_until_ready(result)
            times[name].append((time.perf_counter() - started) / 10 * 1e3)
    row = {"tiles": tiles, **{name: round(float(np.median(spent)), 3) for name, spent in times.items()}}
    out["rows"].append(row)
    print(f"{tiles:3d} tiles: as before {row['as before']:.3f} ms, folded {row['folded']:.3f} ms "
          f"({row['as before'] / row['folded'] - 1:+.1%} tiles/s)", flush=True)
with open(os.path.join(os.environ.get("OUT", "."), "foldab.json"), "w") as handle:
    json.dump(out, handle, indent=1)
