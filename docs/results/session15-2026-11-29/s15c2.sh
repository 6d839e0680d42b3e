# session 15 call 2, one H200: planned Pallas MLP tiles vs XLA (probe), bench decode with both MLPs, the warm-up's MLP timing
source .devrun/setup.sh
date -u
timeout 150 python3 -m bench.mlp_probe --preset InternVL3-1B --rows 16,32,64 --out $OUT/mlp-1b-planned.json 2>&1 | grep -v "pt/s" | tail -12
date -u
timeout 260 python3 -m bench decode --preset InternVL3-1B --batches 16,32,64 --contexts 2048 --prefill-lengths 128 --baseline none --repeats 5 --out $OUT/decode-1b.json 2>&1 | grep -v "pt/s\|it/s" | tail -14
date -u
cat > $W/choice.py <<'PY'
import sys, time, numpy as np, jax
from bench.common import load_config
from internvl_jax import sharding, weights
from internvl_jax.runner import Runner
for preset in sys.argv[1:]:
    config, _ = load_config(preset)
    mesh = sharding.make_mesh(1, 1)
    model = weights.dummy_model(config, weights.DTYPES["bfloat16"], lambda s: sharding.param_shardings(s, mesh, "data"))
    for slots in (16, 32, 64):
        runner = Runner(model, mesh, "data", num_slots=slots, max_model_len=512, pool_tiles=1)
        started = time.perf_counter()
        t = runner.time_decode_mlps(runner.decode_mlp_candidates())
        print(preset, slots, {k: round(v * 1e3, 3) for k, v in t.items()}, f"{time.perf_counter() - started:.1f} s", flush=True)
    del model
PY
timeout 150 python3 $W/choice.py InternVL3-1B InternVL3-8B 2>&1 | tail -8
date -u
