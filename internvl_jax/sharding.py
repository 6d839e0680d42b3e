"""Sharding is a table, not code.

Every parameter carries logical axis names where it is declared (`layers.param`). One small table
per sub-model maps those names to the mesh axes ("data", "model"). The vision encoder has two
tables: `"weights"` (tensor parallel: heads and MLP split over "model") and `"data"` (every device
holds the whole encoder; the tile batch is split over all devices), the counterpart of vLLM's
`--mm-encoder-tp-mode weights|data`. Switching modes swaps a table; the model code is the same.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from internvl_jax.config import InternVLConfig

log = logging.getLogger(__name__)

DATA, MODEL = "data", "model"
ENCODER_MODES = ("weights", "data")

# Logical axis -> mesh axis. Names missing from a table are replicated.
TEXT_RULES: Mapping[str, str] = {"vocab": MODEL, "q_heads": MODEL, "kv_heads": MODEL, "mlp": MODEL}
VISION_RULES = {
    "weights": {"vis_heads": MODEL, "vis_mlp": MODEL},
    "data": {},
}
# The projector is ~0.3% of the encoder's FLOPs: replicated in both modes.
PROJECTOR_RULES: Mapping[str, str] = {}

# Activation specs, named by the tensor axes they cover.
tiles_data_btd = PartitionSpec((DATA, MODEL))  # encoder "data" mode: tiles over every device
tiles_weights_btd = PartitionSpec(DATA)  # encoder "weights" mode: tiles over "data" only


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if data * model > len(devices):
        raise ValueError(f"a {data} x {model} mesh needs {data * model} devices; {len(devices)} are available")
    grid = np.asarray(devices[: data * model]).reshape(data, model)
    return Mesh(grid, (DATA, MODEL))


def resolve_encoder_mode(config: InternVLConfig, mode: str, model_axis_size: int) -> str:
    """The encoder mode that will run: "weights" falls back to "data" when the vision heads do not
    divide the model axis (InternViT-6B has 25 heads), as vLLM does."""
    if mode not in ENCODER_MODES:
        raise ValueError(f"mm_encoder_tp_mode={mode!r}: expected one of {list(ENCODER_MODES)}")
    heads = config.vision.num_heads
    if mode == "weights" and model_axis_size > 1 and heads % model_axis_size:
        log.warning("vision encoder has %d heads, not divisible by tensor parallel size %d: "
                    "using mm_encoder_tp_mode='data' instead of 'weights'", heads, model_axis_size)
        return "data"
    return mode


def rules_for(path: tuple, encoder_mode: str) -> Mapping[str, str]:
    root = path[0]
    if root == "vision":
        return VISION_RULES[encoder_mode]
    if root == "projector":
        return PROJECTOR_RULES
    return TEXT_RULES


def spec_for(shape: tuple[int, ...], axes: tuple[str | None, ...], rules: Mapping[str, str],
             mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of one parameter. A dimension that the mesh axis does not divide is replicated
    (e.g. 2 KV heads over a model axis of 4)."""
    spec = []
    for size, name in zip(shape, axes, strict=True):
        mesh_axis = rules.get(name) if name else None
        if mesh_axis is not None and size % mesh.shape[mesh_axis]:
            mesh_axis = None
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def param_shardings(state: nnx.State, mesh: Mesh, encoder_mode: str) -> nnx.State:
    """A State of NamedShardings matching `state` (abstract or concrete)."""

    def sharding(path, variable):
        axes = variable.get_metadata().get("logical_axes") or (None,) * len(variable.get_value().shape)
        spec = spec_for(tuple(variable.get_value().shape), axes, rules_for(path, encoder_mode), mesh)
        return NamedSharding(mesh, spec)

    return nnx.map_state(sharding, state)


def padded_tiles(tiles: int, mesh: Mesh, encoder_mode: str) -> int:
    """Tile count padded to a multiple of the devices that split it (one tile on 4 devices -> 4)."""
    devices = mesh.size if encoder_mode == "data" else mesh.shape[DATA]
    return math.ceil(tiles / devices) * devices


def tile_spec(encoder_mode: str) -> PartitionSpec:
    return tiles_data_btd if encoder_mode == "data" else tiles_weights_btd
