"""The FastAPI app: OpenAI routes, auth, error bodies, health and metrics.

Every error a client can cause leaves here as `{"error": {"message", "type", "param", "code"}}` with a
4xx status and a message that says what to fix; a 500 means a bug of ours. Handlers parse the body
themselves (strict pydantic, from raw bytes) so that the API key is checked before the body is even
read, and a malformed body gets the same error shape as everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from internvl_jax.engine import RequestError
from internvl_jax.engine_processes import RequestRefused
from internvl_jax.inputs import InputError, PreparedPrompt
from internvl_jax.offline import LoadedEngine
from internvl_jax.outputs import RequestOutput
from serve import completions, metrics
from serve.bridge import DEFAULT_PREPROCESS_THREADS, EngineBridge, EngineDead, RequestStream, ServerBusy
from serve.media import MediaPolicy
from serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, ModelCard, new_id, validation_error

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    served_model_names: tuple[str, ...]
    api_key: str | None = None
    media: MediaPolicy = MediaPolicy()
    max_request_bytes: int = 64 * 1024 * 1024
    shutdown_timeout: float = 30.0
    preprocess_workers: int | None = None  # None: bridge.default_preprocess_workers()
    preprocess_backend: str = "process"  # where images are decoded and tiled: worker "process"es or the "thread"s
    preprocess_threads: int = DEFAULT_PREPROCESS_THREADS  # per image, in a worker process, while cores are idle
    version: str = "unknown"


# ---- errors ---------------------------------------------------------------------------------------


def to_api_error(error: BaseException, log_unexpected: bool = True) -> ApiError:
    """Any exception a handler can meet -> what the client sees."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ValidationError):
        return validation_error(error)
    if isinstance(error, InputError):
        return ApiError(400, str(error), code="invalid_input")
    if isinstance(error, RequestError):
        return ApiError(400, str(error), code="invalid_request")
    if isinstance(error, ServerBusy):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if error.retry else {}
        return ApiError(503, str(error), type="service_unavailable", code="server_busy" if error.retry else
                        "shutting_down", headers=headers)
    if isinstance(error, EngineDead):
        return ApiError(500, str(error), type="internal_server_error", code="engine_dead")
    if isinstance(error, RequestRefused):
        return ApiError(500, str(error), type="internal_server_error", code="engine_refused")
    if log_unexpected:
        log.error("unexpected error while serving a request", exc_info=error)
    return ApiError(500, f"internal server error ({type(error).__name__}: {error}); this is a bug of the server",
                    type="internal_server_error", code="internal_error")


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


# ---- the app --------------------------------------------------------------------------------------


class ServerState:
    def __init__(self, loaded: LoadedEngine, settings: ServerSettings):
        self.loaded = loaded
        self.settings = settings
        self.engine = loaded.engine
        self.processor = loaded.processor
        self.bridge = EngineBridge(loaded.engine, preprocess_workers=settings.preprocess_workers,
                                   preprocess_backend=settings.preprocess_backend,
                                   preprocess_threads=settings.preprocess_threads)
        self.processor.workers = self.bridge.image_workers
        self.metrics = metrics.ServerMetrics(loaded.engine, settings.served_model_names[0], loaded.processor.cache,
                                             self.bridge.image_workers)
        self.bridge.on_finished = self.metrics.request_finished
        self.token_text = completions.TokenText(loaded.engine.tokenizer)
        self.drain_task: asyncio.Task | None = None

    def begin_drain(self) -> None:
        """On SIGTERM/SIGINT (from the event loop): stop admitting, finish or abort what runs."""
        if self.drain_task is None:
            log.warning("shutting down: no new requests; waiting up to %.0f s for %d request(s) in flight",
                        self.settings.shutdown_timeout, len(self.bridge.streams))
            self.drain_task = asyncio.ensure_future(self.bridge.drain(self.settings.shutdown_timeout))


def create_app(loaded: LoadedEngine, settings: ServerSettings) -> FastAPI:
    state = ServerState(loaded, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.bridge.start(asyncio.get_running_loop())

        async def drain_latencies() -> None:  # keeps the engine's observation lists short between scrapes
            while True:
                await asyncio.sleep(1.0)
                state.metrics.drain()

        drainer = asyncio.ensure_future(drain_latencies())
        try:
            yield
        finally:
            drainer.cancel()
            state.begin_drain()
            await state.drain_task
            state.bridge.stop()

    app = FastAPI(title="internvl-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}; see /v1/models, /v1/chat/completions, "
                        "/v1/completions, /health, /metrics",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(error.status_code,
                                                                                           str(error.detail))
        return error_response(ApiError(error.status_code, message, code="not_found" if error.status_code == 404
                                       else None))

    # The errors a request can cause; anything else reaches the generic handler below (a 500, logged).
    for expected in (InputError, RequestError, ServerBusy, EngineDead, ValidationError):
        app.add_exception_handler(expected, lambda request, error: error_response(to_api_error(error)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        # Starlette re-raises after sending this response, and uvicorn logs the traceback.
        return error_response(to_api_error(error, log_unexpected=False))

    def check_auth(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                           "key given to --api-key", type="authentication_error", code="invalid_api_key")

    async def parse(request: Request, model: type[BaseModel]) -> Any:
        limit = settings.max_request_bytes
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total <= limit:
                chunks.append(chunk)
            elif total > 4 * limit:
                break  # not worth reading on: the connection is closed after the error instead
        # An over-long body is read (and dropped) to its end where that is cheap, so that the client, which
        # is still sending, reads this error instead of a broken connection.
        if total > limit:
            raise ApiError(413, f"the request body is over the {limit} byte limit; send fewer or smaller images",
                           code="request_too_large")
        try:
            return model.model_validate_json(b"".join(chunks))
        except ValidationError as error:
            raise validation_error(error) from error

    def served_name(requested: str | None) -> str:
        if requested is None or requested in settings.served_model_names:
            return requested or settings.served_model_names[0]
        raise ApiError(404, f"the model {requested!r} does not exist on this server; it serves "
                       f"{', '.join(repr(n) for n in settings.served_model_names)} (see GET /v1/models)",
                       param="model", code="model_not_found")

    def refuse_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
        unsupported = body.unsupported()
        if unsupported:
            raise ApiError(400, "; ".join(why for _, why in unsupported), param=unsupported[0][0],
                           code="unsupported_parameter")

    async def wait_final(request: Request, stream: RequestStream) -> RequestOutput | None:
        """The finished output, or None when the client disconnected first (the caller aborts)."""

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        result = asyncio.ensure_future(stream.final())
        try:
            done, _ = await asyncio.wait({watcher, result}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if result in done:
            return result.result()
        result.cancel()
        return None

    def stream_error(error: BaseException) -> dict[str, Any]:
        return to_api_error(error).body()

    # ---- routes ---------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        received = time.monotonic()
        check_auth(request)
        body: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        model = served_name(body.model)
        refuse_unsupported(body)
        params = completions.sampling_params(body)
        prepared = await state.bridge.prepare(
            state.processor.chat, body.messages, mm_processor_kwargs=body.mm_processor_kwargs,
            chat_template_kwargs=body.chat_template_kwargs, add_generation_prompt=body.add_generation_prompt,
            image_loader=settings.media.load)
        request_id = new_id("chatcmpl")
        stream = state.bridge.submit(request_id, prepared, params)
        state.metrics.request_preprocessed(time.monotonic() - received)
        if body.stream:
            return EventStream(completions.chat_stream(request_id, model, body, stream, state.token_text,
                                                       stream_error), lambda: state.bridge.finished(stream))
        try:
            output = await wait_final(request, stream)
        finally:
            state.bridge.finished(stream)
        if output is None:
            return Response(status_code=499)  # nobody is listening; the engine request is aborted
        return JSONResponse(completions.chat_response(request_id, model, body, output, state.token_text))

    @app.post("/v1/completions")
    async def text_completions(request: Request) -> Response:
        received = time.monotonic()
        check_auth(request)
        body: CompletionRequest = await parse(request, CompletionRequest)
        model = served_name(body.model)
        refuse_unsupported(body)
        params = completions.sampling_params(body)
        prompts = await state.bridge.prepare(prepare_prompts, state, body.prompt)
        request_id = new_id("cmpl")
        streams: list[RequestStream] = []
        try:
            for index, prepared in enumerate(prompts):
                streams.append(state.bridge.submit(f"{request_id}-{index}", prepared, params))
        except BaseException:
            for stream in streams:
                state.bridge.finished(stream)
            raise
        state.metrics.request_preprocessed(time.monotonic() - received)
        if body.stream:
            def close() -> None:
                for stream in streams:
                    state.bridge.finished(stream)

            return EventStream(completions.completion_stream(request_id, model, body, merge(streams), len(streams),
                                                             state.token_text, stream_error), close)
        try:
            outputs = []
            for stream in streams:
                output = await wait_final(request, stream)
                if output is None:
                    return Response(status_code=499)
                outputs.append(output)
        finally:
            for stream in streams:
                state.bridge.finished(stream)
        return JSONResponse(completions.completion_response(request_id, model, body, outputs, state.token_text))

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_auth(request)
        description = ("DEMO MODEL: a small InternVL with RANDOM weights, its answers are gibberish; start the "
                       "server with --model to serve a real checkpoint") if loaded.is_demo else None
        cards = [ModelCard(id=name, root=str(loaded.model_path), max_model_len=state.engine.config.max_model_len,
                           demo=loaded.is_demo, description=description,
                           owned_by="internvl-jax (demo, random weights)" if loaded.is_demo else "internvl-jax")
                 for name in settings.served_model_names]
        return JSONResponse({"object": "list", "data": [card.model_dump() for card in cards]})

    @app.get("/health")
    async def health() -> Response:
        if not state.bridge.alive:
            return error_response(ApiError(503, f"the engine is not running ({state.bridge.dead or 'stopped'})",
                                           type="service_unavailable", code="engine_dead"))
        if state.bridge.draining:
            return error_response(ApiError(503, "the server is shutting down", type="service_unavailable",
                                           code="shutting_down"))
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": settings.version})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(state.metrics.render(), media_type=metrics.CONTENT_TYPE)

    return app


class EventStream(StreamingResponse):
    """Server-sent events that run `on_close` however the response ends: finished, client gone (Starlette
    cancels the response), or cancelled before the event generator even started, when a `finally` inside
    the generator would never run and the engine request would live on."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def prepare_prompts(state: ServerState, prompt: str | list[str] | list[int] | list[list[int]]) -> list[PreparedPrompt]:
    """A completion's prompt(s) -> prepared prompts (on the worker pool: tokenizing can take a while)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt", code="invalid_value")
    if all(isinstance(item, int) for item in prompt):
        prompt = [prompt]
    vocab = state.loaded.config.text.vocab_size
    prepared = []
    for index, item in enumerate(prompt):
        if isinstance(item, str):
            prepared.append(state.processor.prompt(item))
            continue
        bad = next((t for t in item if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt[{index}]: token id {bad} is outside the vocabulary [0, {vocab})",
                           param="prompt", code="invalid_value")
        prepared.append(PreparedPrompt(None, list(item), []))
    return prepared


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleaves several requests' snapshots as they come, tagged with the request's index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                await queue.put((index, output, None))
        except Exception as error:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, None, error))
        await queue.put((index, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, output, error = await queue.get()
            if error is not None:
                raise error
            if output is None:
                remaining -= 1
                continue
            yield index, output
    finally:
        for task in tasks:
            task.cancel()
