"""`python -m serve`: the command line (vLLM's flag names), start-up and shutdown.

Start-up order: parse and check every flag (a typo fails in a second, not after compiling), build the
engine (logs the mesh and encoder mode, shows a progress bar while it compiles every bucket), then bind
the socket and log the URL. SIGTERM or Ctrl-C: stop admitting, let requests in flight finish for up
to --shutdown-timeout seconds, abort the rest (finish_reason "abort"), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

import uvicorn

from internvl_jax.engine_processes import PROCESS_BACKENDS, EngineDied, replica_devices, visible_gpus
from internvl_jax.offline import LOAD_FORMATS, EngineArgs
from internvl_jax.preprocess import DEFAULT_MAX_PIXELS
from internvl_jax.runner import CUDA_GRAPH_STEPS, VISION_GELUS
from serve.bridge import DEFAULT_PREPROCESS_THREADS, PREPROCESS_BACKENDS
from serve.media import DEFAULT_FETCH_TIMEOUT, DEFAULT_MAX_IMAGE_BYTES, MediaPolicy

log = logging.getLogger("serve")

DTYPES = ("auto", "float32", "bfloat16", "float16")
API_KEY_ENV = "INTERNVL_JAX_API_KEY"


def make_parser() -> argparse.ArgumentParser:
    defaults = EngineArgs()
    parser = argparse.ArgumentParser(
        prog="python -m serve", description="OpenAI-compatible InternVL server (JAX). With no --model it serves "
        "a small built-in demo model with random weights.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, help="a converted directory, an HF checkpoint directory "
                       "(converted on load) or a preset name (with --load-format dummy); default: the demo model")
    model.add_argument("--served-model-name", nargs="+", default=None,
                       help="the name(s) clients use in 'model'; default: --model")
    model.add_argument("--load-format", choices=LOAD_FORMATS, default=defaults.load_format,
                       help="'dummy': random weights (for presets and benchmarks)")
    model.add_argument("--dtype", choices=DTYPES, default="auto", help="'auto': the checkpoint's dtype")
    model.add_argument("--chat-template", default=None, help="a template file, a built-in name or template text")
    model.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request; "
                       "default: the model's, at most 8192")
    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("-tp", "--tensor-parallel-size", type=int, default=defaults.tensor_parallel_size)
    parallel.add_argument("-dp", "--data-parallel-size", type=int, default=defaults.data_parallel_size)
    parallel.add_argument("--data-parallel-backend", choices=("auto", *PROCESS_BACKENDS), default="auto",
                          help="'process': each -dp replica is an engine process of its own on -tp GPUs of its own "
                          "(vLLM's data-parallel engine cores), this process keeps HTTP, tokenizing and image "
                          "preprocessing and sends each request to the replica with the fewest in flight (with "
                          "-dp 1: the one engine in a process of its own); 'mesh': the replicas are one engine over "
                          "a (data, model) device mesh, driven by one thread of this process; 'auto': process with "
                          "-dp > 1 on NVIDIA GPUs (1.19x the mesh's req/s on 2x H200), else mesh (with -dp 1: sooner "
                          "first tokens one request at a time)")
    parallel.add_argument("--mm-encoder-tp-mode", choices=("weights", "data"), default=defaults.mm_encoder_tp_mode,
                          help="vision encoder over the tensor-parallel devices: split its weights, or split the "
                          "batch of tiles (a full copy on each device)")
    parallel.add_argument("--mm-encoder-gelu", choices=VISION_GELUS, default=defaults.mm_encoder_gelu,
                          help="the vision encoder MLP's GELU where the model's is the exact (erf) one: 'exact', or "
                          "'tanh', the approximation, which XLA computes inside fc1's GEMM (+8-9%% tiles/s on an "
                          "H100; features as close to a float32 run of the exact model: docs/PERF.md)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs, help="decode slots")
    engine.add_argument("--max-waiting", type=int, default=defaults.max_waiting,
                        help="requests queued for a slot; beyond it requests get 503 with Retry-After")
    engine.add_argument("--decode-steps", type=int, default=defaults.decode_steps, help="tokens per decode dispatch")
    engine.add_argument("--prefill-token-budget", type=int, default=defaults.prefill_token_budget,
                        help="padded tokens per prefill call and data-parallel replica (also bounds the compiled "
                        "prefill shapes)")
    engine.add_argument("--max-prefill-batch", type=int, default=defaults.max_prefill_batch,
                        help="prompts per prefill call and data-parallel replica (also bounds the compiled "
                        "prefill shapes)")
    engine.add_argument("--feature-cache-tiles", type=int, default=defaults.feature_cache_tiles,
                        help="image tiles whose encoder output is kept for reuse")
    engine.add_argument("--compile-workers", type=int, default=defaults.compile_workers,
                        help="threads compiling the shape buckets at start-up (default: min(16, usable CPU cores))")
    engine.add_argument("--cuda-graphs", choices=tuple(CUDA_GRAPH_STEPS), default=defaults.cuda_graphs,
                        help="serving steps XLA may run as CUDA graphs (vLLM's cudagraph modes FULL, "
                        "FULL_DECODE_ONLY, NONE): a graph saves kernel launches on the GPU, but is updated on the host "
                        "before every call")
    engine.add_argument("--compilation-cache", action=argparse.BooleanOptionalAction,
                        default=defaults.compilation_cache,
                        help="keep the compiled serving programs between starts (executables under "
                        "$INTERNVL_JAX_CACHE/programs)")
    media = parser.add_argument_group("multimodal inputs")
    media.add_argument("--limit-mm-per-prompt", default=None, help='JSON, e.g. \'{"image": 4}\'')
    media.add_argument("--mm-processor-kwargs", default=None,
                       help='JSON defaults, e.g. \'{"max_dynamic_patch": 6}\'; requests may override them')
    media.add_argument("--mm-processor-cache-gb", type=float, default=defaults.mm_processor_cache_gb,
                       help="GiB of preprocessed images kept by their encoded bytes, so an image sent again (every "
                       "turn of a chat) is not decoded and tiled again; 0 disables")
    media.add_argument("--allowed-local-media-path", default=None,
                       help="allow file:// image URLs under this directory")
    media.add_argument("--enable-http-media", action="store_true", help="allow http(s) image URLs (fetched by "
                       "the server)")
    media.add_argument("--media-fetch-timeout", type=float, default=DEFAULT_FETCH_TIMEOUT, help="seconds")
    media.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                       help="encoded size above which an image is refused (413)")
    media.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                       help="width x height above which an image is refused (413)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    server.add_argument("--port", type=int, default=8000, help="0: any free port (the log says which)")
    server.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*; default: "
                        f"${API_KEY_ENV} if set (keeps the key out of the process list)")
    server.add_argument("--max-request-bytes", type=int, default=64 * 1024 * 1024,
                        help="request body size above which a request is refused (413)")
    server.add_argument("--preprocess-workers", type=int, default=None,
                        help="threads (and image worker processes) that process inputs (default: the usable cores, "
                        "at most 16)")
    server.add_argument("--preprocess-backend", choices=PREPROCESS_BACKENDS, default="process",
                        help="where images are decoded and tiled: worker processes (no GIL shared with the engine "
                        "thread) or the preprocessing threads themselves")
    server.add_argument("--preprocess-threads", type=int, default=DEFAULT_PREPROCESS_THREADS,
                        help="threads an image worker may split one image's resizes over while the host has idle "
                        "cores (the same pixels, sooner; fewer as more images are in flight; 1: none)")
    server.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds requests in flight may run after SIGTERM before they are aborted")
    server.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def _json_object(parser: argparse.ArgumentParser, flag: str, text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        parser.error(f"{flag}: not valid JSON ({error}): {text!r}")
    if not isinstance(value, dict):
        parser.error(f"{flag}: expected a JSON object, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser()
    args = parser.parse_args(argv)
    limits = _json_object(parser, "--limit-mm-per-prompt", args.limit_mm_per_prompt)
    if limits is not None:
        if set(limits) - {"image"}:
            parser.error(f"--limit-mm-per-prompt: only 'image' is supported, got {sorted(limits)}")
        image_limit = limits.get("image")
        if image_limit is not None and (not isinstance(image_limit, int) or image_limit < 0):
            parser.error(f"--limit-mm-per-prompt: image must be an integer >= 0, got {image_limit!r}")
        args.limit_mm_per_prompt = image_limit
    if not args.mm_processor_cache_gb >= 0:
        parser.error(f"--mm-processor-cache-gb must be >= 0, got {args.mm_processor_cache_gb}")
    args.mm_processor_kwargs = _json_object(parser, "--mm-processor-kwargs", args.mm_processor_kwargs)
    if args.mm_processor_kwargs is not None:
        from internvl_jax.preprocess import TilingConfig

        try:  # checked now, not at the first request
            TilingConfig().with_overrides(args.mm_processor_kwargs)
        except ValueError as error:
            parser.error(f"--mm-processor-kwargs: {error}")
    positive = ("tensor_parallel_size", "data_parallel_size", "max_num_seqs", "max_waiting", "decode_steps",
                "prefill_token_budget", "max_prefill_batch", "feature_cache_tiles", "max_image_bytes",
                "max_image_pixels", "max_request_bytes")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("compile_workers", "preprocess_workers", "preprocess_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.data_parallel_backend == "auto":
        # Processes need GPUs to give each replica (CUDA_VISIBLE_DEVICES); where none can be named (no NVIDIA
        # GPU: the CPU, or another platform) every replica would take the same devices, so the mesh.
        several = args.data_parallel_size > 1 and visible_gpus() is not None
        args.data_parallel_backend = "process" if several else "mesh"
    if args.data_parallel_backend == "process":
        try:
            replica_devices(args.data_parallel_size, args.tensor_parallel_size)
        except ValueError as error:
            parser.error(str(error))
    if args.max_model_len is not None and args.max_model_len < 2:
        parser.error(f"--max-model-len must be >= 2, got {args.max_model_len}")
    if args.allowed_local_media_path is not None:
        path = Path(args.allowed_local_media_path).expanduser()
        if not path.is_dir():
            parser.error(f"--allowed-local-media-path: {str(path)!r} is not a directory")
        args.allowed_local_media_path = path
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    elif not args.api_key:
        parser.error("--api-key must not be empty")
    return args


def engine_args(args: argparse.Namespace) -> EngineArgs:
    return EngineArgs(model=args.model, tensor_parallel_size=args.tensor_parallel_size,
                      data_parallel_size=args.data_parallel_size, mm_encoder_tp_mode=args.mm_encoder_tp_mode,
                      mm_encoder_gelu=args.mm_encoder_gelu,
                      max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                      dtype=None if args.dtype == "auto" else args.dtype, load_format=args.load_format,
                      chat_template=args.chat_template, limit_mm_per_prompt=args.limit_mm_per_prompt,
                      mm_processor_kwargs=args.mm_processor_kwargs,
                      mm_processor_cache_gb=args.mm_processor_cache_gb, decode_steps=args.decode_steps,
                      max_waiting=args.max_waiting, prefill_token_budget=args.prefill_token_budget,
                      feature_cache_tiles=args.feature_cache_tiles, max_prefill_batch=args.max_prefill_batch,
                      compilation_cache=args.compilation_cache, compile_workers=args.compile_workers,
                      cuda_graphs=args.cuda_graphs)


def package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("internvl-jax")
    except metadata.PackageNotFoundError:  # run from a checkout: read the project file
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


class Server(uvicorn.Server):
    """uvicorn with a graceful drain on SIGTERM/SIGINT and a 'ready' line naming the bound URL."""

    def __init__(self, config: uvicorn.Config, state, banner: str):
        super().__init__(config)
        self.state = state
        self.banner = banner
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.should_exit or not self.servers:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        log.info("ready: serving %s at http://%s:%d/v1 (also /health, /metrics, /version)", self.banner, host, port)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's own handler records the signal and re-raises it after shutdown, which would end the
        # process with "killed by SIGTERM" instead of exit status 0: a drained shutdown is a clean exit.
        if self.should_exit:
            self.force_exit = True  # a second signal: stop waiting for requests in flight
            return
        log.warning("received %s", signal.Signals(sig).name)
        self.should_exit = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.state.begin_drain)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from internvl_jax.offline import build_engine, build_engine_processes
    from serve.app import ServerSettings, create_app

    build = build_engine_processes if args.data_parallel_backend == "process" else build_engine
    try:
        loaded = build(engine_args(args), progress=True)
    except (ValueError, FileNotFoundError, EngineDied) as error:
        log.error("cannot load the model: %s", error)
        return 2
    loaded.processor.max_pixels = args.max_image_pixels
    names = tuple(args.served_model_name or (loaded.model_name,))
    media = MediaPolicy(allowed_local_media_path=args.allowed_local_media_path,
                        enable_http_media=args.enable_http_media, fetch_timeout=args.media_fetch_timeout,
                        max_image_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels)
    settings = ServerSettings(served_model_names=names, api_key=args.api_key, media=media,
                              max_request_bytes=args.max_request_bytes, shutdown_timeout=args.shutdown_timeout,
                              preprocess_workers=args.preprocess_workers,
                              preprocess_backend=args.preprocess_backend,
                              preprocess_threads=args.preprocess_threads, version=package_version())
    app = create_app(loaded, settings)
    banner = repr(names[0])
    if loaded.is_demo:
        banner += " (THE DEMO MODEL: random weights, gibberish answers; pass --model for a real one)"
        log.warning("*** serving the built-in DEMO model with RANDOM weights: its answers are gibberish ***")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout + 10, access_log=False)
    server = Server(config, app.state.server, banner)
    server.run()
    log.info("stopped")
    return 0
