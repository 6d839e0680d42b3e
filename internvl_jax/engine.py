"""The scheduler: continuous batching over fixed decode slots, with bucketed prefill, batched and
cached image encoding, and tokens read back one step late.

One engine step:
  1. take new requests and aborts (thread-safe inbox);
  2. admit waiting requests into free slots; encode the tiles of their images that are not in the
     feature cache, in encoder calls cut to the tile buckets (`_encode_plan`);
  3. prefill the admitted prompts (batched, bucketed by length) into their KV cache slots;
  4. dispatch one decode call of `decode_steps` tokens for every running slot;
  5. only then read the earlier steps' tokens (the device is already busy with this step's dispatches),
     and this step's as far as they are done; detokenize, check stop conditions, stream to the request's
     sink and free finished slots.

The engine knows nothing about HTTP; requests arrive already tokenized and tiled (`inputs.py`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from internvl_jax import sampling, sharding
from internvl_jax.detokenize import DetokenizerState, advance
from internvl_jax.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from internvl_jax.programs import CHOICES_FILE, ProgramStore, build_programs, compile_workers
from internvl_jax.runner import ENCODER_TIMING_LAYERS, MLP_TIMING_LAYERS, NewRequests, Runner
from internvl_jax.sampling import SamplingParams

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot take (too long, too many images...): names what to fix."""


class EngineFull(RuntimeError):
    """The admission queue is full: retry later."""


@dataclasses.dataclass
class ImageInput:
    """One image of a prompt: its tiles as uint8 pixels [tiles, 3, S, S] (normalised on the device; float
    tiles are taken as already normalised), or precomputed embeddings
    [tiles, tokens_per_tile, E]; `key` identifies its content for the feature cache."""

    key: str
    num_tiles: int
    pixels: np.ndarray | None = None
    embeddings: np.ndarray | None = None


@dataclasses.dataclass
class EngineConfig:
    max_model_len: int = 4096
    max_num_seqs: int = 32  # decode slots
    decode_steps: int = 8  # tokens per decode dispatch
    prefill_token_budget: int = 8192  # padded tokens per prefill call and data-parallel replica (batch x bucket)
    max_prefill_batch: int = 8  # prompts per prefill call and data-parallel replica
    min_prefill_bucket: int = 64
    max_encode_tiles: int = 64  # tiles per encoder call (largest tile bucket)
    image_tiles: int | None = None  # tiles of a full-size image under the default tiling: a tile bucket of its own
    feature_cache_tiles: int = 256  # pool rows for projected image features (LRU over images)
    max_waiting: int = 1024  # admission queue bound
    compile_workers: int | None = None  # threads compiling the buckets at start-up; None: min(16, usable cores)


def powers_of_two(low: int, high: int) -> list[int]:
    values, value = [], max(1, low)
    while value < high:
        values.append(value)
        value *= 2
    return values + [high]


# From 2,048 tokens up the prefill's length buckets are finer than powers of two: quarter points (2,560, 3,072,
# 3,584) in the octave that image prompts fill, midpoints (6,144) above. An image prompt is 256 tokens per tile:
# arena-like's 9- and 13-tile images (22% and 46% of them) make ~2.4k and ~3.4k-token prompts, which 3,072 and
# 4,096 pad by ~27% and ~19% and 2,560 and 3,584 by ~5% (padded tokens per real one, one prompt a call: 1.18 ->
# 1.05), for 4 more prefill programs at max_model_len 8,192 (the two lengths at batches 1 and 2).
FINE_LENGTHS_FROM = 2048


def prefill_lengths(low: int, high: int) -> list[int]:
    """The prefill's length buckets: powers of two from `low`, `high`, and from FINE_LENGTHS_FROM the quarter points
    of its octave and the midpoints of those above."""
    lengths = set(powers_of_two(low, high))
    for value in list(lengths):
        if value >= FINE_LENGTHS_FROM:
            quarters = (5, 6, 7) if value == FINE_LENGTHS_FROM else (6,)
            lengths |= {value * q // 4 for q in quarters if value * q // 4 < high}
    return sorted(lengths)


# The fixed cost of an encoder call in tiles of work: one tile took 2.60 ms on an H100 against 1.64 ms per tile in
# calls of 8 to 32 (docs/PERF.md, ninth session), ~0.6 tile, rounded up: a split must save a whole tile.
ENCODE_CALL_TILES = 1

# With data-parallel replicas on one mesh a prefill call runs every replica's rows in lockstep: a prompt for one
# replica alone costs each other replica a padding row as long as it (arena-c64 with -dp 2 on the mesh: 1.88 prefill
# positions computed per prompt token, docs/PERF.md, tenth session). So while another replica has no free slot, a
# request that would open such a row waits for one to free, so that both are prefilled in one call, up to this long
# (a few decode dispatches); then it goes alone.
PAIR_WAIT_SECONDS = 0.05

# An engine step's phases: taking requests and slots; building and dispatching encoder calls (tiles to the
# device), prefill calls and the decode call; reading older dispatches' tokens back, detokenizing, emitting.
STEP_PHASES = ("schedule", "encode", "prefill", "decode", "process")


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What a request must fit: checked in the caller's thread, by the engine or by a process in front of it
    (`engine_processes`), which has no model."""

    max_model_len: int
    max_num_seqs: int
    vocab_size: int
    image_token_id: int
    tokens_per_tile: int
    max_image_tiles: int  # tiles of one image: the feature pool and the largest encoder call

    def check(self, prompt_ids: list[int], images: list[ImageInput], params: SamplingParams) -> np.ndarray:
        """Raises RequestError for a request that can never run. Returns the indices of the prompt's image
        tokens."""
        prompt_len = len(prompt_ids)
        limit = self.max_model_len
        if prompt_len == 0:
            raise RequestError("the prompt is empty")
        if prompt_len >= limit:
            raise RequestError(f"the prompt has {prompt_len} tokens; max_model_len is {limit}: shorten the prompt "
                               "or use fewer or smaller images")
        if params.max_tokens is not None and prompt_len + params.max_tokens > limit:
            raise RequestError(f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds "
                               f"max_model_len {limit}; lower max_tokens to at most {limit - prompt_len}")
        if params.n > self.max_num_seqs:
            raise RequestError(f"n={params.n} exceeds max_num_seqs {self.max_num_seqs}")
        # These go into int32 device arrays and a 64-bit rng seed in the engine thread, where an overflow
        # would fail every request in flight: refuse them here, in the caller's thread.
        if params.seed is not None and not -(2**63) <= params.seed < 2**63:
            raise RequestError(f"seed={params.seed} does not fit in 64 bits")
        if params.top_k >= 2**31:
            raise RequestError(f"top_k={params.top_k} is too large; use 0 or -1 to disable top-k")
        if params.min_tokens >= limit:
            raise RequestError(f"min_tokens={params.min_tokens} must be below max_model_len {limit}")
        if any(not 0 <= token < self.vocab_size for token in params.stop_token_ids):
            raise RequestError(f"stop_token_ids {list(params.stop_token_ids)} must be token ids in "
                               f"[0, {self.vocab_size})")
        tiles = sum(image.num_tiles for image in images)
        positions = np.flatnonzero(np.asarray(prompt_ids, np.int64) == self.image_token_id)
        image_tokens = len(positions)
        if image_tokens != tiles * self.tokens_per_tile:
            raise RequestError(f"the prompt holds {image_tokens} image tokens but its images have {tiles} tiles "
                               f"({tiles * self.tokens_per_tile} tokens)")
        for image in images:
            if image.num_tiles > self.max_image_tiles:
                raise RequestError(f"an image with {image.num_tiles} tiles exceeds the encoder's limit of "
                                   f"{self.max_image_tiles} tiles")
        return positions


@dataclasses.dataclass(frozen=True)
class EngineLoad:
    """The engine's occupancy at one moment (for /metrics and request routing)."""

    requests_running: int  # with at least one sequence in a decode slot
    requests_waiting: int  # for a decode slot
    slots_running: int
    slots: int
    tokens_held: int  # KV cache positions holding tokens
    token_capacity: int


def _observations() -> collections.deque[float]:
    return collections.deque(maxlen=100_000)


@dataclasses.dataclass
class EngineStats:
    """Counters read by the server's /metrics (plain ints and floats: no Prometheus here)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    tiles_encoded: int = 0
    tiles_computed: int = 0  # encoder rows run: tiles_encoded + padding to the tile buckets
    prefill_tokens_computed: int = 0  # prefill positions run: prompt tokens + padding (buckets, replicas' rows)
    encoder_cache_queries: int = 0
    encoder_cache_hits: int = 0
    requests_finished: int = 0
    recompiles: int = 0
    # Latency observations for the server's histograms, drained by its /metrics (every second). Bounded, so
    # that offline use, where nothing drains them, keeps only the latest.
    ttft_observations: collections.deque[float] = dataclasses.field(default_factory=lambda: _observations())
    # The engine thread's seconds inside steps, and the part of them spent blocked on a dispatch's results
    # (the rest is host work: scheduling, building inputs, dispatching, detokenizing, emitting).
    step_seconds: float = 0.0
    device_wait_seconds: float = 0.0
    # The thread's CPU time inside steps outside those waits. Host work (step - wait) beyond it is time off a
    # core: the GIL held by other threads, or a dispatch blocked in the runtime (e.g. on the GPU).
    host_cpu_seconds: float = 0.0
    # Seconds of the steps by phase (STEP_PHASES); "process" includes the waits on the GPU.
    phase_seconds: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(STEP_PHASES, 0.0))
    # Per request, seconds: waiting for a slot (arrival -> admitted) and admitted -> first token.
    queue_observations: collections.deque[float] = dataclasses.field(default_factory=lambda: _observations())
    prefill_observations: collections.deque[float] = dataclasses.field(default_factory=lambda: _observations())
    itl_observations: collections.deque[float] = dataclasses.field(default_factory=lambda: _observations())

    def counters(self) -> dict[str, float]:
        """The plain counters by name (not the phases nor the observations)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if isinstance(getattr(self, field.name), (int, float))}

    def take_observations(self) -> dict[str, list[float]]:
        """Removes and returns the latency observations appended so far, by field name. Pops only from the left,
        as many as were there at the start, while the engine thread appends at the right; both are atomic."""
        taken = {}
        for name in OBSERVATIONS:
            observed = getattr(self, name)
            taken[name] = [observed.popleft() for _ in range(len(observed))]
        return taken


OBSERVATIONS = ("ttft_observations", "itl_observations", "queue_observations", "prefill_observations")


@functools.cache
def _host_device() -> jax.Device | None:
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without "cpu"
        return None


@jax.jit
def _fold_in(key_data: jax.Array, index: jax.Array) -> jax.Array:
    return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(key_data), index))


def sequence_key(seed: int, index: int) -> np.ndarray:
    """uint32[2]: the threefry key of choice `index` of a request seeded `seed` (all 64 bits of it: unlike
    `jax.random.key` without x64, seeds that differ only above bit 31 get different keys). One jitted call on
    the host's CPU device: on the GPU it would be queued behind every kernel in flight, and reading the key
    back would make the engine thread wait for all of them before it could build the next prefill."""
    bits = seed & 0xFFFF_FFFF_FFFF_FFFF  # a negative seed as its 64-bit two's complement
    seed_data = np.asarray([bits >> 32, bits & 0xFFFF_FFFF], np.uint32)
    with jax.default_device(_host_device()):
        return np.asarray(_fold_in(seed_data, np.uint32(index)))


class _Sequence:
    """One choice (of `n`) of a request, living in one decode slot."""

    def __init__(self, request: _Request, index: int):
        self.request = request
        self.index = index
        self.slot: int | None = None
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, Logprob]] | None = [] if request.params.logprobs is not None else None
        self.text = ""
        self.detokenizer = DetokenizerState()
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.tokens_dispatched = 0  # tokens it will hold once every dispatch made so far is processed

    def needs_tokens(self, max_model_len: int) -> bool:
        """False once the dispatches made so far already reach max_tokens (or max_model_len): another
        decode dispatch for it would be discarded."""
        params = self.request.params
        limit = max_model_len - len(self.request.prompt_ids)
        if params.max_tokens is not None:
            limit = min(limit, params.max_tokens)
        return self.tokens_dispatched < limit


class _Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], images: list[ImageInput],
                 params: SamplingParams, sink: Callable[[RequestOutput], None] | None, image_positions: np.ndarray):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        # Indices of the prompt's image tokens, found in the caller's thread (numpy releases the GIL for
        # arrays this long, and each release costs the engine thread a wait for its turn: docs/PERF.md).
        self.image_positions = image_positions
        self.images = images
        self.params = params
        self.sink = sink
        self.sequences = [_Sequence(self, i) for i in range(params.n)]
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        self.feature_rows: np.ndarray | None = None  # pool row per prompt token, -1 for text
        self.pair_wait_since: float | None = None  # first held back for a prefill partner (data parallelism)
        self.aborted = False

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)

    def snapshot(self) -> RequestOutput:
        outputs = [CompletionOutput(s.index, s.text, list(s.token_ids), s.finish_reason, s.stop_reason,
                                    list(s.logprobs) if s.logprobs is not None else None) for s in self.sequences]
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, outputs, self.finished, self.metrics,
                             sum(image.num_tiles for image in self.images))


class FeatureCache:
    """LRU of projected image features by content key; the features live in the runner's pool."""

    def __init__(self, rows: int):
        self.free = list(range(rows))
        self.entries: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        self.pins: collections.Counter[str] = collections.Counter()

    def lookup(self, key: str) -> list[int] | None:
        rows = self.entries.get(key)
        if rows is not None:
            self.entries.move_to_end(key)
        return rows

    def allocate(self, key: str, tiles: int) -> list[int] | None:
        while len(self.free) < tiles:
            victim = next((k for k in self.entries if not self.pins[k]), None)
            if victim is None:
                return None
            self.free.extend(self.entries.pop(victim))
        rows, self.free = self.free[:tiles], self.free[tiles:]
        self.entries[key] = rows
        return rows


class Engine:
    def __init__(self, runner: Runner, tokenizer, config: EngineConfig, eos_token_ids: tuple[int, ...] = (),
                 program_store: ProgramStore | None = None):
        self.runner = runner
        self.program_store = program_store  # compiled programs kept between starts (warm-up loads and stores)
        self.tokenizer = tokenizer
        self.config = config
        model_config = runner.config
        self.image_token_id = model_config.image_token_id
        self.tokens_per_tile = model_config.tokens_per_tile
        self.eos_token_ids = set(eos_token_ids)
        self.stats = EngineStats()
        self.limits = RequestLimits(config.max_model_len, config.max_num_seqs, model_config.text.vocab_size,
                                    self.image_token_id, self.tokens_per_tile,
                                    min(runner.pool_tiles, config.max_encode_tiles))
        self.features = FeatureCache(runner.pool_tiles)
        # Data parallelism: each replica holds a contiguous block of slots; the free list starts interleaved
        # over replicas and _take_slot spreads each step's prompts over them.
        self.data_shards = runner.data_size
        block = runner.num_slots // self.data_shards
        self.free_slots = [shard * block + i for i in range(block) for shard in range(self.data_shards)]
        self.free_slots = self.free_slots[: config.max_num_seqs]
        self.running: dict[int, _Sequence] = {}  # slot -> sequence
        self.waiting: collections.deque[_Request] = collections.deque()
        self.requests: dict[str, _Request] = {}
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        # (kind, output, {slot: sequence}, {slot: output row} for a prefill; decode rows are the slots)
        self.pending: collections.deque = collections.deque()
        self.wakeup = threading.Event()
        self._wait_cpu = 0.0  # the engine thread's CPU seconds inside waits on the GPU
        self._rng = np.random.default_rng()
        self._compiled_sizes: dict[str, int] | None = None
        self.warmup_report: dict[str, tuple[int, float]] = {}  # kind -> (programs compiled, seconds)
        self.first_run_seconds: dict[str, float] = {}  # warm-up: seconds of running each kind of program once
        # Powers of two, and a full-size image's tiles: most photos and screenshots tile to the maximum (13 of
        # arena-like's mean 10.4), which the next power of two pads by 3/16 of the encoder's work.
        tiles = set(powers_of_two(1, config.max_encode_tiles))
        if config.image_tiles is not None and config.image_tiles < config.max_encode_tiles:
            tiles.add(config.image_tiles)
        self.tile_buckets = sorted({sharding.padded_tiles(b, runner.mesh, runner.encoder_mode) for b in tiles})
        self.length_buckets = prefill_lengths(min(config.min_prefill_bucket, config.max_model_len),
                                              config.max_model_len)
        self.batch_buckets = powers_of_two(1, config.max_prefill_batch)
        self._encode_plans: dict[int, tuple[tuple[int, int], ...]] = {}

    # ---- requests in --------------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], images: list[ImageInput], params: SamplingParams) -> np.ndarray:
        """Raises RequestError for a request that can never run; called in the caller's thread. Returns the
        indices of the prompt's image tokens."""
        return self.limits.check(prompt_ids, images, params)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    images: list[ImageInput] | None = None, sink: Callable[[RequestOutput], None] | None = None,
                    prompt: str | None = None, bounded: bool = True) -> None:
        """Thread-safe. Raises RequestError (bad request) or EngineFull (admission queue full; `bounded=False`:
        the caller bounds the queue itself, as `engine_processes` does for its replicas)."""
        images = images or []
        positions = self.validate(prompt_ids, images, params)
        if bounded and self.queued >= self.config.max_waiting:
            raise EngineFull(f"{self.config.max_waiting} requests are already waiting")
        self.inbox.put(("add", _Request(request_id, prompt, list(prompt_ids), images, params, sink, positions)))
        self.wakeup.set()

    def abort(self, request_id: str) -> None:
        """Thread-safe: the request's slots are freed at the next step."""
        self.inbox.put(("abort", request_id))
        self.wakeup.set()

    @property
    def queued(self) -> int:
        """Requests waiting for a decode slot (thread-safe)."""
        return len(self.waiting) + self.inbox.qsize()

    def load(self) -> EngineLoad:
        """What the engine holds now (thread-safe: one C-level copy of the running slots)."""
        sequences = list(self.running.values())
        return EngineLoad(requests_running=len({id(seq.request) for seq in sequences}), requests_waiting=self.queued,
                          slots_running=len(sequences), slots=self.config.max_num_seqs,
                          tokens_held=sum(len(seq.request.prompt_ids) + len(seq.token_ids) for seq in sequences),
                          token_capacity=self.config.max_num_seqs * self.config.max_model_len)

    def replica_stats(self) -> list[tuple[EngineLoad, EngineStats]]:
        """Per engine loop (one here; `engine_processes` has one per replica): its load and counters."""
        return [(self.load(), self.stats)]

    def take_observations(self) -> dict[str, list[float]]:
        return self.stats.take_observations()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.pending or not self.inbox.empty())

    # ---- the step -----------------------------------------------------------------------------------
    def step(self) -> None:
        started, cpu_started, wait_cpu = time.perf_counter(), time.thread_time(), self._wait_cpu
        try:
            self._step()
        finally:
            self.stats.step_seconds += time.perf_counter() - started
            self.stats.host_cpu_seconds += time.thread_time() - cpu_started - (self._wait_cpu - wait_cpu)

    def _lap(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.stats.phase_seconds[phase] += now - since
        return now

    def _step(self) -> None:
        mark = time.perf_counter()
        self._drain_inbox()
        admitted = self._admit()
        mark = self._lap("schedule", mark)
        earlier = len(self.pending)  # dispatches of earlier steps
        if admitted:
            self._encode(admitted)
            mark = self._lap("encode", mark)
            self._prefill(admitted)
            mark = self._lap("prefill", mark)
        if self.running:
            self._decode()
        mark = self._lap("decode", mark)
        # Read the earlier steps' dispatches back (waiting for them while the device already has this step's
        # queued behind them), then this step's only as far as they are done: the host never waits for work it
        # has just queued, so it builds the next step while the device runs this one's encode and prefill.
        for _ in range(earlier):
            self._process(*self.pending.popleft())
        while self.pending and self.pending[0][1].tokens.is_ready():
            self._process(*self.pending.popleft())
        self._lap("process", mark)
        self._check_recompiles()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.requests[item.request_id] = item
                self.waiting.append(item)
            elif kind == "abort":
                request = self.requests.get(item)
                if request is not None:
                    self._abort(request)

    def _abort(self, request: _Request) -> None:
        if request in self.waiting:
            self.waiting.remove(request)
        for sequence in request.sequences:
            if sequence.finish_reason is None:
                self._finish(sequence, "abort")
        self._emit(request)

    def _admit(self) -> list[_Request]:
        admitted: list[_Request] = []
        rows = [0] * self.data_shards  # sequences admitted per replica in this step: its prefill rows
        while self.waiting and len(self.free_slots) >= self.waiting[0].params.n:
            request = self.waiting[0]
            if self._waits_for_a_partner(request, rows):
                break
            if not self._reserve_features(request):
                break  # the feature pool is full of pinned images: wait for prefills to release them
            self.waiting.popleft()
            for sequence in request.sequences:
                sequence.slot = self._take_slot(rows)
                rows[self.runner.slot_replica(sequence.slot)] += 1
                self.running[sequence.slot] = sequence
            request.metrics.first_scheduled_time = time.monotonic()
            self.stats.queue_observations.append(request.metrics.first_scheduled_time - request.metrics.arrival_time)
            admitted.append(request)
        return admitted

    def _free_per_replica(self) -> collections.Counter[int]:
        return collections.Counter(self.runner.slot_replica(slot) for slot in self.free_slots)

    def _next_replica(self, rows: list[int], free: collections.Counter[int]) -> int:
        """Of the replicas with a free slot, the one with the fewest prefill rows in this step, then the most free
        slots."""
        return min(free, key=lambda replica: (rows[replica], -free[replica]))

    def _take_slot(self, rows: list[int]) -> int:
        """A free slot of `_next_replica` (the first free slot with one replica)."""
        replica = self._next_replica(rows, self._free_per_replica())
        index = next(i for i, slot in enumerate(self.free_slots) if self.runner.slot_replica(slot) == replica)
        return self.free_slots.pop(index)

    def _waits_for_a_partner(self, request: _Request, rows: list[int]) -> bool:
        """True while `request` would open a prefill row that a replica without a free slot could not fill, for at
        most PAIR_WAIT_SECONDS (see there)."""
        if self.data_shards == 1:
            return False
        free = self._free_per_replica()
        replica = self._next_replica(rows, free)
        running = collections.Counter(self.runner.slot_replica(slot) for slot in self.running)
        # Replicas that cannot take a partner now but will free a slot (one without any slot never does).
        full = [other for other in range(self.data_shards) if other != replica and not free[other] and running[other]]
        if rows[replica] < max(rows) or not full:
            request.pair_wait_since = None
            return False  # it fills a padding row, or every replica can still take a partner in this step
        now = time.monotonic()
        if request.pair_wait_since is None:
            request.pair_wait_since = now
        return now - request.pair_wait_since < PAIR_WAIT_SECONDS

    def _reserve_features(self, request: _Request) -> bool:
        """Pins pool rows for each image (hit or newly allocated) and maps prompt tokens to rows."""
        planned = []
        for image in request.images:
            self.stats.encoder_cache_queries += 1
            rows = self.features.lookup(image.key)
            fresh = rows is None
            if fresh:
                rows = self.features.allocate(image.key, image.num_tiles)
                if rows is None:
                    for key, _, _ in planned:
                        self.features.pins[key] -= 1
                    return False
            else:
                self.stats.encoder_cache_hits += 1
            self.features.pins[image.key] += 1
            planned.append((image.key, rows, fresh))
        request.planned_features = planned
        feature_rows = np.full(len(request.prompt_ids), -1, np.int32)
        positions = request.image_positions
        per_tile = self.tokens_per_tile
        tile_rows = np.asarray([row for _, rows, _ in planned for row in rows], np.int32)
        feature_rows[positions] = (tile_rows[:, None] * per_tile + np.arange(per_tile, dtype=np.int32)).ravel()
        request.feature_rows = feature_rows
        return True

    def _encode(self, admitted: list[_Request]) -> None:
        """One batched encoder call per tile bucket for all fresh images of the admitted requests."""
        tiles: list[np.ndarray] = []
        rows: list[int] = []
        for request in admitted:
            for image, (_, image_rows, fresh) in zip(request.images, request.planned_features, strict=True):
                if not fresh:
                    continue
                if image.embeddings is not None:
                    self._put_embeddings(image.embeddings, image_rows)
                    continue
                tiles.extend(image.pixels)
                rows.extend(image_rows)
        start = 0
        for count, bucket in self._encode_plan(len(tiles)):
            chunk = tiles[start:start + count]
            pixels = np.empty((bucket, *chunk[0].shape), chunk[0].dtype)
            np.stack(chunk, out=pixels[:count])  # one copy of the tiles (on the engine thread's time)
            pixels[count:] = 0
            chunk_rows = np.full(bucket, self.runner.pool_tiles, np.int32)
            chunk_rows[:count] = rows[start:start + count]
            start += count
            self.runner.encode(pixels, chunk_rows)
            self.stats.tiles_encoded += count
            self.stats.tiles_computed += bucket

    def _encode_plan(self, tiles: int) -> tuple[tuple[int, int], ...]:
        """(tiles, bucket) of each encoder call for `tiles` tiles (each independent of the others): of all ways to
        cut them into calls, the one with the fewest rows computed, each call counting ENCODE_CALL_TILES more, then
        the fewest calls. Two full-size images (2 x 13 tiles) run as 13 + 13, not in a call of 32; 9 tiles as 8 + 1,
        not 16. By dynamic programming over the tile count; kept per count."""
        plan = self._encode_plans.get(tiles)
        if plan is None:
            best = [(0, 0, ())]  # (cost, calls, plan) for 0, 1, ... tiles
            for count in range(1, tiles + 1):
                options = []
                for bucket in self.tile_buckets:
                    taken = min(bucket, count)  # the last call of the plan: `taken` tiles in `bucket` rows
                    cost, calls, head = best[count - taken]
                    options.append((cost + bucket + ENCODE_CALL_TILES, calls + 1, (*head, (taken, bucket))))
                best.append(min(options))
            plan = self._encode_plans[tiles] = best[tiles][2]
        return plan

    def _put_embeddings(self, embeddings: np.ndarray, rows: list[int]) -> None:
        bucket = next(b for b in self.tile_buckets if b >= len(rows))
        padded = np.zeros((bucket, *embeddings.shape[1:]), np.float32)
        padded[: len(rows)] = embeddings
        padded_rows = np.full(bucket, self.runner.pool_tiles, np.int32)
        padded_rows[: len(rows)] = rows
        self.runner.put_features(padded, padded_rows)

    def _prefill(self, admitted: list[_Request]) -> None:
        rows = [(request, sequence) for request in admitted for sequence in request.sequences]
        while rows:
            replicas, bucket, rows = self._next_prefill_batch(rows)
            self._prefill_batch(replicas, bucket)
        for request in admitted:
            # The prefill that reads these pool rows is queued before any later encode can overwrite them.
            for key, _, _ in request.planned_features:
                self.features.pins[key] -= 1
            self.stats.prompt_tokens += len(request.prompt_ids)

    def _length_bucket(self, length: int) -> int:
        return next(b for b in self.length_buckets if b >= length)

    def _batch_bucket(self, size: int) -> int:
        return next(b for b in self.batch_buckets if b >= size)

    def _next_prefill_batch(self, rows: list[tuple[_Request, _Sequence]]):
        """Takes rows, in order, into one prefill call while they fit: each goes to the data-parallel replica
        that holds its slot, at most the largest batch bucket per replica, with the padded tokens per replica
        (length bucket x batch bucket) within the budget. Returns (rows per replica, length bucket, rows left)."""
        budget, largest = self.config.prefill_token_budget, self.batch_buckets[-1]
        replicas: list[list[tuple[_Request, _Sequence]]] = [[] for _ in range(self.data_shards)]
        bucket = 0
        for taken, row in enumerate(rows):
            own = replicas[self.runner.slot_replica(row[1].slot)]
            candidate = max(bucket, self._length_bucket(len(row[0].prompt_ids)))
            width = max(len(own) + 1, *map(len, replicas))
            if taken and (len(own) == largest or candidate * self._batch_bucket(width) > max(budget, candidate)):
                return replicas, bucket, rows[taken:]
            own.append(row)
            bucket = candidate
        return replicas, bucket, []

    def _prefill_batch(self, replicas: list[list[tuple[_Request, _Sequence]]], length_bucket: int) -> None:
        """Replica d's prompts fill rows [d * width, d * width + its count) of a batch of width rows per replica."""
        width = self._batch_bucket(max(map(len, replicas)))
        new = self._new_requests(width * self.data_shards, length_bucket)
        occupants, rows = {}, {}
        for replica, batch in enumerate(replicas):
            for row, (request, sequence) in enumerate(batch, start=replica * width):
                prompt_len = len(request.prompt_ids)
                new.ids[row, :prompt_len] = request.prompt_ids
                new.lengths[row] = prompt_len
                new.slots[row] = sequence.slot
                new.feature_rows[row, :prompt_len] = request.feature_rows
                self._fill_sampling(new, row, request, sequence)
                occupants[sequence.slot], rows[sequence.slot] = sequence, row
                sequence.tokens_dispatched = 1
        output = self.runner.prefill(new, want_top=True)
        self.stats.prefill_tokens_computed += new.ids.size
        self.pending.append(("prefill", output, occupants, rows))

    def _new_requests(self, batch: int, length: int) -> NewRequests:
        return NewRequests.empty(batch, length, self.runner.num_slots)

    def _fill_sampling(self, new: NewRequests, row: int, request: _Request, sequence: _Sequence) -> None:
        params = request.params
        new.temperature[row] = params.temperature
        new.top_p[row] = params.top_p
        new.top_k[row] = max(params.top_k, 0)
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**31))
        # Each of the n choices draws from its own stream of the request's seed.
        new.keys[row] = sequence_key(seed, sequence.index)
        new.min_tokens[row] = params.min_tokens
        stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos else sorted(self.eos_token_ids))
        stop_ids = stop_ids[: sampling.MAX_STOP_TOKEN_IDS]
        new.stop_ids[row, : len(stop_ids)] = stop_ids

    def _decode(self) -> None:
        """Dispatches one decode call for the running sequences that still need tokens; none if none does
        (e.g. one-token requests right after their prefill), so the GPU is not kept busy for nothing."""
        if not self.pending:  # every dispatch is processed (or lost to an interrupted step): recount from tokens
            for sequence in self.running.values():
                sequence.tokens_dispatched = len(sequence.token_ids)
        occupants = {slot: seq for slot, seq in self.running.items() if seq.needs_tokens(self.config.max_model_len)}
        if not occupants:
            return
        active = np.zeros(self.runner.num_slots, bool)
        active[list(occupants)] = True
        # Static flag of the decode jit: logprobs (chosen and top-k) are computed only when some running
        # request asked for them (logprobs=0 still wants the chosen token's).
        want_top = any(seq.request.params.logprobs is not None for seq in occupants.values())
        mode = sampling.sampling_mode(seq.request.params for seq in occupants.values())
        output = self.runner.decode(active, self.config.decode_steps, want_top, sampling_mode=mode)
        for sequence in occupants.values():
            sequence.tokens_dispatched += self.config.decode_steps
        self.pending.append(("decode", output, occupants, None))

    # ---- tokens back ----------------------------------------------------------------------------------
    def _process(self, kind: str, output, occupants: dict[int, _Sequence], rows: dict[int, int] | None) -> None:
        waited, wait_cpu = time.perf_counter(), time.thread_time()
        tokens = np.asarray(output.tokens)  # blocks until this (older) dispatch is done
        self.stats.device_wait_seconds += time.perf_counter() - waited
        self._wait_cpu += time.thread_time() - wait_cpu  # a wait may spin on a core: not host work
        chosen = np.asarray(output.logprobs)
        want_top = any(seq.logprobs is not None for seq in occupants.values())
        top_values = np.asarray(output.top_logprobs) if want_top else None
        top_ids = np.asarray(output.top_ids) if want_top else None
        now = time.monotonic()
        touched: dict[str, _Request] = {}
        for slot, sequence in occupants.items():
            if sequence.finish_reason is not None or self.running.get(slot) is not sequence:
                continue  # finished (or aborted) after this dispatch was queued: stale tokens
            request = sequence.request
            row = slot if rows is None else rows[slot]
            try:
                for step in range(tokens.shape[0]):
                    extra = None
                    if sequence.logprobs is not None:
                        extra = (chosen[step, row], top_values[step, row], top_ids[step, row])
                    self._append(sequence, int(tokens[step, row]), extra)
                    if sequence.finish_reason is not None:
                        break
                if not request.params.stop:  # with stop strings, _append keeps the text current per token
                    self._advance_text(sequence)
            except Exception:
                # A host-side failure of one request (detokenizing, a bad value) must not stop the engine
                # thread that every other request depends on.
                log.exception("request %s failed while processing its tokens; aborting it", request.request_id)
                if sequence.finish_reason is None:
                    self._finish(sequence, "abort")
            metrics = request.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
                self.stats.ttft_observations.append(now - metrics.arrival_time)
                self.stats.prefill_observations.append(now - metrics.first_scheduled_time)
            elif metrics.last_token_time is not None:
                self.stats.itl_observations.append((now - metrics.last_token_time) / tokens.shape[0])
            metrics.last_token_time = now
            touched[request.request_id] = request
        for request in touched.values():
            self._emit(request)

    def _append(self, sequence: _Sequence, token: int, extra) -> None:
        params = sequence.request.params
        sequence.token_ids.append(token)
        self.stats.generation_tokens += 1
        if extra is not None:
            chosen, top_values, top_ids = extra
            entry = {token: Logprob(float(chosen))}
            for rank, (value, tid) in enumerate(zip(top_values[: params.logprobs], top_ids[: params.logprobs],
                                                    strict=True), start=1):
                entry.setdefault(int(tid), Logprob(float(value), rank))
            sequence.logprobs.append(entry)
        count = len(sequence.token_ids)
        previous_text = sequence.text
        if params.stop:
            # Stop strings need the text after every token (to stop at the token that completes one);
            # without them the text is advanced once per dispatch in `_process`.
            self._advance_text(sequence)
        if count >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                return self._finish(sequence, "stop")
            if token in params.stop_token_ids:
                return self._finish(sequence, "stop", token)
            if params.stop and self._check_stop_strings(sequence, previous_text):
                return None
        if params.max_tokens is not None and count >= params.max_tokens:
            return self._finish(sequence, "length")
        if len(sequence.request.prompt_ids) + count >= self.config.max_model_len:
            return self._finish(sequence, "length")
        return None

    def _advance_text(self, sequence: _Sequence) -> None:
        sequence.text += advance(self.tokenizer, sequence.token_ids, sequence.detokenizer,
                                 sequence.request.params.skip_special_tokens)

    def _check_stop_strings(self, sequence: _Sequence, previous_text: str) -> bool:
        params = sequence.request.params
        longest = max(len(s) for s in params.stop)
        start = max(0, len(previous_text) - longest + 1)
        hits = [(sequence.text.find(s, start), s) for s in params.stop]
        hits = [(index, s) for index, s in hits if index >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        end = index + len(stop) if params.include_stop_str_in_output else index
        sequence.text = sequence.text[:end]
        self._finish(sequence, "stop", stop)
        return True

    def _finish(self, sequence: _Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        sequence.finish_reason = reason
        sequence.stop_reason = stop_reason
        if not isinstance(stop_reason, str):  # a stop string has already cut the text where it must end
            # The final text in full, including a trailing character the incremental path held back.
            sequence.text = self.tokenizer.decode(sequence.token_ids,
                                                  skip_special_tokens=sequence.request.params.skip_special_tokens)
            sequence.detokenizer = DetokenizerState(len(sequence.token_ids), len(sequence.token_ids))
        if sequence.slot is not None and self.running.get(sequence.slot) is sequence:
            del self.running[sequence.slot]
            self.free_slots.append(sequence.slot)
        request = sequence.request
        if request.finished:
            request.metrics.finished_time = time.monotonic()
            self.requests.pop(request.request_id, None)
            self.stats.requests_finished += 1

    def _emit(self, request: _Request) -> None:
        if request.sink is None:
            return
        try:
            request.sink(request.snapshot())
        except Exception:
            log.exception("the output sink of request %s failed; it gets no more outputs", request.request_id)
            request.sink = None

    # ---- start-up and guards -----------------------------------------------------------------------------
    def warmup(self, progress: bool = True) -> float:
        """Compiles every bucket the engine can dispatch, then runs each once; returns seconds spent.
        With a program store, a program stored by an earlier start is loaded instead (no tracing, lowering
        or compiling) and a compiled one is stored. The others are lowered one by one in this thread
        (tracing is Python) and compiled by `config.compile_workers` threads at once (XLA's compiler
        releases the GIL). `self.warmup_report` keeps (programs, seconds of loading, lowering and compiling
        summed over the threads) per kind of step (encode, prefill, decode) for the start-up log.
        Of two decode attentions the faster is measured once per configuration and devices and kept in the
        store, so a later start compiles, loads and runs only its decode programs (6 of 12). The decode MLP's
        kernels (XLA's or Pallas's) and the encoder's LayerNorm and GELU are chosen first, the same way, by timing
        the MLP blocks alone and a few vision layers."""
        start = time.monotonic()
        runner = self.runner
        choosing = {"choosing the decode MLP": self._choose_decode_mlp(),
                    "choosing the encoder kernels": self._choose_encoder_kernels()}
        candidates = runner.decode_attention_candidates()
        stored = self._stored_choice("decode_attention", "decode attention", candidates)
        if stored is not None:
            candidates = [stored]
        jobs = self._warmup_jobs(candidates)
        self.warmup_report = self._compile(jobs, progress)
        sequence_key(0, 0)  # compiles the host-side key derivation before the first request needs it
        first_runs = dict.fromkeys(("encode", "prefill", "decode"), 0.0)
        for step, args in jobs:  # runs each program once (the first run of an executable loads its kernels)
            started = time.monotonic()
            jax.block_until_ready((getattr(runner, step)(*args), runner.pool, runner.caches))
            first_runs[step] += time.monotonic() - started
        self.first_run_seconds = {**first_runs, **choosing}
        started = time.monotonic()
        if len(candidates) > 1:
            runner.decode_attention = self._fastest_decode_attention(candidates)
            self._store_choice("decode_attention", runner.decode_attention)
        else:
            runner.decode_attention = candidates[0]
        self.first_run_seconds["choosing the decode attention"] = time.monotonic() - started
        jax.block_until_ready(runner.caches)
        self._compiled_sizes = self._cache_sizes()
        return time.monotonic() - start

    def _warmup_jobs(self, attention_candidates: list[str]) -> list[tuple[str, tuple]]:
        """(step, arguments) of every program the engine can dispatch: each encoder tile bucket, each prefill
        shape, and every variant (logprobs or not, sampling mode) of each decode attention candidate (of
        several, the faster is chosen at warm-up by measurement)."""
        runner = self.runner
        image = runner.config.vision.image_size
        jobs = [("encode", (np.zeros((b, 3, image, image), np.uint8), np.full(b, runner.pool_tiles)))
                for b in self.tile_buckets]
        jobs += [("prefill", (self._new_requests(*shape), True)) for shape in self.prefill_shapes()]
        idle = np.zeros(runner.num_slots, bool)
        jobs += [("decode", (idle, self.config.decode_steps, want_top, impl, mode))
                 for impl in attention_candidates for want_top in (False, True)
                 for mode in sampling.SAMPLING_MODES]
        return jobs

    def _compile(self, jobs: list[tuple[str, tuple]], progress: bool) -> dict[str, tuple[int, float]]:
        """Puts every job's executable in `runner.programs`: loaded from the program store, or lowered here
        and compiled in a thread pool (then stored)."""
        from tqdm.auto import tqdm

        runner, store = self.runner, self.program_store
        calls = [(kind, runner.step_call(kind, *args)) for kind, args in jobs]
        workers = compile_workers(self.config.compile_workers)
        with tqdm(total=len(jobs), desc=f"compiling buckets ({workers} threads)", disable=not progress) as bar:
            built = build_programs([(call.key, functools.partial(call.jitted.lower, *call.args, *call.static))
                                    for _, call in calls], store, workers, bar.update)
        seconds = dict.fromkeys(("encode", "prefill", "decode"), 0.0)
        for (kind, call), program in zip(calls, built, strict=True):
            runner.programs[call.key] = program.program
            seconds[kind] += program.seconds
        loaded = [program for program in built if program.loaded]
        fresh = [program for program in built if not program.loaded]
        if store is not None:
            log.info("loaded %d of %d programs from %s in %.1f s", len(loaded), len(built), store.directory,
                     sum(program.seconds for program in loaded))
        if fresh:
            lowering = sum(program.lowering for program in fresh)
            log.info("lowered %d programs in %.1f s (one thread), compiled them in %.1f thread-seconds on %d threads",
                     len(fresh), lowering, sum(program.seconds for program in fresh) - lowering, workers)
        counts = collections.Counter(kind for kind, _ in jobs)
        return {kind: (counts[kind], seconds[kind]) for kind in seconds}

    def _choose_decode_mlp(self) -> float:
        """Sets `runner.decode_mlp` (`_choose_kernel`); returns the seconds it took."""
        runner = self.runner
        started = time.monotonic()
        layers = min(MLP_TIMING_LAYERS, runner.config.text.num_layers)
        runner.decode_mlp = self._choose_kernel(
            "decode_mlp", "decode MLP", runner.decode_mlp_candidates(), lambda impl: runner.time_decode_mlps([impl]),
            f"per pass over {layers} layers' MLPs, {runner.num_slots // runner.data_size} rows per replica")
        return time.monotonic() - started

    def _choose_encoder_kernels(self) -> float:
        """Sets `runner.encoder_kernels` (`_choose_kernel`); returns the seconds it took."""
        runner = self.runner
        started = time.monotonic()
        layers = min(ENCODER_TIMING_LAYERS, runner.config.vision.layers_used)
        runner.encoder_kernels = self._choose_kernel(
            "encoder_kernels", "encoder LayerNorm" if runner.tanh_vision_gelu else "encoder LayerNorm and GELU",
            runner.encoder_kernel_candidates(),
            lambda impl: runner.time_encoder_kernels([impl]),
            f"per pass of {runner.timing_tiles()} tiles over {layers} vision layers")
        return time.monotonic() - started

    def _choose_kernel(self, name: str, label: str, candidates: list[str], time_one, unit: str) -> str:
        """Of the kernels in `candidates` ("xla" first), what an earlier start of this configuration measured (the
        program store's choice `name`), else the fastest, timed now by `time_one(impl)` -> {impl: seconds} (small
        programs: seconds) and stored. A candidate other than XLA's that fails to build or run (e.g. a GPU or JAX
        on which the Triton kernels do not compile) is logged and left out."""
        stored = self._stored_choice(name, label, candidates)
        if stored is not None:
            return stored
        if len(candidates) == 1:
            return candidates[0]
        timings = {}
        for impl in candidates:
            try:
                timings[impl] = time_one(impl)[impl]
            except Exception as error:
                if impl == "xla":
                    raise
                log.warning("%s: the %s kernels failed to build or run (%s: %s); using XLA's", label, impl,
                            type(error).__name__, str(error).splitlines()[0][:300] if str(error) else "")
        choice = min(timings, key=timings.get)
        log.info("%s: %s (%s ms %s)", label, choice, {k: round(v * 1e3, 3) for k, v in timings.items()}, unit)
        self._store_choice(name, choice)
        return choice

    def _stored_choice(self, name: str, label: str, candidates: list[str]) -> str | None:
        """Of several `candidates`, the one an earlier start of this configuration on these devices measured and
        stored as `name` (logged under `label`); None without a store, with one candidate, or when nothing usable
        is stored."""
        store = self.program_store
        stored = store.choice(name) if store is not None and len(candidates) > 1 else None
        if stored not in candidates:
            return None
        log.info("%s: %s (measured by an earlier start: %s)", label, stored, store.directory / CHOICES_FILE)
        return stored

    def _store_choice(self, name: str, value: str) -> None:
        if self.program_store is not None:
            self.program_store.save_choice(name, value)

    def _fastest_decode_attention(self, candidates: list[str]) -> str:
        """Times one decode dispatch per candidate with every slot active at a typical context (a
        quarter of max_model_len) and keeps the faster; the slots are emptied again afterwards."""
        runner = self.runner
        timings = runner.time_decode_attentions(candidates, self.config.max_model_len // 4, self.config.decode_steps,
                                                "random")
        runner.set_lengths(np.zeros(runner.num_slots))
        choice = min(timings, key=timings.get)
        log.info("decode attention: %s (%s ms per dispatch of %d steps)", choice,
                 {k: round(v * 1e3, 3) for k, v in timings.items()}, self.config.decode_steps)
        return choice

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """(rows, length) of every prefill call: a batch bucket of rows per data-parallel replica."""
        return [(b * self.data_shards, t) for t in self.length_buckets for b in self.batch_buckets
                if b == 1 or b * t <= self.config.prefill_token_budget]

    def _cache_sizes(self) -> dict[str, int]:
        runner = self.runner
        return {name: getattr(runner, name)._cache_size() for name in ("_encode_jit", "_prefill_jit", "_decode_jit")}

    def _check_recompiles(self) -> None:
        if self._compiled_sizes is None:
            return
        sizes = self._cache_sizes()
        if sizes != self._compiled_sizes:
            self.stats.recompiles += 1
            log.error("BUG: a jitted step recompiled while serving (%s -> %s); a shape escaped the buckets",
                      self._compiled_sizes, sizes)
            self._compiled_sizes = sizes

    # ---- driving ------------------------------------------------------------------------------------------
    def run_until_done(self) -> None:
        while self.has_work:
            self.step()

    def run_forever(self, stop: threading.Event) -> None:
        """The engine thread of the server: steps while there is work, sleeps on `wakeup` otherwise."""
        while not stop.is_set():
            if self.has_work:
                self.step()
            else:
                self.wakeup.wait(0.05)
                self.wakeup.clear()
