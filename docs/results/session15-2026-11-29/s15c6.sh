# session 15 call 6, one H200: the Pallas decode programs stored and loaded: a cold start, then a cached start, same greedy tokens
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
cat > $W/twice.py <<'PY'
import logging, time, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
for name in ("jax", "absl"):
    logging.getLogger(name).setLevel(logging.WARNING)
started = time.time()
import internvl_jax
from internvl_jax.sampling import SamplingParams
llm = internvl_jax.LLM("InternVL3-1B", load_format="dummy", max_num_seqs=32)
print("ready in", round(time.time() - started, 1), "s; decode MLP", llm.engine.runner.decode_mlp, flush=True)
outs = llm.generate([f"Hello number {i}" for i in range(4)], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
print("TOKENS", [o.outputs[0].token_ids for o in outs], flush=True)
PY
date -u
for run in cold cached; do timeout 150 python3 $W/twice.py > $W/$run.log 2>&1; echo "$run rc $?"; grep -h "ready in\|decode MLP\|loaded\|lowered\|not stored\|could not" $W/$run.log | cut -c1-220; grep -h TOKENS $W/$run.log | md5sum; done
date -u
cp $W/cold.log $W/cached.log $OUT/
