"""`python -m serve` on the demo model: a real server process on loopback, driven by the official
`openai` client and raw HTTP (httpx). No mocks: the engine, uvicorn and the client are the real ones.

One server for the whole module (its start-up compiles every bucket; the session's XLA cache makes the
in-process reference `LLM` with the same settings cheap). The SIGTERM test stops it, so it comes last.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import internvl_jax
from internvl_jax.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent
READY = re.compile(r"ready: serving .* at (http://\S+)/v1")
KEY = "sk-serve-test"
AUTH = {"Authorization": f"Bearer {KEY}"}

# Small engine settings: few compiled buckets (about 18), so start-up stays short on a CPU.
ENGINE = dict(max_model_len=1024, max_num_seqs=8, decode_steps=4, prefill_token_budget=1024, max_prefill_batch=4,
              feature_cache_tiles=8, mm_processor_kwargs={"max_dynamic_patch": 2})
MAX_IMAGE_PIXELS = 4_000_000
MAX_REQUEST_BYTES = 4_000_000


def engine_flags(settings: dict) -> list[str]:
    flags = []
    for name, value in settings.items():
        flags += [f"--{name.replace('_', '-')}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


class ServerProcess:
    """`python -m serve --port 0 ...` in a subprocess; `url` is what its 'ready' line says."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, start_timeout: float = 900):
        environment = {**os.environ, **(env or {})}
        environment.pop("INTERNVL_JAX_API_KEY", None)  # the key comes from the flags here, or there is none
        self.process = subprocess.Popen([sys.executable, "-m", "serve", "--port", "0", *args], cwd=REPO,
                                        env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if start_timeout:
            self.wait_ready(start_timeout)

    def wait_ready(self, timeout: float = 900) -> ServerProcess:
        """Several servers may start side by side (`start_timeout=0`), then be waited for."""
        if not self._ready.wait(timeout) or self.url is None:
            self.kill()
            raise RuntimeError(f"the server did not start:\n{self.log()[-6000:]}")
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            match = READY.search(line)
            if match:
                self.url = match.group(1)
                self._ready.set()
        self._ready.set()  # exited

    def log(self) -> str:
        return "".join(self.lines)

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def terminate(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def metrics(server: ServerProcess) -> dict[str, float]:
    """Every sample of /metrics (parsed with prometheus_client's parser), by name and labels, summed over the
    engines (the `engine` label: one here, one per engine process with --data-parallel-backend process)."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k not in ("model_name", "engine"))
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def wait_for(predicate, timeout: float = 30, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


SQUARE = data_url(png_bytes(noise_image(100, 100, 0)))  # 1 tile
OBLONG = data_url(png_bytes(noise_image(120, 90, 1)))  # 1 tile
WIDE = data_url(png_bytes(noise_image(240, 100, 2)))  # 2x1 grid + thumbnail = 3 tiles

CONVERSATIONS = [
    [{"role": "user", "content": "Tell me a story about a lighthouse."}],
    user(image_part(SQUARE)),
    user(image_part(OBLONG), text="Describe the colours."),
    user(image_part(WIDE), text="Wide?"),
    user(image_part(SQUARE), image_part(OBLONG), text="Compare them."),
    [*user(image_part(OBLONG)), {"role": "assistant", "content": "Noise."},
     {"role": "user", "content": "Are you sure?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    user(image_part(SQUARE), text="Again, in other words."),
]
# Greedy and seeded sampling: both must not depend on what else shares the batch.
SAMPLING = [dict(temperature=0), dict(temperature=0.8, seed=3), dict(temperature=0), dict(temperature=0),
            dict(temperature=0.7, top_k=20, seed=5), dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=9),
            dict(temperature=0)]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "square.png").write_bytes(png_bytes(noise_image(100, 100, 0)))
    (root / "secret.png").write_bytes(png_bytes(noise_image(100, 100, 0)))
    return allowed


@pytest.fixture(scope="module")
def server(media_dir):
    process = ServerProcess([*engine_flags(ENGINE), "--api-key", KEY, "--allowed-local-media-path", str(media_dir),
                             "--limit-mm-per-prompt", '{"image": 2}', "--max-image-pixels", str(MAX_IMAGE_PIXELS),
                             "--max-request-bytes", str(MAX_REQUEST_BYTES), "--shutdown-timeout", "1"])
    yield process
    process.kill()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def llm(server):  # after the server: its start-up fills the compilation cache this reuses
    return internvl_jax.LLM(None, **ENGINE)


def chat(client: openai.OpenAI, messages, **kwargs):
    extra = {key: kwargs.pop(key) for key in ("return_token_ids", "ignore_eos", "mm_processor_kwargs", "top_k")
             if key in kwargs}
    return client.chat.completions.create(model="internvl-jax-demo", messages=messages, extra_body=extra, **kwargs)


def stream_chat(client: openai.OpenAI, messages, **kwargs) -> tuple[list[str], list[int], str | None, list]:
    """(text pieces, token ids, finish reason, chunks) of one streamed choice."""
    chunks = list(chat(client, messages, stream=True, return_token_ids=True, **kwargs))
    pieces, tokens, finish = [], [], None
    for chunk in chunks:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            tokens += choice.model_extra.get("token_ids") or []
            finish = choice.finish_reason or finish
    return pieces, tokens, finish, chunks


# ---- parity and the API ---------------------------------------------------------------------------------


def test_openai_client_sync_and_stream_equal_llm_chat(client, llm):
    messages = user(image_part(WIDE), text="What do you see?")
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=24))[0]
    response = chat(client, messages, temperature=0, max_tokens=24, return_token_ids=True)
    choice = response.choices[0]
    assert choice.message.content == expected.outputs[0].text
    assert choice.model_extra["token_ids"] == expected.outputs[0].token_ids
    assert response.model_extra["prompt_token_ids"] == expected.prompt_token_ids
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens

    pieces, tokens, finish, chunks = stream_chat(client, messages, temperature=0, max_tokens=24,
                                                 stream_options={"include_usage": True})
    assert "".join(pieces) == expected.outputs[0].text
    assert tokens == expected.outputs[0].token_ids
    assert finish == expected.outputs[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) > 3  # streamed in pieces, not one blob
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_completions_equal_llm_generate(client, llm):
    prompts = ["The capital of France is", "Once upon a time"]
    expected = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    response = client.completions.create(model="internvl-jax-demo", prompt=prompts, max_tokens=10, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(response.choices, key=lambda c: c.index)] == [e.outputs[0].text for e in expected]
    assert response.usage.completion_tokens == 20
    stream = client.completions.create(model="internvl-jax-demo", prompt=prompts, max_tokens=10, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [e.outputs[0].text for e in expected]


def test_logprobs_are_sorted_and_match_the_greedy_choice(client):
    response = chat(client, user(image_part(SQUARE)), temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        values = [top.logprob for top in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert entry.token == entry.top_logprobs[0].token  # greedy takes the most likely token
        assert entry.logprob == pytest.approx(values[0])
        assert bytes(entry.bytes).decode() == entry.token


def test_stop_string_is_never_streamed(client):
    base = chat(client, user(image_part(OBLONG)), temperature=0, max_tokens=12, ignore_eos=True, logprobs=True)
    tokens = [entry.token for entry in base.choices[0].logprobs.content]
    full = base.choices[0].message.content
    # A stop string spanning two tokens: only a hold-back keeps its first half out of the stream.
    index = next(i for i in range(2, len(tokens) - 1)
                 if min(len(tokens[i]), len(tokens[i + 1])) >= 3 and "\ufffd" not in tokens[i] + tokens[i + 1])
    stop = tokens[index][-2:] + tokens[index + 1][:2]
    expected = full[:full.find(stop)]
    response = chat(client, user(image_part(OBLONG)), temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].model_extra["stop_reason"] == stop
    pieces, _, finish, _ = stream_chat(client, user(image_part(OBLONG)), temperature=0, max_tokens=12,
                                       ignore_eos=True, stop=[stop])
    assert "".join(pieces) == expected and finish == "stop"


def test_n_choices_stream_with_usage(client):
    chunks = list(chat(client, user(image_part(SQUARE)), n=3, temperature=0.9, seed=1, max_tokens=5, stream=True,
                       ignore_eos=True, stream_options={"include_usage": True}))
    finished = {c.index: c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason}
    assert finished == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1].usage.completion_tokens == 15


def test_local_file_under_the_allowed_directory(client, media_dir):
    by_file = chat(client, user(image_part(f"file://{media_dir / 'square.png'}")), temperature=0, max_tokens=8)
    by_data = chat(client, user(image_part(SQUARE)), temperature=0, max_tokens=8)
    assert by_file.choices[0].message.content == by_data.choices[0].message.content


def test_models_health_version(server):
    models = httpx.get(f"{server.v1}/models", headers=AUTH).json()
    [card] = models["data"]
    assert card["id"] == "internvl-jax-demo" and card["demo"] is True and "demo" in card["owned_by"]
    assert card["max_model_len"] == ENGINE["max_model_len"]
    log = server.log()
    assert "DEMO" in log and "compiling buckets" in log
    assert "mesh {'data': 1, 'model': 1}" in log and "vision encoder mode 'weights'" in log
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_api_key_required_on_v1_only(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(f"{server.v1}/chat/completions", headers=headers,
                              json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{server.v1}/models", headers=headers).status_code == 401
    assert httpx.get(f"{server.v1}/models", headers=AUTH).status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


# ---- load -----------------------------------------------------------------------------------------------


def test_32_concurrent_streams_match_running_alone(server, client):
    requests = [(index % 8, 4 + (index * 7) % 29) for index in range(32)]  # (conversation, max_tokens)

    async def run_concurrently():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=600) as aclient:
            async def one(conversation: int, max_tokens: int):
                sampling = dict(SAMPLING[conversation])
                extra = {"return_token_ids": True, "ignore_eos": True, "top_k": sampling.pop("top_k", None)}
                stream = await aclient.chat.completions.create(
                    model="internvl-jax-demo", messages=CONVERSATIONS[conversation], max_tokens=max_tokens,
                    stream=True, **sampling, extra_body=extra)
                tokens, finish = [], None
                async for chunk in stream:
                    for choice in chunk.choices:
                        tokens += choice.model_extra.get("token_ids") or []
                        finish = choice.finish_reason or finish
                return tokens, finish

            return await asyncio.gather(*(one(c, m) for c, m in requests))

    before = metrics(server)
    results = asyncio.run(run_concurrently())
    assert metrics(server)["internvl:num_requests_running"] == 0
    # Alone: one request at a time, each conversation once with the most tokens asked of it; a seeded or
    # greedy request's first k tokens do not depend on max_tokens.
    longest = {c: max(m for cc, m in requests if cc == c) for c in range(8)}
    alone = {}
    for conversation, max_tokens in longest.items():
        kwargs = dict(SAMPLING[conversation])
        alone[conversation] = chat(client, CONVERSATIONS[conversation], max_tokens=max_tokens, ignore_eos=True,
                                   return_token_ids=True, **kwargs).choices[0].model_extra["token_ids"]
    for (conversation, max_tokens), (tokens, finish) in zip(requests, results, strict=True):
        assert finish == "length"
        assert tokens == alone[conversation][:max_tokens], (conversation, max_tokens)
    after = metrics(server)
    assert after["internvl:mm_cache_hits_total"] > before["internvl:mm_cache_hits_total"]  # repeated images


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_disconnect_mid_request_frees_the_slot(server, stream):
    before = metrics(server)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 800, "ignore_eos": True, "stream": stream}
    with httpx.Client(timeout=60) as http:
        if stream:
            with http.stream("POST", f"{server.v1}/chat/completions", json=body, headers=AUTH) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                received = 0
                while received < 3:
                    line = next(lines)
                    received += line.startswith("data: ")
                during = metrics(server)
                assert during["internvl:num_requests_running"] == 1
                assert during["internvl:kv_cache_usage_perc"] > 0
            # Leaving the block closed the connection with the request mid-stream.
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
                http.post(f"{server.v1}/chat/completions", json=body, headers=AUTH, timeout=0.3)
    wait_for(lambda: metrics(server)["internvl:num_requests_running"] == 0, timeout=10)
    after = metrics(server)
    generated = after["internvl:generation_tokens_total"] - before["internvl:generation_tokens_total"]
    assert 0 < generated < 400
    assert after.get("internvl:request_success_total{finished_reason=abort}", 0) == (
        before.get("internvl:request_success_total{finished_reason=abort}", 0) + 1)


def test_metrics_parse_and_count(server, client):
    before = metrics(server)
    fresh = data_url(png_bytes(noise_image(100, 100, 99)))  # an image no other test sends: 1 tile
    for _ in range(2):  # the second time its encoder output comes from the cache
        chat(client, user(image_part(fresh)), temperature=0, max_tokens=9, ignore_eos=True)
    samples = metrics(server)
    for name in ("internvl:num_requests_running", "internvl:num_requests_waiting", "internvl:kv_cache_usage_perc",
                 "internvl:num_slots"):
        assert name in samples, name

    def grew(name: str) -> float:
        return samples[name] - before.get(name, 0)

    assert grew("internvl:time_to_first_token_seconds_count") == 2
    for phase in ("preprocess", "queue", "prefill"):  # the first token's time, in parts
        assert grew(f"internvl:request_{phase}_time_seconds_count") == 2, phase
    # queue + prefill = the engine's TTFT (the same two requests)
    engine_ttft = grew("internvl:time_to_first_token_seconds_sum")
    parts = grew("internvl:request_queue_time_seconds_sum") + grew("internvl:request_prefill_time_seconds_sum")
    assert parts == pytest.approx(engine_ttft, rel=1e-6, abs=1e-6)
    assert grew("internvl:request_preprocess_time_seconds_sum") > 0
    # The engine thread's time in steps, part of it blocked on results (the CPU "device" computes in between).
    assert 0 < grew("internvl:engine_device_wait_seconds_total") < grew("internvl:engine_step_seconds_total")
    host = grew("internvl:engine_step_seconds_total") - grew("internvl:engine_device_wait_seconds_total")
    assert 0 < grew("internvl:engine_host_cpu_seconds_total") <= host * 1.05  # CPU time within the host time
    # The phases split the steps' time (every phase ran: an image was encoded and prefilled).
    phases = {p: grew(f"internvl:engine_phase_seconds_total{{phase={p}}}")
              for p in ("schedule", "encode", "prefill", "decode", "process")}
    assert all(v > 0 for v in phases.values()), phases
    assert sum(phases.values()) == pytest.approx(grew("internvl:engine_step_seconds_total"), rel=0.05)
    assert grew("process_cpu_seconds_total") > 0
    # The image worker processes' CPU, apart from the server's own (at least their start: Python, numpy, Pillow).
    assert samples["internvl:image_worker_cpu_seconds_total"] > 0
    assert grew("internvl:inter_token_latency_seconds_count") >= 4  # 8 more tokens, at most 4 a dispatch
    assert grew("internvl:e2e_request_latency_seconds_count") == 2
    assert grew("internvl:request_success_total{finished_reason=length}") == 2
    assert grew("internvl:generation_tokens_total") == 18
    assert grew("internvl:prompt_tokens_total") > 2 * 256  # image tokens count as prompt tokens
    assert grew("internvl:image_tiles_encoded_total") == 1
    assert grew("internvl:mm_cache_queries_total") == 2 and grew("internvl:mm_cache_hits_total") == 1
    # The same bytes the second time: not decoded and tiled again either.
    assert grew("internvl:mm_processor_cache_queries_total") == 2
    assert grew("internvl:mm_processor_cache_hits_total") == 1
    assert samples["internvl:recompiles_total"] == 0, [line for line in server.log().splitlines() if "BUG" in line]
    assert samples["internvl:num_slots"] == ENGINE["max_num_seqs"]
    assert samples["internvl:kv_cache_usage_perc"] == 0 and samples["internvl:num_requests_running"] == 0


# ---- bad input --------------------------------------------------------------------------------------------


def solid_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")  # compresses to a few KB whatever the size
    return buffer.getvalue()


def chat_body(**fields) -> dict:
    return {"model": "internvl-jax-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


def with_image(url: str, **fields) -> dict:
    return chat_body(messages=user(image_part(url)), **fields)


TRUNCATED = png_bytes(noise_image(64, 64, 7))[:300]
# (name, path, body: dict or raw bytes, status, regex the message must match, param or None)
BAD_INPUTS = [
    ("malformed-json", "chat/completions", b'{"messages": [', 400, "not valid JSON", None),
    ("not-an-object", "chat/completions", b"[1, 2]", 400, "must be a JSON object", None),
    ("max-tokens-string", "chat/completions", chat_body(max_tokens="ten"), 400, "max_tokens", "max_tokens"),
    ("messages-string", "chat/completions", chat_body(messages="hi"), 400, "messages", "messages"),
    ("stream-not-bool", "chat/completions", chat_body(stream="yes"), 400, "stream", "stream"),
    ("unknown-model", "chat/completions", chat_body(model="gpt-4"), 404, "does not exist.*internvl-jax-demo",
     "model"),
    ("missing-messages", "chat/completions", {"model": "internvl-jax-demo"}, 400, "messages: Field required",
     "messages"),
    ("empty-messages", "chat/completions", chat_body(messages=[]), 400, "messages is empty", None),
    ("bad-role", "chat/completions", chat_body(messages=[{"role": "robot", "content": "hi"}]), 400,
     "'robot' is not one of", None),
    ("invalid-base64", "chat/completions", with_image("data:image/png;base64,@@notbase64@@"), 400,
     "not valid base64", None),
    ("not-an-image", "chat/completions", with_image(data_url(b"hello, I am text")), 400,
     "not a recognised image format", None),
    ("truncated-image", "chat/completions", with_image(data_url(TRUNCATED)), 400, "truncated", None),
    ("data-url-not-image", "chat/completions", with_image("data:text/plain;base64,aGVsbG8="), 400,
     "media type 'text/plain'", None),
    ("over-pixel-limit", "chat/completions", with_image(data_url(solid_png(2100, 2000))), 413,
     f"4200000 pixels, over the limit of {MAX_IMAGE_PIXELS}", None),
    ("too-many-images", "chat/completions",
     chat_body(messages=user(image_part(SQUARE), image_part(SQUARE), image_part(SQUARE))), 400,
     "3 images given; at most 2", None),
    ("prompt-plus-max-tokens", "chat/completions", with_image(SQUARE, max_tokens=1000), 400,
     "exceeds max_model_len 1024; lower max_tokens to at most", None),
    ("prompt-too-long", "chat/completions",  # 6x1 grid + thumbnail: 7 tiles, 1792 image tokens
     with_image(data_url(png_bytes(noise_image(600, 100, 3))), mm_processor_kwargs={"max_dynamic_patch": 6}), 400,
     "the prompt has 1[0-9]{3} tokens; max_model_len is 1024", None),
    ("max-tokens-zero", "chat/completions", chat_body(max_tokens=0), 400, "max_tokens: must be an integer >= 1",
     "max_tokens"),
    ("max-completion-tokens-negative", "chat/completions", chat_body(max_completion_tokens=-3), 400,
     "max_completion_tokens: must be an integer >= 1", "max_completion_tokens"),
    ("temperature-negative", "chat/completions", chat_body(temperature=-0.5), 400, "temperature: must be >= 0",
     "temperature"),
    ("top-p-zero", "chat/completions", chat_body(top_p=0), 400, r"top_p: must be in \(0, 1\]", "top_p"),
    ("top-p-above-one", "chat/completions", chat_body(top_p=1.5), 400, r"top_p: must be in \(0, 1\]", "top_p"),
    ("n-over-limit", "chat/completions", chat_body(n=9), 400, "n=9 exceeds max_num_seqs 8", None),
    # Values that would overflow the engine's int32 arrays or 64-bit seed, failing everyone's requests.
    ("seed-over-64-bits", "chat/completions", chat_body(seed=2**64), 400, "does not fit in 64 bits", None),
    ("top-k-over-int32", "chat/completions", chat_body(top_k=2**40), 400, "top_k=1099511627776 is too large", None),
    ("min-tokens-huge", "chat/completions", chat_body(max_tokens=None, min_tokens=2**40), 400,
     "must be below max_model_len", None),
    ("stop-token-out-of-vocab", "chat/completions", chat_body(stop_token_ids=[2**40]), 400,
     "must be token ids in \\[0, 4096\\)", None),
    ("stop-empty-string", "chat/completions", chat_body(stop=[""]), 400, "stop: must be non-empty strings", "stop"),
    ("unknown-part-type", "chat/completions",
     chat_body(messages=[{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "x"}}]}]), 400,
     "unsupported content part type 'audio_url'", None),
    ("bad-mm-kwargs", "chat/completions", with_image(SQUARE, mm_processor_kwargs={"max_tiles": 2}), 400,
     "unknown key 'max_tiles'", None),
    ("file-url-outside", "chat/completions", with_image("file:///etc/hostname"), 400,
     "outside the allowed media directory", None),
    ("file-url-traversal", "chat/completions", None, 400, "outside the allowed media directory", None),
    ("file-url-missing", "chat/completions", None, 400, "no file at", None),
    ("bare-path", "chat/completions", with_image("/etc/passwd"), 400, "unsupported image URL", None),
    ("http-url-disabled", "chat/completions", with_image("http://127.0.0.1:9/cat.png"), 400,
     "http\\(s\\) image URLs are disabled", None),
    ("top-logprobs-without-logprobs", "chat/completions", chat_body(top_logprobs=2), 400,
     "top_logprobs needs logprobs=true", "top_logprobs"),
    ("top-logprobs-over-20", "chat/completions", chat_body(logprobs=True, top_logprobs=25), 400,
     "top_logprobs: must be an integer in \\[0, 20\\]", "top_logprobs"),
    ("tools", "chat/completions", chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "tool calling is not supported", "tools"),
    ("body-too-large", "chat/completions", chat_body(messages=[{"role": "user", "content": "x" * MAX_REQUEST_BYTES}]),
     413, "over the 4000000 byte limit", None),
    ("completion-empty-prompt", "completions", {"prompt": [], "max_tokens": 2}, 400, "prompt is empty", None),
    ("completion-token-out-of-vocab", "completions", {"prompt": [1, 2, 99999], "max_tokens": 2}, 400,
     "token id 99999 is outside the vocabulary", "prompt"),
    ("completion-missing-prompt", "completions", {"max_tokens": 2}, 400, "prompt: Field required", "prompt"),
    ("unknown-route", "chat/completion", chat_body(), 404, "no route POST /v1/chat/completion", None),
]


@pytest.mark.parametrize("name,path,body,status,message,param", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server, client, media_dir, name, path, body,
                                                                   status, message, param):
    if name == "file-url-traversal":
        body = with_image(f"file://{media_dir}/../secret.png")
    elif name == "file-url-missing":
        body = with_image(f"file://{media_dir}/nothing-here.png")
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(f"{server.v1}/{path}", headers={**AUTH, "content-type": "application/json"}, timeout=120,
                          **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert re.search(message, error["message"]), error["message"]
    if param is not None:
        assert error["param"] == param
    good = chat(client, user(image_part(SQUARE)), temperature=0, max_tokens=3)
    assert good.choices[0].finish_reason == "length" and good.usage.completion_tokens == 3


def test_no_server_error_was_logged(server):
    assert "Traceback" not in server.log() and "ERROR" not in server.log()


# ---- shutdown (stops the module's server: keep last) ------------------------------------------------------


def child_pids(pid: int, module: str) -> list[int]:
    """The `python -m MODULE` children of process `pid` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in map(int, read_proc(task / "children").split()):
            if module in read_proc(Path(f"/proc/{child}/cmdline")):
                found.append(child)
    return found


def read_proc(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
        return ""


def running(pid: int) -> bool:
    """Exists and is not a zombie (an exited child nobody has reaped yet)."""
    stat = read_proc(Path(f"/proc/{pid}/stat"))
    return bool(stat) and stat.rpartition(")")[2].split()[0] != "Z"


def test_sigterm_finishes_short_requests_aborts_long_ones_and_exits_0(server):
    def stream(max_tokens: int, out: dict, started: threading.Event) -> None:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True}
        events = []
        with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, headers=AUTH, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    started.set()
        out["events"] = events

    results = {"short": {}, "long": {}}
    threads = []
    for name, max_tokens in (("long", 800), ("short", 24)):
        started = threading.Event()
        thread = threading.Thread(target=stream, args=(max_tokens, results[name], started))
        thread.start()
        assert started.wait(60)
        threads.append(thread)
    workers = child_pids(server.process.pid, "internvl_jax.image_workers")
    assert workers, "the server runs no image worker processes"
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises((httpx.HTTPStatusError, httpx.TransportError)):  # refused, or 503 while draining
        httpx.post(f"{server.v1}/chat/completions", headers=AUTH, timeout=10,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).raise_for_status()
    for thread in threads:
        thread.join(60)
    assert server.process.wait(60) == 0
    assert not [pid for pid in workers if running(pid)], "image workers outlived the server"
    for name, expected_reason in (("short", "length"), ("long", "abort")):
        events = results[name]["events"]
        assert events[-1] == "[DONE]", name
        reasons = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
        assert reasons == [expected_reason], (name, reasons)
    assert "received SIGTERM" in server.log()


def test_preprocess_workers_default_to_the_usable_cores_up_to_16(capsys):
    """`--preprocess-workers` unset: one preprocessing thread per usable core, at most 16 (with `-dp 2` four
    were the queue); given, exactly that many; below 1, a usage error naming the flag."""
    from internvl_jax.programs import available_cpus
    from serve.bridge import EngineBridge
    from serve.cli import parse_args

    assert parse_args([]).preprocess_workers is None
    assert parse_args(["--preprocess-workers", "3"]).preprocess_workers == 3
    with pytest.raises(SystemExit):
        parse_args(["--preprocess-workers", "0"])
    assert "--preprocess-workers must be >= 1, got 0" in capsys.readouterr().err
    for given, expected in ((None, min(16, available_cpus())), (3, 3)):
        bridge = EngineBridge(engine=None, preprocess_workers=given)
        try:
            assert bridge.preprocess_workers == expected == bridge._pool._max_workers == bridge.image_workers.workers
            assert len(bridge.image_workers.pids()) == expected
        finally:
            bridge._pool.shutdown()
            bridge.image_workers.close()


def test_preprocess_threads_flag(capsys):
    """`--preprocess-threads`: how many threads one image's resizes may use in its worker (default 8); below 1 a
    usage error naming the flag; the bridge hands it to the image workers with the usable cores."""
    from internvl_jax.programs import available_cpus
    from serve.bridge import EngineBridge
    from serve.cli import parse_args

    assert parse_args([]).preprocess_threads == 8
    assert parse_args(["--preprocess-threads", "2"]).preprocess_threads == 2
    with pytest.raises(SystemExit):
        parse_args(["--preprocess-threads", "0"])
    assert "--preprocess-threads must be >= 1, got 0" in capsys.readouterr().err
    bridge = EngineBridge(engine=None, preprocess_workers=1, preprocess_threads=3)
    try:
        assert bridge.image_workers.threads_per_image == 3 and bridge.image_workers.cores == available_cpus()
    finally:
        bridge._pool.shutdown()
        bridge.image_workers.close()


def test_preprocess_backend_flag(capsys):
    """`--preprocess-backend`: images decoded in worker processes by default, on the threads with `thread`;
    anything else is a usage error naming the choices."""
    from serve.bridge import EngineBridge
    from serve.cli import parse_args

    assert parse_args([]).preprocess_backend == "process"
    assert parse_args(["--preprocess-backend", "thread"]).preprocess_backend == "thread"
    with pytest.raises(SystemExit):
        parse_args(["--preprocess-backend", "fork"])
    assert "invalid choice: 'fork' (choose from 'process', 'thread')" in capsys.readouterr().err
    bridge = EngineBridge(engine=None, preprocess_workers=2, preprocess_backend="thread")
    assert bridge.image_workers is None
    bridge._pool.shutdown()
    with pytest.raises(ValueError, match="preprocess_backend must be one of"):
        EngineBridge(engine=None, preprocess_backend="fork")
