"""The offline API in the shape vLLM users know: `LLM(...)`, `llm.chat(...)`, `llm.generate(...)`.

`build_engine` (shared with the server) resolves the model (a converted directory, an HF checkpoint
directory, a preset name with `load_format="dummy"`, or nothing = the built-in demo), loads it onto a
("data", "model") mesh, and compiles every bucket.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from internvl_jax import presets, sharding, weights
from internvl_jax.config import CONFIG_FILE, InternVLConfig
from internvl_jax.engine import Engine, EngineConfig, EngineFull
from internvl_jax.fast_tokenizer import FastTokenizer
from internvl_jax.inputs import DEFAULT_CACHE_GB, InputError, InputProcessor, PreparedPrompt, tiling_for
from internvl_jax.outputs import RequestOutput
from internvl_jax.programs import ProgramStore
from internvl_jax.prompts import ChatPrompter
from internvl_jax.runner import VISION_GELUS, Runner
from internvl_jax.sampling import SamplingParams
from internvl_jax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "dummy")
DEFAULT_MAX_MODEL_LEN = 8192


@dataclasses.dataclass(frozen=True)
class EngineArgs:
    """Everything that decides how a model is served (names as vLLM's)."""

    model: str | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    mm_encoder_tp_mode: str = "weights"
    mm_encoder_gelu: str = "exact"  # or "tanh": the approximation, folded into fc1's GEMM (runner.VISION_GELUS)
    max_model_len: int | None = None
    max_num_seqs: int = 32
    dtype: str | None = None
    load_format: str = "auto"
    chat_template: str | None = None
    limit_mm_per_prompt: int | None = None  # images per prompt
    mm_processor_kwargs: Mapping[str, Any] | None = None
    mm_processor_cache_gb: float = DEFAULT_CACHE_GB  # preprocessed images kept by their encoded bytes; 0: none
    decode_steps: int = 8
    max_waiting: int = 1024
    prefill_token_budget: int = 8192
    feature_cache_tiles: int = 256
    max_prefill_batch: int = 8
    compilation_cache: bool = True
    compile_workers: int | None = None  # None: min(16, usable CPU cores)
    cuda_graphs: str = "all"  # steps run as CUDA graphs: all, decode, none (runner.CUDA_GRAPH_STEPS)


@dataclasses.dataclass
class LoadedEngine:
    engine: Engine  # or `engine_processes.EngineProcesses` (the server's --data-parallel-backend process)
    processor: InputProcessor
    config: InternVLConfig
    model_path: Path
    model_name: str
    is_demo: bool
    encoder_mode: str
    mesh: Any
    warmup_seconds: float


def resolve_model(args: EngineArgs) -> tuple[Path, str, bool]:
    """(directory, display name, is_demo)."""
    if args.model is None:
        log.warning("no --model given: serving the built-in DEMO model (small, RANDOM weights: its answers "
                    "are gibberish). Pass --model to serve a real checkpoint.")
        return presets.demo_dir(), presets.DEMO_NAME, True
    if args.model in presets.preset_names():
        if args.load_format != "dummy":
            raise ValueError(f"{args.model!r} is a preset (shapes only, no weights): use load_format='dummy'")
        return presets.preset_dir(args.model), args.model, False
    path = Path(args.model).expanduser()
    if not path.is_dir():
        raise ValueError(f"model {args.model!r}: not a directory nor a preset ({', '.join(presets.preset_names())})")
    return path, args.model, False


XLA_CACHE_MAX_BYTES = 16 << 30  # XLA's persistent cache: least recently used entries go beyond this


def enable_compilation_cache() -> None:
    """XLA's persistent compilation cache under `presets.cache_dir()`, with a size bound.

    The bound is for the lock that comes with it: without one, JAX writes an entry in place and reads entries
    unlocked, and the engine processes of one server (`-dp N`), compiling the same programs at once, could read
    each other's half-written entries ("Error reading persistent compilation cache entry ... truncated stream",
    then a compile over again; docs/PERF.md, eighteenth session). With a bound, every read and write holds a file
    lock in the directory. `JAX_COMPILATION_CACHE_MAX_SIZE` in the environment is left to rule (-1: no bound, no
    lock)."""
    directory = presets.cache_dir() / "xla"
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", XLA_CACHE_MAX_BYTES)
        _date_undated_entries(directory)


XLA_CACHE_SUFFIX, XLA_ATIME_SUFFIX = "-cache", "-atime"  # JAX's names (jax._src.lru_cache) for an entry's files


def _date_undated_entries(directory: Path) -> None:
    """Gives every entry of XLA's cache under `directory` its last-use file, dated by its modification time, where
    it has none. A bounded cache reads every entry's last-use file before each write (to find what to evict), and
    one entry without it makes every write fail: entries written unbounded (before the bound, or with
    `JAX_COMPILATION_CACHE_MAX_SIZE=-1`) and an entry whose writer was killed between its two files."""
    import filelock

    directory.mkdir(parents=True, exist_ok=True)
    try:
        with filelock.FileLock(directory / ".lockfile", timeout=30):
            for entry in directory.glob(f"*{XLA_CACHE_SUFFIX}"):
                last_use = entry.with_name(entry.name.removesuffix(XLA_CACHE_SUFFIX) + XLA_ATIME_SUFFIX)
                if not last_use.exists():
                    last_use.write_bytes(entry.stat().st_mtime_ns.to_bytes(8, "little"))
    except (OSError, filelock.Timeout) as error:
        log.warning("XLA's compilation cache %s: could not date its entries (%s: %s); writes to it may fail",
                    directory, type(error).__name__, error)


def program_store_dir() -> Path:
    """Where the serving programs' executables are kept between starts (programs.ProgramStore)."""
    return presets.cache_dir() / "programs"


def build_engine(args: EngineArgs, progress: bool = True) -> LoadedEngine:
    if args.load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={args.load_format!r}: expected one of {list(LOAD_FORMATS)}")
    if args.mm_encoder_gelu not in VISION_GELUS:
        raise ValueError(f"mm_encoder_gelu={args.mm_encoder_gelu!r}: expected one of {list(VISION_GELUS)}")
    started = time.monotonic()
    if args.compilation_cache:
        enable_compilation_cache()
    path, name, is_demo = resolve_model(args)
    config = load_config(path, args)
    mesh = sharding.make_mesh(args.data_parallel_size, args.tensor_parallel_size)
    encoder_mode = sharding.resolve_encoder_mode(config, args.mm_encoder_tp_mode, args.tensor_parallel_size)

    def shardings_fn(state):
        return sharding.param_shardings(state, mesh, encoder_mode)

    dtype = weights.dtype_of(args.dtype, config)
    weights.check_fits(config, dtype, shardings_fn, mesh.devices.flatten())
    if args.load_format == "dummy":
        weight_programs = (ProgramStore.for_devices(program_store_dir(), list(mesh.devices.flat))
                           if args.compilation_cache else None)
        module = weights.dummy_model(config, dtype, shardings_fn, store=weight_programs)
    elif (path / CONFIG_FILE).is_file():
        module = weights.load_safetensors(path, config, dtype, shardings_fn)
    else:
        from convert.converter import iter_converted

        config, tensors = iter_converted(path)
        module = weights.load_arrays(config, tensors, dtype, shardings_fn)

    jax.block_until_ready(nnx.state(module))
    weights_ready = time.monotonic()

    tokenizer, processor = input_processor(path, config, args)
    image_tiles = processor.tiling.max_tiles  # a full-size image under the served tiling
    max_model_len = args.max_model_len or min(config.text.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    dp = args.data_parallel_size
    slots = -(-args.max_num_seqs // dp) * dp  # the slot axis is split over "data"
    # Decode computes every row; below 8 rows XLA's skinny GEMMs get slower, not faster (docs/PERF.md),
    # so the runner keeps at least 8 rows while the engine admits at most max_num_seqs sequences.
    rows = max(slots, -(-8 // dp) * dp)
    runner = Runner(module, mesh, encoder_mode, num_slots=rows, max_model_len=max_model_len,
                    pool_tiles=args.feature_cache_tiles, cuda_graphs=args.cuda_graphs,
                    vision_gelu=args.mm_encoder_gelu)
    if args.mm_encoder_gelu == "tanh" and not runner.tanh_vision_gelu:
        log.warning("mm_encoder_gelu='tanh' changes nothing here: the vision encoder's activation is %r, not the "
                    "exact GELU", config.vision.hidden_act)
    engine_config = EngineConfig(
        max_model_len=max_model_len, max_num_seqs=slots, decode_steps=args.decode_steps,
        prefill_token_budget=args.prefill_token_budget, max_waiting=args.max_waiting,
        max_prefill_batch=args.max_prefill_batch, min_prefill_bucket=min(64, max_model_len),
        feature_cache_tiles=args.feature_cache_tiles, max_encode_tiles=min(64, args.feature_cache_tiles),
        image_tiles=image_tiles, compile_workers=args.compile_workers)
    serving_programs = ProgramStore.for_runner(program_store_dir(), runner) if args.compilation_cache else None
    engine = Engine(runner, tokenizer, engine_config, eos_token_ids(path, config, tokenizer),
                    program_store=serving_programs)
    log.info("mesh %s, LLM tensor parallel %d, data parallel %d, vision encoder mode %r",
             dict(mesh.shape), args.tensor_parallel_size, dp, encoder_mode)
    log.info("weights on the devices in %.1f s, tokenizer, processor and KV cache in %.1f s",
             weights_ready - started, time.monotonic() - weights_ready)
    seconds = engine.warmup(progress=progress)
    parts = [f"{engine.warmup_report[kind][0]} {name} ({engine.warmup_report[kind][1]:.1f} s)"
             for kind, name in (("prefill", "prefill"), ("encode", "encoder"), ("decode", "decode"))]
    # Per kind: seconds summed over the compiling threads (lowering included), so they add up to more than
    # the wall-clock total.
    log.info("compiled %s buckets in %.1f s", ", ".join(parts), seconds)
    log.info("warm-up runs: %s", ", ".join(f"{kind} {spent:.2f} s" for kind, spent in engine.first_run_seconds.items()))
    return LoadedEngine(engine, processor, config, path, name, is_demo, encoder_mode, mesh, seconds)


def load_config(path: Path, args: EngineArgs) -> InternVLConfig:
    config = InternVLConfig.load(path) if (path / CONFIG_FILE).is_file() else InternVLConfig.from_pretrained(path)
    if args.load_format == "dummy" and config.image_token_id < 0:
        # An original-layout config without the id: the synthetic tokenizer's.
        config = dataclasses.replace(config, image_token_id=config.text.vocab_size - 7)
    return config


def input_processor(path: Path, config: InternVLConfig, args: EngineArgs) -> tuple[Any, InputProcessor]:
    """(tokenizer, the processor turning messages and images into a prompt's token ids and tiles)."""
    tokenizer = load_tokenizer(path)
    prompter = ChatPrompter.from_pretrained(path, tokenizer=tokenizer, chat_template=args.chat_template,
                                            tokens_per_tile=config.tokens_per_tile)
    processor = InputProcessor(prompter, config, tiling_for(path, config), max_images=args.limit_mm_per_prompt,
                               default_mm_kwargs=args.mm_processor_kwargs, cache_gb=args.mm_processor_cache_gb)
    return tokenizer, processor


def build_engine_processes(args: EngineArgs, progress: bool = True) -> LoadedEngine:
    """`args.data_parallel_size` engine processes (`engine_processes`), each serving the model on
    `args.tensor_parallel_size` devices of its own; this process keeps the tokenizer and the input processor, and its
    JAX is set to the host platform (the server's `--data-parallel-backend process`)."""
    from internvl_jax.engine_processes import EngineProcesses

    started = time.monotonic()
    # This process computes nothing on a device: JAX here must not take the GPUs' memory from the replicas (the
    # first start builds the demo model's random weights here, on the host).
    jax.config.update("jax_platforms", "cpu")
    path, name, is_demo = resolve_model(args)  # the demo checkpoint is written here, before the replicas read it
    config = load_config(path, args)
    tokenizer, processor = input_processor(path, config, args)
    engine, report = EngineProcesses.start(args, args.data_parallel_size, tokenizer, progress=progress)
    log.info("%d engine processes ready in %.1f s (LLM tensor parallel %d each, vision encoder mode %r)",
             engine.replicas, time.monotonic() - started, args.tensor_parallel_size, report["encoder_mode"])
    return LoadedEngine(engine, processor, config, path, name, is_demo, report["encoder_mode"], None,
                        report["warmup_seconds"])


def eos_token_ids(path: Path, config: InternVLConfig, tokenizer) -> tuple[int, ...]:
    ids = list(config.eos_token_ids)
    generation = path / "generation_config.json"
    if generation.is_file():
        value = json.loads(generation.read_text()).get("eos_token_id")
        ids += value if isinstance(value, list) else [value] if value is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


class LLM:
    """Offline inference: `LLM(model).chat(messages, SamplingParams(...))`."""

    def __init__(self, model: str | os.PathLike | None = None, **kwargs: Any):
        self.args = EngineArgs(model=None if model is None else str(model), **kwargs)
        self.loaded = build_engine(self.args, progress=True)
        self.engine = self.loaded.engine
        self.processor = self.loaded.processor
        self._ids = itertools.count()
        self._transformers_tokenizer = None

    @property
    def config(self) -> InternVLConfig:
        return self.loaded.config

    def get_tokenizer(self):
        """The checkpoint's transformers tokenizer, as vLLM's `LLM.get_tokenizer()` gives (loaded on first
        use). The engine itself encodes and decodes with a `FastTokenizer` where it can, which gives the same
        ids and text (tests/test_fast_tokenizer.py) without importing transformers."""
        if self._transformers_tokenizer is None:
            tokenizer = self.engine.tokenizer
            if isinstance(tokenizer, FastTokenizer):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(self.loaded.model_path), local_files_only=True)
            self._transformers_tokenizer = tokenizer
        return self._transformers_tokenizer

    def chat(self, messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             chat_template_kwargs: Mapping[str, Any] | None = None,
             mm_processor_kwargs: Mapping[str, Any] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        prepared = [self.processor.chat(c, mm_processor_kwargs=mm_processor_kwargs,
                                        chat_template_kwargs=chat_template_kwargs,
                                        add_generation_prompt=add_generation_prompt) for c in conversations]
        return self._run(prepared, sampling_params)

    def generate(self, prompts: str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Prompts as strings, or vLLM-style dicts `{"prompt": text, "multi_modal_data": {"image": [...]}}`
        (or `{"prompt_token_ids": [...]}`); the text holds one image placeholder per image."""
        items = [prompts] if isinstance(prompts, (str, Mapping)) else list(prompts)
        prepared = []
        for item in items:
            if isinstance(item, str):
                item = {"prompt": item}
            if "prompt_token_ids" in item:
                prepared.append(PreparedPrompt(None, list(item["prompt_token_ids"]), []))
                continue
            images = (item.get("multi_modal_data") or {}).get("image", [])
            images = images if isinstance(images, (list, tuple)) else [images]
            prepared.append(self.processor.prompt(item["prompt"], images,
                                                  mm_processor_kwargs=item.get("mm_processor_kwargs")))
        return self._run(prepared, sampling_params)

    def _run(self, prepared: list[PreparedPrompt], sampling_params) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, Sequence) else [sampling_params] * len(prepared)
        if len(params) != len(prepared):
            raise InputError(f"{len(params)} sampling params for {len(prepared)} prompts")
        for item, param in zip(prepared, params, strict=True):
            self.engine.validate(item.prompt_ids, item.images, param)  # all or nothing
        results: dict[str, RequestOutput] = {}
        order = []
        try:
            for item, param in zip(prepared, params, strict=True):
                request_id = str(next(self._ids))
                order.append(request_id)
                while True:
                    try:
                        self.engine.add_request(request_id, item.prompt_ids, param, item.images,
                                                sink=lambda output: results.__setitem__(output.request_id, output),
                                                prompt=item.prompt)
                        break
                    except EngineFull:
                        self.engine.step()
            self.engine.run_until_done()
        except BaseException:  # e.g. Ctrl-C in a notebook: the next call must not inherit these requests
            for request_id in order:
                self.engine.abort(request_id)
            raise
        return [results[request_id] for request_id in order]
