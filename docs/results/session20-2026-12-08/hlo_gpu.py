"""Session 20: the optimized HLO of three serving programs (metadata stripped), to compare two trees.
usage: python hlo_gpu.py OUT_PREFIX PRESET"""
import hashlib, json, re, sys, time
import jax
from internvl_jax import engine as E, offline
import numpy as np

out, preset = sys.argv[1], sys.argv[2]
gpu = jax.default_backend() == "gpu"

def warm(self, progress=True):
    runner = self.runner
    if gpu:
        runner.encoder_kernels, runner.decode_mlp = "pallas", "pallas"
    attention = "cudnn" if gpu else "xla"
    image = runner.config.vision.image_size
    jobs = [("encode", (np.zeros((8, 3, image, image), np.uint8), np.full(8, runner.pool_tiles))),
            ("prefill", (self._new_requests(1, 2048), False)),
            ("decode", (np.zeros(runner.num_slots, bool), 8, False, attention, "greedy"))]
    result = {}
    for kind, args in jobs:
        started = time.monotonic()
        call = runner.step_call(kind, *args)
        text = call.jitted.lower(*call.args, *call.static).compile().as_text()
        text = re.sub(r",? metadata=\{[^}]*\}", "", text)
        text = re.sub(r"^HloModule.*$", "", text, flags=re.M)
        plain = re.sub(r'backend_config="(?:[^"\\]|\\.)*"', "", text)
        plain = re.sub(r"backend_config=\{.*?\}(?=[,\s]|$)", "", plain)
        result[str(call.key)] = {"hlo": hashlib.sha256(text.encode()).hexdigest()[:16],
                                 "hlo_without_backend_config": hashlib.sha256(plain.encode()).hexdigest()[:16],
                                 "instructions": text.count("\n"), "seconds": round(time.monotonic() - started, 1)}
        with open(f"{out}-{kind}.txt", "w") as handle:
            handle.write(text)
    print(json.dumps(result, indent=1))
    raise SystemExit

E.Engine.warmup = warm
offline.LLM(None if preset == "demo" else preset, load_format="auto" if preset == "demo" else "dummy", compilation_cache=False, max_num_seqs=32)
