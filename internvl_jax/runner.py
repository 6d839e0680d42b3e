"""The jitted device steps of the engine: encode tiles, prefill prompts into KV cache slots, decode
several tokens per dispatch. No Python decisions here: the scheduler (`engine.py`) decides, this
file computes.

Device state, all donated through every step (no copies):
  caches      per layer (k, v), each [B, S, K, H]: B decode slots, S = max_model_len, BTNH layout
  slots       `SlotState`: per-slot last token, cache length, sampling knobs, rng key
  pool        [P, tokens_per_tile, E]: projected image features by tile row (the encoder cache's storage)

Shapes: B slots, T prompt bucket, S cache length, K kv heads, H head dim, E LLM width, V vocabulary.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from internvl_jax import kernels, sampling, sharding
from internvl_jax.layers import gelu_tanh_in_dtype
from internvl_jax.model import InternVL, image_features
from internvl_jax.preprocess import normalisation_table
from internvl_jax.text import TextModel
from internvl_jax.vision import XLA_KERNELS, LayerKernels, Projector, VisionEncoder

log = logging.getLogger(__name__)


class SlotState(NamedTuple):
    tokens: jax.Array  # int32[B] last sampled token: the next step's input
    lengths: jax.Array  # int32[B] tokens in the cache = position of the next write
    generated: jax.Array  # int32[B] tokens sampled so far (rng step, min_tokens)
    temperature: jax.Array  # float32[B]
    top_p: jax.Array  # float32[B]
    top_k: jax.Array  # int32[B]
    keys: jax.Array  # uint32[B, 2] per-request rng key
    min_tokens: jax.Array  # int32[B]
    stop_ids: jax.Array  # int32[B, MAX_STOP_TOKEN_IDS], -1 padded: ids masked until min_tokens


class NewRequests(NamedTuple):
    """Host-built per-row inputs of a prefill batch (numpy, padded to the batch bucket)."""

    ids: np.ndarray  # int32[Bp, T]
    lengths: np.ndarray  # int32[Bp]
    slots: np.ndarray  # int32[Bp]; padding rows hold B (out of range: their writes are dropped)
    feature_rows: np.ndarray  # int32[Bp, T] row of the flattened pool for image tokens, -1 for text
    temperature: np.ndarray
    top_p: np.ndarray
    top_k: np.ndarray
    keys: np.ndarray
    min_tokens: np.ndarray
    stop_ids: np.ndarray

    @classmethod
    def empty(cls, batch: int, length: int, slot: int) -> NewRequests:
        """`batch` rows of `length` zero tokens (one of them valid), greedy, no images, written to
        `slot` (the slot count: out of range, so a row left empty writes nothing); callers fill rows in."""
        return cls(
            ids=np.zeros((batch, length), np.int32), lengths=np.ones(batch, np.int32),
            slots=np.full(batch, slot, np.int32), feature_rows=np.full((batch, length), -1, np.int32),
            temperature=np.zeros(batch, np.float32), top_p=np.ones(batch, np.float32), top_k=np.zeros(batch, np.int32),
            keys=np.zeros((batch, 2), np.uint32), min_tokens=np.zeros(batch, np.int32),
            stop_ids=np.full((batch, sampling.MAX_STOP_TOKEN_IDS), -1, np.int32))


class StepOutput(NamedTuple):
    """Device arrays; read on the host in the engine step after the one that dispatched them (sooner if done).
    Leading axis: steps (decode) or 1 (prefill)."""

    tokens: jax.Array  # int32[steps, B]
    logprobs: jax.Array  # float32[steps, B]
    top_logprobs: jax.Array  # float32[steps, B, MAX_LOGPROBS]
    top_ids: jax.Array  # int32[steps, B, MAX_LOGPROBS]


# Which steps XLA may run as CUDA graphs (its command buffers), as vLLM's cudagraph modes FULL,
# FULL_DECODE_ONLY and NONE (--enforce-eager). A graph saves a launch per kernel on the GPU but XLA updates
# it on the host before every call, at a cost that grows with the program (docs/PERF.md).
CUDA_GRAPH_STEPS = {"all": ("encode", "prefill", "decode"), "decode": ("decode",), "none": ()}
# Steps whose matrix products go to cuBLAS rather than XLA's Triton GEMMs. XLA autotunes a Triton GEMM by
# compiling and timing dozens of tilings per shape, most of a cold start (on one H100, 64 thread-seconds per
# encoder program and 80 per prefill program, against 6 and 12 with cuBLAS), while on these many-row
# products cuBLAS runs about as fast (0.9-1.2x the time per program, the same in sum). Decode keeps Triton:
# its few-row GEMMs are faster there (docs/PERF.md, seventh session).
CUBLAS_GEMM_STEPS = ("encode", "prefill")
# Steps whose GEMMs XLA may not merge. Its dot merger joins GEMMs that share an operand while they are small
# (each output below 32 MB): a vision layer's q, k and v at up to ~8 tiles. The merged GEMM's weights are
# concatenated on every call and its output sliced and biased by separate kernels, undoing what the separate
# projections are for (`vision._project`; docs/PERF.md, ninth session).
UNMERGED_GEMM_STEPS = ("encode",)
# Decoder layers whose MLPs the warm-up times to choose the decode MLP's kernels (`Runner.time_decode_mlps`).
MLP_TIMING_LAYERS = 8
# Vision layers, and tiles through them, that the warm-up runs to choose the encoder's LayerNorm and GELU kernels
# (`Runner.time_encoder_kernels`).
ENCODER_TIMING_LAYERS = 4
ENCODER_TIMING_TILES = 8
# The vision MLP's GELU (`--mm-encoder-gelu`): the model's exact one, or the tanh approximation as fc1's epilogue.
VISION_GELUS = ("exact", "tanh")


class StepCall(NamedTuple):
    """One call of a serving step: the program that runs it and its arguments."""

    key: tuple  # (step, the bucket shape and static flags): names the program among this runner's
    jitted: Any  # the jax.jit that traces and compiles it
    args: tuple  # traced arguments
    static: tuple = ()  # the jit's trailing static arguments


class Runner:
    """Owns the weights (from here on the model's vision tower is in its serving form, the layer scales folded
    into the weights: `VisionLayer.fold_layer_scale`), KV cache, slot state and feature pool on the mesh, and
    the jitted steps.

    A step runs the executable in `programs` under its key when there is one (compiled ahead of time
    or loaded from disk by the engine's warm-up), else goes through its `jax.jit`."""

    def __init__(self, model: InternVL, mesh, encoder_mode: str, *, num_slots: int, max_model_len: int,
                 pool_tiles: int, cuda_graphs: str = "all", vision_gelu: str = "exact"):
        if cuda_graphs not in CUDA_GRAPH_STEPS:
            raise ValueError(f"cuda_graphs={cuda_graphs!r}: use one of {', '.join(CUDA_GRAPH_STEPS)}")
        if vision_gelu not in VISION_GELUS:
            raise ValueError(f"vision_gelu={vision_gelu!r}: expected one of {list(VISION_GELUS)}")
        self.cuda_graphs = cuda_graphs
        # "tanh": an exact-GELU vision tower's MLP runs the tanh approximation, folded into fc1's GEMM
        # (`layers.gelu_tanh_in_dtype`); towers with another activation keep theirs.
        self.vision_gelu = vision_gelu
        config = model.config
        self.config = config
        self.mesh = mesh
        self.encoder_mode = encoder_mode
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self.pool_tiles = pool_tiles
        model.vision.fold_layer_scales()  # the serving form of the tower: see VisionLayer.fold_layer_scale
        # Each jitted step takes only the weights it reads: every argument costs host time per dispatch
        # (docs/PERF.md), and the decoder's steps never touch the vision tower.
        self._vision_def, vision_state = nnx.split(model.vision)
        self._projector_def, projector_state = nnx.split(model.projector)
        self._text_def, text_state = nnx.split(model.text)
        self.encoder_leaves, self._encoder_treedef = jax.tree.flatten((vision_state, projector_state))
        self.text_leaves, self._text_treedef = jax.tree.flatten(text_state)
        self.dtype = self.text_leaves[0].dtype
        text = config.text
        tp = mesh.shape[sharding.MODEL]
        kv_axis = sharding.MODEL if text.num_kv_heads % tp == 0 else None
        self.cache_sharding = NamedSharding(mesh, PartitionSpec(sharding.DATA, None, kv_axis, None))
        self.slot_sharding = NamedSharding(mesh, PartitionSpec(sharding.DATA))
        # Prefill rows, split over "data" like the slots: replica d prefills the prompts of its own slots.
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(sharding.DATA))
        self.data_size = mesh.shape[sharding.DATA]
        if num_slots % self.data_size:
            raise ValueError(f"num_slots={num_slots} does not split over {self.data_size} data-parallel replicas")
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.tile_sharding = NamedSharding(mesh, sharding.tile_spec(encoder_mode))
        cache_shape = (num_slots, max_model_len, text.num_kv_heads, text.head_dim)
        # Zeros, not empty: masked attention still multiplies p=0 by cached V, and uninitialised
        # memory may hold NaN.
        zeros = jax.jit(lambda: jnp.zeros(cache_shape, self.dtype), out_shardings=self.cache_sharding)
        self.caches = [(zeros(), zeros()) for _ in range(text.num_layers)]
        self.slots = jax.device_put(self._empty_slots(), self.slot_sharding)
        pool_shape = (pool_tiles, config.tokens_per_tile, text.hidden_size)
        self.pool = jax.jit(lambda: jnp.zeros(pool_shape, self.dtype), out_shardings=self.replicated)()
        self.decode_attention = self.decode_attention_candidates()[0]
        self.decode_mlp = "xla"  # or "pallas" (`decode_mlp_candidates`), chosen by measurement at warm-up
        self.encoder_kernels = "xla"  # or "pallas" (`encoder_kernel_candidates`), chosen by measurement at warm-up
        self.programs: dict[tuple, jax.stages.Compiled] = {}
        self._last_mask: tuple[np.ndarray, jax.Array] | None = None  # `_device_mask`'s (host, device) pair

    @property
    def tanh_vision_gelu(self) -> bool:
        """True where `vision_gelu` "tanh" applies: the vision tower's activation is the exact GELU."""
        return self.vision_gelu == "tanh" and self.config.vision.hidden_act == "gelu"

    def compiler_options(self, step: str) -> dict[str, Any]:
        """The XLA options of one serving step's programs (the other steps keep theirs): without CUDA graphs
        unless `cuda_graphs` names the step, cuBLAS GEMMs for the steps in CUBLAS_GEMM_STEPS, no GEMM merging
        in UNMERGED_GEMM_STEPS."""
        options = {}
        if step not in CUDA_GRAPH_STEPS[self.cuda_graphs]:
            options["xla_gpu_enable_command_buffer"] = ""
        if step in CUBLAS_GEMM_STEPS:
            options["xla_gpu_enable_triton_gemm"] = False
        if step in UNMERGED_GEMM_STEPS:
            options["xla_gpu_dot_merger_threshold_mb"] = 0
        return options

    def _jit(self, step: str, fun, **kwargs):
        return jax.jit(fun, compiler_options=self.compiler_options(step) or None, **kwargs)

    def _empty_slots(self) -> SlotState:
        b = self.num_slots
        return SlotState(
            tokens=np.zeros(b, np.int32), lengths=np.zeros(b, np.int32), generated=np.zeros(b, np.int32),
            temperature=np.zeros(b, np.float32), top_p=np.ones(b, np.float32), top_k=np.zeros(b, np.int32),
            keys=np.zeros((b, 2), np.uint32), min_tokens=np.zeros(b, np.int32),
            stop_ids=np.full((b, sampling.MAX_STOP_TOKEN_IDS), -1, np.int32))

    @property
    def leaves(self) -> list[jax.Array]:
        """Every weight array (for memory accounting)."""
        return [*self.encoder_leaves, *self.text_leaves]

    def _text(self, leaves) -> TextModel:
        return nnx.merge(self._text_def, jax.tree.unflatten(self._text_treedef, leaves))

    def _vision(self, leaves) -> tuple[VisionEncoder, Projector]:
        vision_state, projector_state = jax.tree.unflatten(self._encoder_treedef, leaves)
        return nnx.merge(self._vision_def, vision_state), nnx.merge(self._projector_def, projector_state)

    def _features(self, leaves, pixels_BCHW, hidden_sharding, impl: str):
        vision, projector = self._vision(leaves)
        return image_features(vision, projector, pixels_BCHW, hidden_sharding, self._layer_kernels(impl))

    @property
    def _state_shardings(self):
        """Output shardings of prefill and decode: (caches, slots, outputs). Spelled out rather than left to
        XLA's propagation, whose answer can differ from the initial state's (e.g. P() for P("data") over a
        1-device axis, or the rng keys on "model"): a differently spelled input sharding is another jit cache
        key, so the first step after a state change would compile again."""
        caches = [(self.cache_sharding, self.cache_sharding)] * self.config.text.num_layers
        slots = SlotState(*(self.slot_sharding,) * len(SlotState._fields))
        return caches, slots, self.replicated

    def _whole_vocabulary(self, logits_BV):
        """Each row's logits whole on its replica's devices (rows stay split over "data"): the top-k/top-p
        filter sorts and prefix-sums the vocabulary, and XLA partitions a prefix sum over a vocabulary split
        across "model" into a windowed sum of quadratic cost (8B at TP=2, 151k vocabulary: prefill took 274 of
        315 s serving arena-c64, docs/PERF.md). Gathering the rows' [B, V] logits costs a few MB."""
        return jax.lax.with_sharding_constraint(logits_BV, self.batch_sharding)

    def _pin_caches(self, caches):
        return [tuple(jax.lax.with_sharding_constraint(x, self.cache_sharding) for x in kv) for kv in caches]

    # ---- encode -------------------------------------------------------------------------------------
    @functools.cached_property
    def _encode_jit(self):
        def encode(leaves, pool, pixels_BCHW, rows_B, kernels_impl: str):
            pixels_BCHW = jax.lax.with_sharding_constraint(pixels_BCHW, self.tile_sharding)
            if pixels_BCHW.dtype == jnp.uint8:
                # Raw levels -> the preprocessing's normalisation table, so the values are bit-identical
                # to normalising on the host (a gather of 3 x 256 float32 entries).
                table = jnp.asarray(normalisation_table())
                pixels_BCHW = table[jnp.arange(3)[None, :, None, None], pixels_BCHW.astype(jnp.int32)]
            features = self._features(leaves, pixels_BCHW, self.tile_sharding, kernels_impl)
            pool = pool.at[rows_B].set(features.astype(pool.dtype), mode="drop")
            return jax.lax.with_sharding_constraint(pool, self.replicated)
        return self._jit("encode", encode, donate_argnums=(1,), static_argnums=(4,), out_shardings=self.replicated)

    def encode(self, pixels: np.ndarray, rows: np.ndarray) -> None:
        """Encodes tiles [Tb, 3, S, S] (padded to a bucket) into pool rows int32[Tb] (padding rows =
        pool_tiles, dropped). uint8 tiles (the serving path) are normalised on the device: a quarter of
        the bytes of float32 over PCIe and no host-side cast; float tiles are taken as normalised."""
        self.pool = self._run(self._encode_call(pixels, rows))

    def _encode_call(self, pixels: np.ndarray, rows: np.ndarray) -> StepCall:
        if pixels.dtype != np.uint8:
            pixels = np.asarray(pixels, self.dtype)
        key = ("encode", pixels.shape[0], str(pixels.dtype), self.encoder_kernels)
        # Both straight to the devices that take them (a jnp.asarray would land on one device first, to be
        # copied again by the call).
        pixels, rows = jax.device_put((pixels, np.asarray(rows, np.int32)), (self.tile_sharding, self.replicated))
        return StepCall(key, self._encode_jit, (self.encoder_leaves, self.pool, pixels, rows),
                        (self.encoder_kernels,))

    @functools.cached_property
    def _put_features_jit(self):
        def put(pool, features, rows):
            return pool.at[rows].set(features.astype(pool.dtype), mode="drop")
        return jax.jit(put, donate_argnums=(0,), out_shardings=self.replicated)

    def put_features(self, features: np.ndarray, rows: np.ndarray) -> None:
        """Stores precomputed image embeddings [Tb, tokens_per_tile, E] at pool rows."""
        self.pool = self._put_features_jit(self.pool, jnp.asarray(features), jnp.asarray(rows, jnp.int32))

    # ---- prefill ------------------------------------------------------------------------------------
    @functools.cached_property
    def _prefill_jit(self):
        def prefill(leaves, caches, slots: SlotState, pool, new: NewRequests, want_top: bool):
            text = self._text(leaves)
            batch, tokens = new.ids.shape
            with jax.named_scope("embed"):
                text_embeds = text.embed_tokens(new.ids)
                pool_flat = pool.reshape(-1, pool.shape[-1])
                placed = jnp.take(pool_flat, jnp.maximum(new.feature_rows, 0), axis=0).astype(text_embeds.dtype)
                embeds = jnp.where((new.feature_rows >= 0)[..., None], placed, text_embeds)
            positions = jnp.broadcast_to(jnp.arange(tokens), (batch, tokens))
            hidden, kvs = text(embeds, positions, new.lengths)
            last = jnp.take_along_axis(hidden, jnp.maximum(new.lengths - 1, 0)[:, None, None], axis=1)
            logits = self._whole_vocabulary(text.logits(last)[:, 0])  # prefill always runs "filtered"
            zeros = jnp.zeros((batch,), jnp.int32)
            logits = sampling.suppress_stop_tokens(logits, new.stop_ids, zeros, new.min_tokens)
            # Every variant in one program (a few prompt rows: the sort costs little beside the prefill).
            next_tokens = sampling.sample(logits, new.temperature, new.top_p, new.top_k, new.keys, zeros, "filtered")
            chosen, top_values, top_ids = sampling.token_logprobs(logits, next_tokens, want_top)
            with jax.named_scope("cache_insert"):
                caches = self._insert_prompts(caches, kvs, new.slots)
            at = new.slots
            slots = SlotState(
                tokens=slots.tokens.at[at].set(next_tokens, mode="drop"),
                lengths=slots.lengths.at[at].set(new.lengths, mode="drop"),
                generated=slots.generated.at[at].set(1, mode="drop"),
                temperature=slots.temperature.at[at].set(new.temperature, mode="drop"),
                top_p=slots.top_p.at[at].set(new.top_p, mode="drop"),
                top_k=slots.top_k.at[at].set(new.top_k, mode="drop"),
                keys=slots.keys.at[at].set(new.keys, mode="drop"),
                min_tokens=slots.min_tokens.at[at].set(new.min_tokens, mode="drop"),
                stop_ids=slots.stop_ids.at[at].set(new.stop_ids, mode="drop"),
            )
            slots = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.slot_sharding), slots)
            output = StepOutput(next_tokens[None], chosen[None], top_values[None], top_ids[None])
            return self._pin_caches(caches), slots, output
        return self._jit("prefill", prefill, donate_argnums=(1, 2), static_argnums=(5,),
                         out_shardings=self._state_shardings)

    def _insert_prompts(self, caches, kvs, slots_B):
        """Writes each prompt's K/V [B, T, K, H] at its slot's cache rows. Prompt rows and slots are split
        alike over "data" (the engine puts each prompt on the replica that holds its slot), so every replica
        writes its own rows into its own block of slots and no cache moves between devices."""
        def insert(caches, kvs, slots_B):
            block = caches[0][0].shape[0]
            local = slots_B - jax.lax.axis_index(sharding.DATA) * block
            rows = jnp.where((local >= 0) & (local < block), local, block)[:, None]  # padding rows: dropped
            columns = jnp.arange(kvs[0][0].shape[1])[None, :]
            return [(ck.at[rows, columns].set(k.astype(ck.dtype), mode="drop"),
                     cv.at[rows, columns].set(v.astype(cv.dtype), mode="drop"))
                    for (ck, cv), (k, v) in zip(caches, kvs, strict=True)]
        spec = self.cache_sharding.spec
        return jax.shard_map(insert, mesh=self.mesh, in_specs=(spec, spec, self.batch_sharding.spec),
                             out_specs=spec)(caches, kvs, slots_B)

    def prefill(self, new: NewRequests, want_top: bool) -> StepOutput:
        self.caches, self.slots, output = self._run(self._prefill_call(new, want_top))
        return output

    def _prefill_call(self, new: NewRequests, want_top: bool) -> StepCall:
        if new.ids.shape[0] % self.data_size:
            raise ValueError(f"a prefill batch of {new.ids.shape[0]} rows does not split over {self.data_size} "
                             "replicas")
        key = ("prefill", *new.ids.shape, want_top)
        new = NewRequests(*jax.device_put(tuple(np.asarray(x) for x in new), self.batch_sharding))  # one batched put
        return StepCall(key, self._prefill_jit, (self.text_leaves, self.caches, self.slots, self.pool, new),
                        (want_top,))

    # ---- decode -------------------------------------------------------------------------------------
    @functools.cached_property
    def _decode_jit(self):
        max_len = self.max_model_len

        def decode(leaves, caches, slots: SlotState, active_B, steps: int, want_top: bool, attention_impl,
                   sampling_mode: str, mlp_impl: str):
            text = self._text(leaves)
            mlp_kernel = self._mlp_kernel(mlp_impl)

            def step(carry, _):
                caches, slots = carry
                embeds = text.embed_tokens(slots.tokens[:, None])
                # Finished or free slots keep computing (fixed shapes); their writes past the cache end
                # are dropped and their tokens ignored by the host.
                positions = jnp.minimum(slots.lengths, max_len - 1)
                hidden, caches = text(embeds, positions[:, None], None, caches, positions, attention_impl, mlp_kernel)
                logits = text.logits(hidden)[:, 0]
                if sampling_mode == "filtered":
                    logits = self._whole_vocabulary(logits)
                logits = sampling.suppress_stop_tokens(logits, slots.stop_ids, slots.generated, slots.min_tokens)
                tokens = sampling.sample(logits, slots.temperature, slots.top_p, slots.top_k, slots.keys,
                                         slots.generated, sampling_mode)
                chosen, top_values, top_ids = sampling.token_logprobs(logits, tokens, want_top)
                advance = active_B.astype(jnp.int32)
                slots = slots._replace(tokens=jnp.where(active_B, tokens, slots.tokens),
                                       lengths=slots.lengths + advance, generated=slots.generated + advance)
                return (self._pin_caches(caches), slots), StepOutput(tokens, chosen, top_values, top_ids)

            (caches, slots), outputs = jax.lax.scan(step, (caches, slots), None, length=steps)
            return caches, slots, outputs
        return self._jit("decode", decode, donate_argnums=(1, 2), static_argnums=(4, 5, 6, 7, 8),
                         out_shardings=self._state_shardings)

    def decode(self, active: np.ndarray, steps: int, want_top: bool, attention_impl: str | None = None,
               sampling_mode: str = "filtered") -> StepOutput:
        """`attention_impl` None uses `self.decode_attention` (chosen by measurement at warm-up), the MLP is
        `self.decode_mlp`'s; `sampling_mode` (sampling.SAMPLING_MODES) must cover every active slot's parameters
        (`sampling.sampling_mode`); the default "filtered" covers any."""
        self.caches, self.slots, output = self._run(
            self._decode_call(active, steps, want_top, attention_impl, sampling_mode))
        return output

    def _decode_call(self, active: np.ndarray, steps: int, want_top: bool, attention_impl: str | None = None,
                     sampling_mode: str = "filtered") -> StepCall:
        active = self._device_mask(active)
        static = (steps, want_top, attention_impl or self.decode_attention, sampling_mode, self.decode_mlp)
        return StepCall(("decode", *static), self._decode_jit, (self.text_leaves, self.caches, self.slots, active),
                        static)

    def _device_mask(self, active: np.ndarray) -> jax.Array:
        """The decode's bool[slots] mask on the devices: the previous dispatch's array while the running slots are
        the same (most steps), instead of a transfer per dispatch (a dispatch's host time is the engine thread's:
        docs/PERF.md, fourteenth session). The mask is not donated, so it can be passed again."""
        active = np.asarray(active, bool)
        if self._last_mask is None or not np.array_equal(self._last_mask[0], active):
            self._last_mask = (active.copy(), jax.device_put(active, self.slot_sharding))
        return self._last_mask[1]

    def _run(self, call: StepCall):
        program = self.programs.get(call.key)
        if program is None:
            return call.jitted(*call.args, *call.static)
        return program(*call.args)

    # ---- ahead-of-time compilation ------------------------------------------------------------------
    def step_call(self, step: str, *args) -> StepCall:
        """What `getattr(self, step)(*args)` ("encode", "prefill" or "decode") would run, without running it:
        no state is donated or replaced."""
        return getattr(self, f"_{step}_call")(*args)

    def lower(self, step: str, *args) -> jax.stages.Lowered:
        """The program of `step_call(step, *args)`, traced and lowered but neither compiled nor run. Compiled
        (in any thread: XLA releases the GIL) and put in `programs` under the call's key, it runs that step."""
        call = self.step_call(step, *args)
        return call.jitted.lower(*call.args, *call.static)

    def decode_attention_candidates(self) -> list[str]:
        """cuDNN reads only each slot's valid prefix but has a high fixed cost per call; XLA's einsum
        reads the whole cache but is cheaper for few slots. Which wins depends on the slot count and
        context, so the engine measures both at warm-up on GPU."""
        from internvl_jax.layers import cudnn_usable_dtype

        return ["xla", "cudnn"] if cudnn_usable_dtype(self.dtype, self.config.text.head_dim) else ["xla"]

    def _mlp_axis(self) -> str | None:
        """The mesh axis the MLP width is split over: the weights' own rule (`sharding.spec_for`)."""
        text = self.config.text
        return sharding.spec_for((text.hidden_size, text.intermediate_size), ("embed", "mlp"), sharding.TEXT_RULES,
                                 self.mesh)[1]

    def _mlp_tiles(self) -> kernels.Plan | None:
        text, axis = self.config.text, self._mlp_axis()
        mlp_width = text.intermediate_size // (self.mesh.shape[axis] if axis else 1)
        return kernels.plan(self.num_slots // self.data_size, text.hidden_size, mlp_width)

    def decode_mlp_candidates(self) -> list[str]:
        """XLA's GEMMs, and on GPU the Pallas kernels of `kernels` where they apply to these shapes (16 to 64
        decode rows per replica): they beat XLA at a 1B's widths and lose at an 8B's (docs/PERF.md), so the
        engine measures both at warm-up."""
        return ["xla", "pallas"] if kernels.available() and self._mlp_tiles() is not None else ["xla"]

    def _mlp_kernel(self, impl: str):
        """The decode MLP's kernel for `DecoderLayer.mlp_block`: None for XLA's GEMMs. The Pallas kernels run
        interpreted off GPU (tests)."""
        if impl == "xla":
            return None
        tiles = self._mlp_tiles()
        if impl != "pallas" or tiles is None:
            raise ValueError(f"decode MLP {impl!r}: not usable here (candidates: {self.decode_mlp_candidates()})")
        return kernels.sharded_mlp(self.mesh, sharding.DATA, self._mlp_axis(), tiles,
                                   interpret=jax.default_backend() != "gpu")

    def time_decode_mlps(self, candidates: list[str], layers: int = MLP_TIMING_LAYERS, rounds: int = 16,
                         repeats: int = 3) -> dict[str, float]:
        """Seconds per pass over the first `layers` decoder layers' MLP blocks (norm, MLP, residual; each layer's
        weights stream from HBM as in a decode step) on a decode batch (one row per slot), for each MLP in
        `candidates`. One program runs `rounds` passes, so that its device time, not the dispatch of its
        arguments (milliseconds: docs/PERF.md), is what is timed; one untimed call (it compiles: a few layers
        keep that short), then `repeats` chained calls."""
        hidden = jax.device_put(np.ones((self.num_slots, 1, self.config.text.hidden_size), self.dtype),
                                self.slot_sharding)
        timings = {}
        for impl in candidates:
            def passes(leaves, x, impl=impl):
                kernel, blocks = self._mlp_kernel(impl), self._text(leaves).layers[:layers]

                def one_pass(_, x):
                    for layer in blocks:
                        x = layer.mlp_block(x, kernel)
                    return x
                return jax.lax.fori_loop(0, rounds, one_pass, x)

            call = functools.partial(jax.jit(passes), self.text_leaves, hidden)
            timings[impl] = _seconds_per_call(call, repeats) / rounds
        return timings

    def encoder_kernel_candidates(self) -> list[str]:
        """XLA's fusions, and on GPU the Pallas LayerNorm and GELU (`kernels.layer_norm`, `kernels.gelu`) where
        the vision layers have a LayerNorm or an exact GELU of widths they take (InternViT-300M: both; the 6B's
        3,200-wide RMSNorms: neither): measured at warm-up."""
        usable = kernels.available() and self._layer_kernels("pallas") != self._layer_kernels("xla")
        return ["xla", "pallas"] if usable else ["xla"]

    def _layer_kernels(self, impl: str) -> LayerKernels:
        """The vision layers' `LayerKernels` for `impl`: XLA's fusions only, or the Pallas kernels where they apply
        (run interpreted off GPU: tests). With `vision_gelu` "tanh" an exact-GELU tower's GELU is
        `layers.gelu_tanh_in_dtype` in both (XLA folds it into fc1's GEMM; no kernel of ours)."""
        if impl not in ("xla", "pallas"):
            raise ValueError(f"encoder kernels {impl!r}: expected 'xla' or 'pallas'")
        vision, interpret = self.config.vision, jax.default_backend() != "gpu"
        tanh_gelu = gelu_tanh_in_dtype if self.tanh_vision_gelu else None
        if impl == "xla":
            return XLA_KERNELS._replace(gelu=tanh_gelu)
        tiles_axis = self.tile_sharding.spec[0]
        mlp_axis = sharding.spec_for((vision.intermediate_size,), ("vis_mlp",),
                                     sharding.VISION_RULES[self.encoder_mode], self.mesh)[0]
        mlp_width = vision.intermediate_size // (self.mesh.shape[mlp_axis] if mlp_axis else 1)
        norm = vision.norm_type != "rms_norm" and kernels.row_blocks(1, vision.hidden_size) is not None
        gelu = vision.hidden_act == "gelu" and kernels.row_blocks(1, mlp_width) is not None
        return LayerKernels(kernels.sharded_layer_norm(self.mesh, tiles_axis, interpret) if norm else None,
                            tanh_gelu or (kernels.sharded_gelu(self.mesh, tiles_axis, mlp_axis, interpret)
                                          if gelu else None))

    def timing_tiles(self, tiles: int = ENCODER_TIMING_TILES) -> int:
        """The tiles `time_encoder_kernels` runs for `tiles`: padded to the devices that split them."""
        return sharding.padded_tiles(tiles, self.mesh, self.encoder_mode)

    def time_encoder_kernels(self, candidates: list[str], layers: int = ENCODER_TIMING_LAYERS,
                             tiles: int = ENCODER_TIMING_TILES, rounds: int = 4, repeats: int = 3) -> dict[str, float]:
        """Seconds per pass of `tiles` tiles' activations (padded over the devices: `timing_tiles`) through the
        first `layers` vision layers, for each of `candidates` (`encoder_kernel_candidates`): the layers whole
        (compiled as the encode step is), since XLA fuses its LayerNorm and GELU with their neighbours and a kernel
        of our own stands alone. One program runs `rounds` passes; one untimed call, then `repeats` chained calls."""
        vision = self.config.vision
        tiles = self.timing_tiles(tiles)
        tokens = vision.num_patches + 1
        hidden = jax.device_put(np.ones((tiles, tokens, vision.hidden_size), self.dtype), self.tile_sharding)
        timings = {}
        for impl in candidates:
            def passes(leaves, x, impl=impl):
                layer_kernels, blocks = self._layer_kernels(impl), self._vision(leaves)[0].layers[:layers]

                def one_pass(_, x):
                    for layer in blocks:
                        x = jax.lax.with_sharding_constraint(layer(x, None, layer_kernels), self.tile_sharding)
                    return x
                return jax.lax.fori_loop(0, rounds, one_pass, x)

            call = functools.partial(self._jit("encode", passes), self.encoder_leaves, hidden)
            timings[impl] = _seconds_per_call(call, repeats) / rounds
        return timings

    def slot_replica(self, slot: int) -> int:
        """The data-parallel replica (index on "data") whose devices hold `slot`'s cache."""
        return slot // (self.num_slots // self.data_size)

    def set_lengths(self, lengths: np.ndarray) -> None:
        """Overwrites every slot's cache length (benchmarks and warm-up measurements only)."""
        self.slots = self.slots._replace(lengths=jax.device_put(np.asarray(lengths, np.int32), self.slot_sharding))

    def time_decode_attentions(self, candidates: list[str], context: int, steps: int,
                               sampling_mode: str) -> dict[str, float]:
        """Seconds per decode dispatch of `steps` steps for each attention kernel in `candidates`, every slot
        active at `context` cached tokens: one untimed dispatch, then three timed. The slots' lengths are left
        at `context` (the caller resets them)."""
        active = np.ones(self.num_slots, bool)
        timings = {}
        for impl in candidates:
            self.set_lengths(np.full(self.num_slots, context))
            timings[impl] = _seconds_per_call(
                lambda impl=impl: self.decode(active, steps, False, impl, sampling_mode).tokens, repeats=3)
        return timings


def _seconds_per_call(call: Callable[[], Any], repeats: int) -> float:
    """One untimed `call()` (it compiles), then `repeats` chained calls, waiting on what the last returns: seconds
    per call."""
    jax.block_until_ready(call())
    started = time.perf_counter()
    for _ in range(repeats):
        out = call()
    jax.block_until_ready(out)
    return (time.perf_counter() - started) / repeats
