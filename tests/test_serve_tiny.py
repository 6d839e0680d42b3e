"""`python -m serve --model <HF checkpoint>` on a tiny random InternVL (converted on load), against
transformers `generate`, with the vision encoder in both tensor-parallel modes on 2 fake CPU devices;
and the admission bound and remote-image fetching, with a real local HTTP server holding images.

Two servers start side by side: `-tp 2 --mm-encoder-tp-mode data` (with http media and a one-request
admission bound) and `-tp 2 --mm-encoder-tp-mode weights`.
"""

from __future__ import annotations

import http.server
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import torch

from internvl_jax.preprocess import TilingConfig, preprocess_image
from tests.test_serve import ServerProcess, data_url, image_part, noise_image, png_bytes, user
from tests.tiny_models import save_tiny_hf, tiny_hf_config

MM_KWARGS = {"max_dynamic_patch": 4}
FLAGS = ["--max-model-len", "512", "--max-num-seqs", "4", "--decode-steps", "4", "--max-prefill-batch", "2",
         "--prefill-token-budget", "512", "--feature-cache-tiles", "16", "--dtype", "float32",
         "--mm-processor-kwargs", '{"max_dynamic_patch": 4}', "-tp", "2"]
FETCH_TIMEOUT = 2.0
MAX_IMAGE_BYTES = 100_000

IMAGES = {"square": noise_image(64, 64, 10), "wide": noise_image(150, 60, 11), "tall": noise_image(50, 140, 12)}
CONVERSATIONS = {
    "text-only": [{"role": "user", "content": "Hello, who are you?"}],
    "one-image": user(image_part(data_url(png_bytes(IMAGES["wide"])))),
    "two-images": user(image_part(data_url(png_bytes(IMAGES["tall"]))),
                       image_part(data_url(png_bytes(IMAGES["square"]))), text="Compare them."),
}
CONVERSATION_IMAGES = {"text-only": [], "one-image": ["wide"], "two-images": ["tall", "square"]}


class MediaHandler(http.server.BaseHTTPRequestHandler):
    """/square.png: an image; /held.png: the image once the test releases it; /slow.png: nothing for
    longer than the server's fetch timeout; /big.png: over the server's byte cap; anything else: 404."""

    held_requested = threading.Event()
    release = threading.Event()

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/held.png":
            type(self).held_requested.set()
            type(self).release.wait(60)
        if self.path == "/slow.png":
            time.sleep(FETCH_TIMEOUT + 2)
        if self.path in ("/square.png", "/held.png", "/slow.png"):
            body = png_bytes(IMAGES["square"])
        elif self.path == "/big.png":
            body = png_bytes(noise_image(256, 256, 13))  # about 200 KB of noise
            assert len(body) > MAX_IMAGE_BYTES
        else:
            self.send_error(404)
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the server gave up on /slow.png
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def media_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MediaHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    MediaHandler.release.set()
    server.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("serve-tiny") / "hf", tiny_hf_config("qwen2", "300m"), seed=3)


@pytest.fixture(scope="module")
def servers(checkpoint):
    launched = {
        "data": ServerProcess(["--model", str(checkpoint), *FLAGS, "--mm-encoder-tp-mode", "data",
                               "--enable-http-media", "--media-fetch-timeout", str(FETCH_TIMEOUT),
                               "--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-waiting", "1"], start_timeout=0),
        "weights": ServerProcess(["--model", str(checkpoint), *FLAGS, "--mm-encoder-tp-mode", "weights"],
                                 start_timeout=0),
    }
    try:
        yield {mode: server.wait_ready() for mode, server in launched.items()}
    finally:
        for server in launched.values():
            server.kill()


@pytest.fixture(scope="module")
def reference(checkpoint):
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32).eval()


def transformers_greedy(reference, checkpoint, prompt_ids: list[int], images: list[str], max_tokens: int) -> list[int]:
    tiling = TilingConfig.from_checkpoint(checkpoint).with_overrides(MM_KWARGS)
    kwargs = {}
    if images:
        pixels = [preprocess_image(IMAGES[name], tiling).pixel_values for name in images]
        kwargs["pixel_values"] = torch.from_numpy(np.concatenate(pixels))
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, **kwargs)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("mode", ["data", "weights"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_greedy_equals_transformers_generate(servers, reference, checkpoint, mode, name):
    server = servers[mode]
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)
    model = str(checkpoint)
    response = client.chat.completions.create(model=model, messages=CONVERSATIONS[name], temperature=0, max_tokens=12,
                                              extra_body={"ignore_eos": True, "return_token_ids": True})
    assert f"mesh {{'data': 1, 'model': 2}}, LLM tensor parallel 2, data parallel 1, vision encoder mode {mode!r}" in (
        server.log())
    tokens = response.choices[0].model_extra["token_ids"]
    prompt_ids = response.model_extra["prompt_token_ids"]
    tiling = TilingConfig.from_checkpoint(checkpoint).with_overrides(MM_KWARGS)
    tiles = sum(preprocess_image(IMAGES[image], tiling).num_tiles for image in CONVERSATION_IMAGES[name])
    assert sum(1 for t in prompt_ids if t == reference.config.image_token_id) == 16 * tiles  # 16 tokens a tile
    assert tokens == transformers_greedy(reference, checkpoint, prompt_ids, CONVERSATION_IMAGES[name], 12)
    stream = client.chat.completions.create(model=model, messages=CONVERSATIONS[name], temperature=0, max_tokens=12,
                                            stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
    streamed = [t for chunk in stream for choice in chunk.choices for t in choice.model_extra.get("token_ids") or []]
    assert streamed == tokens


def test_http_image_urls_are_fetched_with_a_timeout_and_a_byte_cap(servers, media_server):
    server = servers["data"]
    by_url = httpx.post(f"{server.v1}/chat/completions", timeout=60, json={
        "messages": user(image_part(f"{media_server}/square.png")), "max_tokens": 6, "temperature": 0})
    by_data = httpx.post(f"{server.v1}/chat/completions", timeout=60, json={
        "messages": user(image_part(data_url(png_bytes(IMAGES["square"])))), "max_tokens": 6, "temperature": 0})
    assert by_url.status_code == 200, by_url.text
    assert by_url.json()["choices"][0]["message"] == by_data.json()["choices"][0]["message"]
    for path, status, message in (("/missing.png", 400, "gave HTTP 404"),
                                  ("/slow.png", 400, f"timed out after {FETCH_TIMEOUT} s"),
                                  ("/big.png", 413, f"over the {MAX_IMAGE_BYTES} byte image limit")):
        started = time.monotonic()
        response = httpx.post(f"{server.v1}/chat/completions", timeout=60, json={
            "messages": user(image_part(f"{media_server}{path}")), "max_tokens": 4})
        assert response.status_code == status, response.text
        assert message in response.json()["error"]["message"]
        assert time.monotonic() - started < FETCH_TIMEOUT + 1.5


def test_full_admission_queue_gets_503_with_retry_after(servers, media_server):
    server = servers["data"]  # --max-waiting 1
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    held: dict = {}

    def send_held() -> None:  # its image fetch hangs until released: it holds the one queue place
        held["response"] = httpx.post(f"{server.v1}/chat/completions", timeout=60, json={
            "messages": user(image_part(f"{media_server}/held.png")), "max_tokens": 4})

    thread = threading.Thread(target=send_held)
    thread.start()
    try:
        assert MediaHandler.held_requested.wait(30)
        refused = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert "at capacity" in error["message"] and "retry later" in error["message"]
        assert error["code"] == "server_busy"
    finally:
        MediaHandler.release.set()
        thread.join(60)
    assert held["response"].status_code == 200, held["response"].text
    assert httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60).status_code == 200
