"""Materialising a model: from converted safetensors, from an iterator of arrays, or random ("dummy")
weights at the real shapes; placed with the shardings of `sharding.py`.

Parameters are addressed by dotted paths ("text.layers.3.attn.q.kernel"), the keys of the converted
`model.safetensors`.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from internvl_jax.config import WEIGHTS_FILE, InternVLConfig
from internvl_jax.model import InternVL
from internvl_jax.programs import ProgramStore, build_programs, compile_workers

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class WeightsError(ValueError):
    """Weights that do not fit the model: names the paths."""


def dtype_of(name: str | None, config: InternVLConfig):
    name = name or config.dtype
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def path_name(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def abstract_model(config: InternVLConfig, dtype) -> InternVL:
    """The model with ShapeDtypeStruct leaves: shapes, dtypes and logical axes, no memory."""
    return nnx.eval_shape(lambda: InternVL(config, dtype, rngs=nnx.Rngs(0)))


def bytes_per_device(config: InternVLConfig, dtype, shardings_fn) -> int:
    """Bytes of weights one device holds under `shardings_fn`, from the abstract model (nothing allocated).
    Every parameter is either replicated or split evenly, so every device holds the same."""
    model = abstract_model(config, dtype)
    return sum(math.prod(sharding.shard_shape(abstract.shape)) * abstract.dtype.itemsize
               for _, abstract, sharding in _leaves(model, shardings_fn(nnx.state(model))))


def check_fits(config: InternVLConfig, dtype, shardings_fn, devices, headroom: float = 0.9) -> None:
    """Raises ValueError, before anything is allocated, when one device's share of the weights exceeds
    `headroom` of its memory (devices that report no limit, like the CPU, are not checked)."""
    stats = devices[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        return
    need = bytes_per_device(config, dtype, shardings_fn)
    if need > headroom * limit:
        raise ValueError(f"the weights need {need / 2**30:.1f} GiB per device with this tensor-parallel size, and "
                         f"a device has {limit / 2**30:.1f} GiB ({headroom:.0%} usable for weights): raise "
                         f"--tensor-parallel-size so each device holds a smaller share")


def _shardings_by_name(shardings: nnx.State | None) -> dict:
    """Parameter path -> NamedSharding (map_state leaves them wrapped in Variables)."""
    if shardings is None:
        return {}
    return {path_name(path): s.get_value() if isinstance(s, nnx.Variable) else s
            for path, s in nnx.to_flat_state(shardings)}


def _named(flat, shardings: nnx.State | None) -> Iterator[tuple[nnx.Variable, str, Any]]:
    """(variable, dotted name, sharding or None) of each leaf of a flat state."""
    sharding_of = _shardings_by_name(shardings)
    for path, var in flat:
        name = path_name(path)
        yield var, name, sharding_of.get(name)


def _leaves(model: InternVL, shardings: nnx.State | None) -> list[tuple[str, jax.ShapeDtypeStruct, Any]]:
    """(name, abstract array, sharding or None) of every weight of an abstract model."""
    flat = nnx.to_flat_state(nnx.state(model))
    return [(name, var.get_value(), sharding) for var, name, sharding in _named(flat, shardings)]


def _place(model: InternVL, make_leaf, shardings: nnx.State | None) -> InternVL:
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    for var, name, sharding in _named(flat, shardings):
        var.set_value(make_leaf(name, var.get_value(), sharding))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_arrays(config: InternVLConfig, arrays: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
                dtype=None, shardings_fn=None) -> InternVL:
    """Builds the model from (path, array) pairs, checking names and shapes.

    `shardings_fn(abstract_state) -> State of NamedSharding` places each leaf; None = default device.
    Arrays are cast to `dtype` on the host one at a time, so peak host memory stays near one tensor.
    """
    dtype = dtype or dtype_of(None, config)
    model = abstract_model(config, dtype)
    shardings = shardings_fn(nnx.state(model)) if shardings_fn else None
    expected = {name: (abstract, sharding) for name, abstract, sharding in _leaves(model, shardings)}
    pairs = arrays.items() if isinstance(arrays, Mapping) else arrays
    placed: dict[str, jax.Array] = {}
    seen: set[str] = set()
    problems: list[str] = []
    for name, array in pairs:
        seen.add(name)
        if name not in expected:
            problems.append(f"unexpected weight {name}")
            continue
        target, sharding = expected[name]
        if tuple(array.shape) != tuple(target.shape):
            problems.append(f"{name}: shape {tuple(array.shape)}, expected {tuple(target.shape)}")
            continue
        host = np.asarray(array).astype(NUMPY_DTYPES[jnp.dtype(dtype).name])
        placed[name] = jax.device_put(host, sharding) if sharding is not None else jnp.asarray(host)
    problems += [f"missing weight {name}" for name in sorted(set(expected) - seen)]
    if problems:
        shown = "\n  ".join(problems[:40]) + (f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else "")
        hint = ""
        if any(name.startswith("vision.") and ".attn.qkv." in name for name in seen):
            hint = ("\n(vision attn.qkv.* is the layout of conversions before the vision tower's q, k and v became "
                    "separate weights: convert the PyTorch checkpoint again with `python -m convert SRC DST`)")
        raise WeightsError(f"weights do not match the model config:\n  {shown}{hint}")
    return _place(model, lambda name, abstract, sharding: placed[name], None)


def load_safetensors(directory: str | Path, config: InternVLConfig, dtype=None, shardings_fn=None) -> InternVL:
    from safetensors import safe_open

    path = Path(directory, WEIGHTS_FILE)
    with safe_open(str(path), framework="numpy") as handle:
        pairs = ((name, handle.get_tensor(name)) for name in handle.keys())  # noqa: SIM118 (safe_open is not iterable)
        return load_arrays(config, pairs, dtype, shardings_fn)


def save_safetensors(model: InternVL, directory: str | Path) -> Path:
    from safetensors.numpy import save_file

    _, state = nnx.split(model)
    tensors = {path_name(path): np.asarray(jax.device_get(var.get_value())) for path, var in nnx.to_flat_state(state)}
    path = Path(directory, WEIGHTS_FILE)
    save_file(tensors, str(path))
    return path


def dummy_model(config: InternVLConfig, dtype=None, shardings_fn=None, seed: int = 0,
                store: ProgramStore | None = None) -> InternVL:
    """Random weights at the config's shapes (vLLM's `--load-format dummy`), generated on device.

    Norm scales and layer-scale vectors are ones, biases zeros, matrices N(0, 0.02): activations stay
    in a realistic range, so timings reflect real kernels (no NaN/inf fast paths). One small program per
    (kind, shape, dtype, sharding): with a program store (whose devices are the shardings' mesh) they are
    loaded from it, or compiled in threads at once and stored (InternVL3-1B: 25 programs for 637 weights,
    20-25 s of a cold start on an H100 when they were compiled one after the other, docs/PERF.md).
    """
    dtype = dtype or dtype_of(None, config)
    model = abstract_model(config, dtype)
    shardings = shardings_fn(nnx.state(model)) if shardings_fn else None
    key = jax.random.key(seed)

    def signature(name, abstract, sharding):
        kind = "ones" if name.endswith((".scale", "ls1", "ls2")) else "zeros" if name.endswith(".bias") else "normal"
        return kind, abstract.shape, abstract.dtype, sharding

    def program(signature):
        kind, shape, leaf_dtype, sharding = signature

        def init(base_key, leaf_salt):
            if kind == "ones":
                return jnp.ones(shape, leaf_dtype)
            if kind == "zeros":
                return jnp.zeros(shape, leaf_dtype)
            leaf_key = jax.random.fold_in(base_key, leaf_salt)
            return (0.02 * jax.random.normal(leaf_key, shape, jnp.float32)).astype(leaf_dtype)

        return jax.jit(init, out_shardings=sharding)

    signatures = list(dict.fromkeys(signature(*leaf) for leaf in _leaves(model, shardings)))
    programs = {each: program(each) for each in signatures}
    if store is not None:  # placed programs: loaded from the store, or compiled in threads and stored
        placed = [each for each in signatures if each[3] is not None]
        jobs = [(("dummy-weight", kind, tuple(shape), str(leaf_dtype), str(sharding)),
                 functools.partial(programs[kind, shape, leaf_dtype, sharding].lower, key, np.uint32(0)))
                for kind, shape, leaf_dtype, sharding in placed]
        for placed_signature, built in zip(placed, build_programs(jobs, store, compile_workers()), strict=True):
            programs[placed_signature] = built.program

    def make_leaf(name, abstract, sharding):
        salt = np.uint32(zlib.crc32(name.encode()) % (2**31))
        return programs[signature(name, abstract, sharding)](key, salt)

    return _place(model, make_leaf, shardings)
