"""Does folding InternViT's layer scale into the out/fc2 weights let XLA put the residual add into the cuBLAS GEMM?

    PYTHONPATH=. python docs/results/session8-2026-11-28/fold_probe.py
    (OUT=folder for foldprobe.json; FOLD_T=tokens, default 32 x 1025)

One InternViT-300M branch at 32 tiles (bf16): the GEMM with bias, layer scale and residual as the model had them,
folded (x + h @ W' + b'), without bias, and the GEMM alone; compiled with cuBLAS GEMMs (as the runner compiles
encode) and with XLA's defaults; prints us per call, the kernels outside the GEMM, and cuBLAS's beta and epilogue.
(Call 7 of the eighth session ran this script's logic as .devrun/foldprobe.py, the same code on fewer lines.)
"""
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

T, D = int(os.environ.get("FOLD_T", 32 * 1025)), 1024
rng = np.random.default_rng(0)


def normal(shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.bfloat16)


x, h, h4 = normal((T, D)), normal((T, D)), normal((T, 4 * D))
W, W4 = normal((D, D), 0.02), normal((4 * D, D), 0.02)
b, ls = normal((D,), 0.02), normal((D,), 0.1)
cases = {
    "o: x + (h@W + b) * ls": (lambda x, h, W, b, ls: x + (h @ W + b) * ls, (x, h, W, b, ls)),
    "o: x + (h@W' + b')": (lambda x, h, W, b: x + (h @ W + b), (x, h, W, b)),
    "o: x + h@W'": (lambda x, h, W: x + h @ W, (x, h, W)),
    "o: h@W only": (lambda h, W: h @ W, (h, W)),
    "fc2: x + (h4@W4 + b) * ls": (lambda x, h, W, b, ls: x + (h @ W + b) * ls, (x, h4, W4, b, ls)),
    "fc2: x + (h4@W4' + b')": (lambda x, h, W, b: x + (h @ W + b), (x, h4, W4, b)),
    "fc2: h4@W4 only": (lambda h, W: h @ W, (h4, W4)),
}
out = {}
for name, (function, args) in cases.items():
    for options_name, options in (("cublas", {"xla_gpu_enable_triton_gemm": False}), ("default", {})):
        compiled = jax.jit(function).lower(*args).compile(compiler_options=options or None)
        text = compiled.as_text()
        entry = text[text.rfind("ENTRY"):]
        kernels = len(re.findall(r"= \S+ (fusion|custom-call)\(", entry))
        beta = re.findall(r'"beta":([0-9.]+)', text)
        epilogue = re.findall(r'"epilogue":"(\w+)"', text)
        jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(20):
                result = compiled(*args)
            jax.block_until_ready(result)
            times.append((time.perf_counter() - started) / 20 * 1e6)
        out[f"{name} [{options_name}]"] = {"us": round(min(times), 1), "kernels": kernels, "beta": beta,
                                           "epilogue": epilogue}
        print(f"{name:32s} {options_name:8s} {min(times):8.1f} us  kernels {kernels}  beta {beta} "
              f"epilogue {epilogue}", flush=True)
with open(os.path.join(os.environ.get("OUT", "."), "foldprobe.json"), "w") as handle:
    json.dump(out, handle, indent=1)
