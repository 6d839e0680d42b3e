"""`python -m serve -dp 2 -tp 2 --data-parallel-backend process`: two engine processes behind one server, each on a
2-device tensor-parallel mesh of its own (fake CPU devices), on the demo model. A real server on loopback, driven by
the official `openai` client; its answers are compared with the in-process `LLM` on the same mesh and engine
settings, so every token, logprob and stop string that crosses the process boundary is checked against the engine
that produced it without one.

One server for the module (two replicas compile side by side); the tests that end it come last.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from test_serve import (
    CONVERSATIONS,
    ENGINE,
    OBLONG,
    REPO,
    SAMPLING,
    SQUARE,
    WIDE,
    ServerProcess,
    child_pids,
    engine_flags,
    image_part,
    metrics,
    running,
    user,
    wait_for,
)

import internvl_jax
from internvl_jax.engine_processes import replica_devices
from internvl_jax.sampling import SamplingParams
from internvl_jax.shared_memory import SHARED_MEMORY, TILE_DIRECTORY_PREFIX

MODEL = "internvl-jax-demo"


def tile_directories() -> set[str]:
    if not os.path.isdir(SHARED_MEMORY):
        return set()
    return {os.path.join(SHARED_MEMORY, name) for name in os.listdir(SHARED_MEMORY)
            if name.startswith(TILE_DIRECTORY_PREFIX)}


# Put on the server's PYTHONPATH (its engine processes and image workers inherit it): every process records an exit
# that ran the interpreter's teardown (atexit), to tell it from `os._exit`.
EXIT_MARKS = """import atexit, os, sys


def _mark():
    name = os.path.basename(sys.argv[0]) if sys.argv else "?"
    open(os.path.join(os.environ["INTERNVL_JAX_TEST_EXIT_MARKS"], f"{name}-{os.getpid()}"), "w").close()


if os.environ.get("INTERNVL_JAX_TEST_EXIT_MARKS"):
    atexit.register(_mark)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    before = tile_directories()
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(EXIT_MARKS)
    marks = tmp_path_factory.mktemp("exit-marks")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           "INTERNVL_JAX_TEST_EXIT_MARKS": str(marks)}
    process = ServerProcess([*engine_flags(ENGINE), "-dp", "2", "-tp", "2", "--data-parallel-backend", "process",
                             "--limit-mm-per-prompt", '{"image": 2}', "--shutdown-timeout", "1"], env=env)
    process.tile_directories = tile_directories() - before  # the image workers' and the engine processes'
    process.exit_marks = marks
    yield process
    process.kill()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def llm(server):  # after the server: its start-up fills the compilation cache this reuses
    return internvl_jax.LLM(None, tensor_parallel_size=2, **ENGINE)  # each replica's mesh


def by_engine(server, name: str) -> list[float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return [float(line.rpartition(" ")[2]) for line in text.splitlines()
            if line.startswith(name + "{") and 'engine="' in line]


def test_replica_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    assert replica_devices(2, 2) == ["3,5", "6,7"]
    assert replica_devices(4, 1) == ["3", "5", "6", "7"]
    assert replica_devices(1, 1) == ["3"]
    with pytest.raises(ValueError, match=r"3 engine processes x 2 GPUs each .* need 6 GPUs; 4 visible \(3,5,6,7\)"):
        replica_devices(3, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert replica_devices(2, 1) == [None, None]  # no GPU: each replica takes the host platform's devices


def test_too_few_gpus_is_a_usage_error_before_anything_starts():
    """-dp 2 takes engine processes by default (`auto`), so it checks the GPUs as the explicit flag does."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    result = subprocess.run([sys.executable, "-m", "serve", "-dp", "2"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error: 2 engine processes x 1 GPUs each (-dp 2 -tp 1) need 2 GPUs; 1 visible (0)" in result.stderr


def test_the_backend_defaults_to_processes_with_several_replicas(monkeypatch):
    """`--data-parallel-backend auto` (the default): engine processes with -dp > 1 where there are GPUs to give
    them, the engine in the server's process with -dp 1 or without GPUs (every replica would take the same
    devices); an explicit choice is kept either way."""
    from serve.cli import parse_args

    def backends() -> list[str]:
        return [parse_args(argv).data_parallel_backend
                for argv in ([], ["-dp", "2"], ["-dp", "4", "-tp", "2"],
                             ["-dp", "2", "--data-parallel-backend", "mesh"], ["--data-parallel-backend", "process"],
                             ["-dp", "1", "--data-parallel-backend", "auto"])]

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert backends() == ["mesh", "process", "process", "mesh", "process", "mesh"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: -dp > 1 stays on the mesh unless asked otherwise
    assert backends() == ["mesh", "mesh", "mesh", "mesh", "process", "mesh"]


def test_each_engine_process_holds_its_own_tensor_parallel_mesh(server):
    log = server.log()
    for index in range(2):
        assert f"[engine {index}]: mesh {{'data': 1, 'model': 2}}, LLM tensor parallel 2, data parallel 1" in log
    assert "2 engine processes ready" in log


def test_concurrent_requests_on_two_engines_equal_one_engine_in_process(server, llm):
    requests = [(index % 8, 4 + (index * 7) % 23) for index in range(24)]  # (conversation, max_tokens)

    async def run_concurrently():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=600) as aclient:
            async def one(conversation: int, max_tokens: int):
                sampling = dict(SAMPLING[conversation])
                extra = {"return_token_ids": True, "ignore_eos": True, "top_k": sampling.pop("top_k", None)}
                stream = await aclient.chat.completions.create(
                    model=MODEL, messages=CONVERSATIONS[conversation], max_tokens=max_tokens, stream=True,
                    **sampling, extra_body=extra)
                text, tokens, finish = "", [], None
                async for chunk in stream:
                    for choice in chunk.choices:
                        text += choice.delta.content or ""
                        tokens += choice.model_extra.get("token_ids") or []
                        finish = choice.finish_reason or finish
                return text, tokens, finish

            return await asyncio.gather(*(one(c, m) for c, m in requests))

    results = asyncio.run(run_concurrently())
    for (conversation, max_tokens), (text, tokens, finish) in zip(requests, results, strict=True):
        expected = llm.chat(CONVERSATIONS[conversation], SamplingParams(**SAMPLING[conversation],
                                                                        max_tokens=max_tokens, ignore_eos=True))[0]
        assert tokens == expected.outputs[0].token_ids, (conversation, max_tokens)
        assert text == expected.outputs[0].text, (conversation, max_tokens)
        assert finish == "length"
    # Both replicas served: the router spreads requests in flight over them.
    generated = wait_for(lambda: (values := by_engine(server, "internvl:generation_tokens_total"))
                         and sum(values) >= sum(m for _, m in requests) and values)
    assert len(generated) == 2 and min(generated) > 0, generated


def test_logprobs_n_choices_and_stop_strings_cross_the_process_boundary(client, llm):
    messages = user(image_part(WIDE), text="What do you see?")
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8, logprobs=3))[0].outputs[0]
    response = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8,
                                              logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert [entry.logprob for entry in content] == pytest.approx(
        [step[token].logprob for step, token in zip(expected.logprobs, expected.token_ids, strict=True)], abs=1e-5)
    assert [top.logprob for entry in content for top in entry.top_logprobs] == pytest.approx(
        [value for step in expected.logprobs for value in sorted((p.logprob for p in step.values()), reverse=True)[:3]],
        abs=1e-5)

    seeded = SamplingParams(n=3, temperature=0.9, seed=1, max_tokens=6, ignore_eos=True)
    expected = llm.chat(user(image_part(SQUARE)), seeded)[0]
    response = client.chat.completions.create(model=MODEL, messages=user(image_part(SQUARE)), n=3, temperature=0.9,
                                              seed=1, max_tokens=6, extra_body={"ignore_eos": True})
    assert sorted(c.message.content for c in response.choices) == sorted(o.text for o in expected.outputs)

    full = llm.chat(user(image_part(OBLONG)), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    text = full.outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    response = client.chat.completions.create(model=MODEL, messages=user(image_part(OBLONG)), temperature=0,
                                              max_tokens=12, stop=[stop], extra_body={"ignore_eos": True})
    assert response.choices[0].message.content == text[:text.find(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_a_request_that_cannot_run_is_refused_by_the_server(client):
    with pytest.raises(openai.BadRequestError, match="exceeds max_model_len 1024"):
        client.chat.completions.create(model=MODEL, messages=user(image_part(SQUARE)), max_tokens=5000)
    response = client.chat.completions.create(model=MODEL, messages=user(image_part(SQUARE)), max_tokens=3,
                                              temperature=0, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 3


def test_disconnect_frees_the_slot_and_metrics_add_up(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 800, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server.v1}/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = 0
        while received < 3:
            received += next(lines).startswith("data: ")
        wait_for(lambda: metrics(server)["internvl:num_requests_running"] == 1, timeout=10)
    wait_for(lambda: metrics(server)["internvl:num_requests_running"] == 0, timeout=10)
    wait_for(lambda: metrics(server)["internvl:kv_cache_usage_perc"] == 0, timeout=10)
    samples = metrics(server)
    assert samples["internvl:engines"] == 2
    assert samples["internvl:num_slots"] == ENGINE["max_num_seqs"]  # the server's, split over the replicas
    assert by_engine(server, "internvl:num_slots") == [ENGINE["max_num_seqs"] // 2] * 2
    assert samples["internvl:engine_process_cpu_seconds_total"] > 0
    assert samples["internvl:request_success_total{finished_reason=abort}"] >= 1
    assert samples["internvl:time_to_first_token_seconds_count"] >= 24  # the replicas' observations reach here
    assert len(by_engine(server, "internvl:engine_step_seconds_total")) == 2


def test_tiles_reach_the_engines_through_shared_memory_and_are_deleted(server):
    if not os.path.isdir(SHARED_MEMORY):
        pytest.skip("no /dev/shm here")
    assert len(server.tile_directories) == 2  # the image workers' and the engine processes'
    for directory in server.tile_directories:
        assert os.listdir(directory) == [".owner"]


# ---- ends the module's server: keep last -------------------------------------------------------------------


def test_a_dead_engine_process_fails_the_server_loudly_and_sigterm_stops_the_rest(server, client):
    engines = child_pids(server.process.pid, "internvl_jax.engine_processes")
    assert len(engines) == 2
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 800, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server.v1}/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        os.kill(engines[0], signal.SIGKILL)
        rest = list(lines)  # the stream ends with an error event, not a hang
    assert any("error" in line for line in rest), rest[-3:]
    wait_for(lambda: httpx.get(f"{server.url}/health", timeout=10).status_code == 503, timeout=30)
    with pytest.raises(openai.InternalServerError, match=r"the engine stopped: .*exited with status -9") as refused:
        client.chat.completions.create(model=MODEL, messages=user(image_part(SQUARE)), max_tokens=3)
    assert refused.value.body["code"] == "engine_dead"
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0
    # the survivor finished its step and left with status 0, by `os._exit`: no teardown ran in it (while the
    # server's and its image workers' did)
    wait_for(lambda: "engine processes stopped" in server.log(), timeout=10)  # the log is read by a thread
    assert re.search(r"engine processes stopped in [\d.]+ s \(exit statuses (-9, 0|0, -9)\)", server.log())
    exits = {name.rpartition("-")[0] for name in os.listdir(server.exit_marks)}
    assert exits == {"__main__.py", "image_workers.py"}, exits
    deadline = time.monotonic() + 10
    while any(running(pid) for pid in engines) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in engines if running(pid)], "an engine process outlived the server"
    assert not [d for d in server.tile_directories if os.path.exists(d)], "tile directories left behind"


class _FakeProcess:
    """What `EngineProcesses` uses of an engine process, with the messages it is sent kept."""

    def __init__(self, index: int):
        from internvl_jax.engine import EngineStats

        self.index, self.in_flight, self.load, self.stats, self.cpu_seconds = index, 0, None, EngineStats(), 0.0
        self.sent: list[tuple] = []
        self.on_refused = None

    def send(self, message: tuple) -> None:
        self.sent.append(message)


def test_a_request_an_engine_process_refuses_fails_with_the_reason():
    """A request the server accepted but its engine process could not take (the hand-over of its tiles raised, or
    the replica rejected it) reaches its sink as `RequestRefused` naming why, frees its place in flight, and its
    HTTP client gets a 500 `engine_refused` (streaming: the same error as an event), not an empty answer."""
    from internvl_jax.engine import EngineConfig, RequestLimits
    from internvl_jax.engine_processes import EngineProcesses, RequestRefused
    from serve.app import to_api_error
    from serve.bridge import RequestStream

    processes = [_FakeProcess(0), _FakeProcess(1)]
    limits = RequestLimits(max_model_len=64, max_num_seqs=2, vocab_size=100, image_token_id=99, tokens_per_tile=4,
                           max_image_tiles=4)
    engines = EngineProcesses(processes, EngineConfig(max_model_len=64, max_num_seqs=2, max_waiting=2), limits,
                              None, None)
    got: list = []
    engines.add_request("r1", [1, 2, 3], SamplingParams(max_tokens=4), sink=got.append)
    engines.add_request("r2", [4, 5], SamplingParams(max_tokens=4), sink=got.append)
    assert [p.in_flight for p in processes] == [1, 1] and processes[1].sent[0][:2] == ("add", "r2")
    processes[1].on_refused("r2", "ValueError: a tile of the wrong shape")
    [error] = got
    assert isinstance(error, RequestRefused)
    assert str(error) == "request r2 could not run in engine process 1: ValueError: a tile of the wrong shape"
    assert [p.in_flight for p in processes] == [1, 0]
    processes[1].on_refused("r2", "again")  # forgotten already: nothing more reaches the sink
    assert len(got) == 1
    engines.abort("r2")
    assert processes[1].sent == [processes[1].sent[0]]  # no abort sent for a request no longer tracked

    api = to_api_error(error)
    assert api.status == 500 and api.body()["error"]["code"] == "engine_refused"
    assert "a tile of the wrong shape" in api.body()["error"]["message"]

    async def consume() -> None:
        stream = RequestStream("r2", asyncio.get_running_loop())
        stream.sink(error)
        await asyncio.sleep(0)
        with pytest.raises(RequestRefused, match="a tile of the wrong shape"):
            await stream.final()

    asyncio.run(consume())
