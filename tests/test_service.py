"""The engine service (`lacuna engine`) over real HTTP, and `lacuna serve` using it."""

import asyncio
import dataclasses
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from lsprotocol import types
from models import CAUSAL
from test_server import command, inline, open_doc, start, stop

from engine.api import DecodeOptions, EngineError, Limits, leaves_block, time_budget_from_wire, time_budget_to_wire
from engine.bench.service import load
from engine.engine import Engine
from engine.loader import load_checkpoint, random_model
from engine.serving.service import create_app, require_key_off_loopback
from lsp.remote import RemoteEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """create_app on uvicorn in a thread: a real HTTP server in this process."""

    def __init__(self, engine: Engine, **kwargs):
        self.engine = engine
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(engine, **kwargs), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def constant_service(constant_checkpoint):
    engine = Engine(load_checkpoint(constant_checkpoint, "cpu", torch.float32), max_tokens=64)
    service = Service(engine, limits=Limits(max_body_bytes=1 << 20))
    yield service
    service.stop()
    engine.close()


@pytest.fixture(scope="module")
def slow_service():
    """Random weights: low confidence, so the threshold policy decodes one token per step."""
    engine = Engine(random_model("tiny", seed=3))
    service = Service(engine)
    yield service
    service.stop()
    engine.close()


def fim(url, body, **kwargs):
    return httpx.post(f"{url}/v1/fim/completions", json=body, timeout=60, **kwargs)


def test_fim_answers_openai_style(constant_service):
    response = fim(constant_service.url, {"model": "any", "prompt": "def f():\n    return ", "suffix": "\n",
                                          "max_tokens": 4, "n": 2})
    assert response.status_code == 200
    answer = response.json()
    assert answer["object"] == "text_completion" and answer["id"].startswith("cmpl-")
    assert isinstance(answer["created"], int) and answer["model"] == constant_service.engine.loaded.name
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    assert all(c["text"] == "xxxx" and c["finish_reason"] == "length" for c in answer["choices"])
    usage = answer["usage"]
    assert usage["completion_tokens"] == 8 and usage["total_tokens"] == usage["prompt_tokens"] + 8
    engine = constant_service.engine
    assert usage["prompt_tokens"] >= len(engine.encode("def f():\n    return ")) + len(engine.encode("\n"))
    assert answer["lacuna"]["steps"] >= 1 and 0 < answer["lacuna"]["mean_confidence"] <= 1


def test_stop_sequences_cut_the_text(constant_service):
    answer = fim(constant_service.url, {"prompt": "a = ", "max_tokens": 6, "stop": ["xxx", "q"]}).json()
    assert answer["choices"][0] == {"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}
    answer = fim(constant_service.url, {"prompt": "a = ", "max_tokens": 6, "stop": "q"}).json()
    assert answer["choices"][0]["text"] == "xxxxxx"


def test_stream_sends_events_ending_with_done(constant_service):
    with httpx.stream("POST", f"{constant_service.url}/v1/fim/completions", timeout=60,
                      json={"prompt": "a = ", "max_tokens": 3, "n": 2, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert sorted((c["choices"][0]["index"], c["choices"][0]["text"]) for c in chunks if c["choices"]) == \
        [(0, "xxx"), (1, "xxx")]
    assert chunks[-1]["usage"]["completion_tokens"] == 6 and "lacuna" in chunks[-1]


def test_health_models_and_metrics(constant_service):
    url = constant_service.url
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu" and health["max_tokens"] == 64
    assert health["context_per_second"] > 0  # measured at start-up: editors fit their context to it
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == health["model"]
    fim(url, {"prompt": "a = ", "max_tokens": 2})
    text = httpx.get(f"{url}/metrics").text
    for name in ("lacuna_request_seconds_bucket", "lacuna_queue_depth", "lacuna_batch_requests_bucket",
                 "lacuna_tokens_generated_total", "lacuna_tokens_per_second", "lacuna_cancellations_total"):
        assert name in text


@pytest.mark.parametrize("body, status, says", [
    (b"{not json", 400, "malformed JSON"),
    (b'{"prompt": "a\xff\xfe"}', 400, "UTF-8"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"suffix": "x"}', 422, "prompt"),
    (b'{"prompt": 5}', 422, "prompt"),
    (b'{"prompt": "a", "max_tokens": "many"}', 422, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": -3}', 422, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": 100000}', 400, "max_tokens is over the limit of 64"),
    (b'{"prompt": "a", "n": 1000}', 400, "n is over the limit of 8"),
    (b'{"prompt": "a", "temperature": -1}', 422, "temperature"),
    (b'{"prompt": "a", "top_p": 0}', 422, "top_p"),
    (b'{"prompt": "a", "threshold": 0}', 422, "threshold must be within (0, 1]"),
    (b'{"prompt": "a", "threshold": 1.5}', 422, "threshold must be within (0, 1]"),
    (b'{"prompt": "a", "max_tokens": 4, "policy": "steps", "steps": 5}', 422,
     "steps (5) must not be more than the 4 masked tokens"),
    (b'{"prompt": "a", "steps": "many"}', 422, "steps must be int or None"),
    (b'{"prompt": "a", "single_line": 1}', 422, "single_line must be bool"),
    (b'{"prompt": "a", "temperature": NaN}', 422, "temperature must be finite"),
    (b'{"prompt": "a", "time_budget_ms": 0}', 422, "time_budget_ms must be a number within (0, 60000]"),
    (b'{"prompt": "a", "time_budget_ms": -5}', 422, "time_budget_ms"),
    (b'{"prompt": "a", "time_budget_ms": 60001}', 422, "time_budget_ms"),
    (b'{"prompt": "a", "time_budget_ms": "soon"}', 422, "time_budget_ms"),
])
def test_bad_requests_get_a_clear_4xx(constant_service, body, status, says):
    response = httpx.post(f"{constant_service.url}/v1/fim/completions", content=body,
                          headers={"content-type": "application/json"})
    assert response.status_code == status
    assert says in response.json()["error"]["message"]
    assert fim(constant_service.url, {"prompt": "a = ", "max_tokens": 2}).status_code == 200


def test_a_50_mb_body_is_refused_and_the_engine_serves_on(constant_service):
    big = b'{"prompt": "' + b"a" * (50 << 20) + b'"}'
    response = httpx.post(f"{constant_service.url}/v1/fim/completions", content=big, timeout=60)
    assert response.status_code == 413 and "byte limit" in response.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(50):
            yield b"a" * (1 << 20)
    response = httpx.post(f"{constant_service.url}/v1/fim/completions", content=chunks(), timeout=60)
    assert response.status_code == 413
    assert fim(constant_service.url, {"prompt": "a = ", "max_tokens": 2}).status_code == 200


def test_lone_surrogates_in_json_are_served(constant_service):
    response = httpx.post(f"{constant_service.url}/v1/fim/completions",
                          content=b'{"prompt": "a = \\ud800", "max_tokens": 2}')
    assert response.status_code == 200


def test_api_key_is_checked(constant_service):
    service = Service(constant_service.engine, api_key="s3cret")
    try:
        assert fim(service.url, {"prompt": "a"}).status_code == 401
        assert fim(service.url, {"prompt": "a"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{service.url}/metrics").status_code == 401
        ok = fim(service.url, {"prompt": "a", "max_tokens": 2}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
    finally:
        service.stop()


def test_binding_beyond_loopback_needs_a_key():
    with pytest.raises(SystemExit, match="api-key"):
        require_key_off_loopback("0.0.0.0", None)
    require_key_off_loopback("0.0.0.0", "key")
    require_key_off_loopback("127.0.0.1", None)


async def test_requests_arriving_together_share_steps(slow_service):
    engine = slow_service.engine
    engine.stats["max_batch_requests"] = 0
    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(*[
            client.post(f"{slow_service.url}/v1/fim/completions", json={"prompt": f"def f{i}(", "max_tokens": 32})
            for i in range(4)])
    assert all(a.status_code == 200 for a in answers)
    assert engine.stats["max_batch_requests"] >= 2


async def test_a_client_that_disconnects_cancels_its_work(slow_service):
    engine = slow_service.engine
    before = httpx.get(f"{slow_service.url}/metrics").text
    async with httpx.AsyncClient(timeout=60) as client:
        task = asyncio.ensure_future(client.post(f"{slow_service.url}/v1/fim/completions",
                                                 json={"prompt": "def f(", "max_tokens": 256}))
        while engine.pending == 0:
            await asyncio.sleep(0.01)
        task.cancel()
    steps = engine.stats["steps"]
    deadline = time.monotonic() + 5
    while engine.pending and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert engine.pending == 0
    assert engine.stats["steps"] - steps < 100  # stopped long before its 256 one-token steps
    assert "lacuna_cancellations_total 1.0" in httpx.get(f"{slow_service.url}/metrics").text
    assert "lacuna_cancellations_total 0.0" in before


async def test_remote_engine_cancel_closes_the_request(slow_service):
    remote = RemoteEngine(slow_service.url)
    try:
        task = asyncio.ensure_future(remote.infill("def f(", "", 256))
        while slow_service.engine.pending == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 5
        while slow_service.engine.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert slow_service.engine.pending == 0
    finally:
        await remote.close()


async def test_remote_engine_sends_the_api_key_from_the_environment(constant_service, monkeypatch):
    service = Service(constant_service.engine, api_key="s3cret")
    try:
        refused = RemoteEngine(service.url)
        with pytest.raises(EngineError, match="401"):
            await refused.infill("a = ", "", 2)
        await refused.close()
        monkeypatch.setenv("LACUNA_API_KEY", "s3cret")
        remote = RemoteEngine(service.url, model="hosted-model-name")
        assert [c.text for c in await remote.infill("a = ", "", 2, n=2)] == ["xx", "xx"]
        assert remote.capacity.context_per_second == constant_service.engine.context_per_second
        await remote.close()
    finally:
        service.stop()


async def test_remote_engine_gets_the_candidates_and_scores_the_engine_gives():
    """Over HTTP a causal model's candidates come as in process: min_tokens holds (no empty infill)
    and each carries the score that ranks it by the suffix."""
    engine = Engine(random_model(CAUSAL, seed=5), warmup=False)
    service, remote = Service(engine), None
    options = DecodeOptions(temperature=1.0, seed=4, min_tokens=3, score_suffix=4)
    try:
        remote = RemoteEngine(service.url)
        ask = dict(prefix="def mean(values):\n    return ", suffix="\n\nprint(mean([1]))\n", n_tokens=6, n=3,
                   options=options)
        over_http, in_process = await remote.infill(**ask), await engine.infill(**ask)
        assert [(c.text, c.score) for c in over_http] == [(c.text, pytest.approx(c.score)) for c in in_process]
        assert all(c.score is not None and len(c.token_ids) >= 3 for c in in_process)
        response = fim(service.url, {"prompt": "a = ", "max_tokens": 2, "score_suffix": -1})
        assert response.status_code == 422 and "score_suffix" in response.json()["error"]["message"]
    finally:
        if remote is not None:
            await remote.close()
        service.stop()
        engine.close()


async def test_a_block_ends_over_http_where_it_does_in_process():
    """`block_indent` reaches a `lacuna engine`: the bundled model's block infill ends at the line
    that leaves the block, over HTTP as in process."""
    engine = Engine.load(device="cpu", warmup=False)
    service, remote = Service(engine), None
    ask = dict(prefix="def total(prices):\n    result = 0\n    for price in prices:\n        ", suffix="",
               n_tokens=64, options=DecodeOptions(block_indent=5))
    try:
        remote = RemoteEngine(service.url)
        [over_http], [in_process] = await remote.infill(**ask), await engine.infill(**ask)
        assert over_http.text == in_process.text and leaves_block(in_process.text, 5)
        response = fim(service.url, {"prompt": "a = ", "max_tokens": 2, "block_indent": -1})
        assert response.status_code == 422 and "block_indent" in response.json()["error"]["message"]
    finally:
        if remote is not None:
            await remote.close()
        service.stop()
        engine.close()


async def test_load_of_simulated_editors(constant_service):
    """A short run of the `lacuna bench --editors` load: every editor types on and cancels."""
    result = await load(constant_service.url, editors=4, seconds=2, interval_ms=150)
    assert result["errors"] == 0, result["first_errors"]
    assert result["answered"] > 0 and result["cancelled"] >= 0
    assert len(result["engine_rss_mb"]) >= 2


def engine_process(checkpoint, port):
    return subprocess.Popen([sys.executable, "-m", "lsp.cli", "engine", "--port", str(port), "--model",
                             str(checkpoint), "--max-tokens", "64"], stderr=subprocess.DEVNULL)


def wait_healthy(url, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"no engine at {url}")


@pytest.mark.slow  # an engine killed and restarted, and a server waiting it out
async def test_language_server_survives_the_engine_being_killed(constant_checkpoint):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine = engine_process(constant_checkpoint, port)
    client = None
    try:
        wait_healthy(url)
        client, _, messages = await start(command("--engine-url", url))

        async def suggest(n):  # a new document each time: no cached answer
            uri = f"file:///work/example{n}.py"
            open_doc(client, uri, f"def f{n}():\n    return \n")
            return (await asyncio.wait_for(inline(client, uri, 1, 11), 30)).items

        assert (await suggest(0))[0].insert_text.startswith("x")
        engine.send_signal(signal.SIGKILL)
        engine.wait()
        for n in (1, 2, 3):  # down: empty answers at once, and one message
            started = time.monotonic()
            assert not await suggest(n) and time.monotonic() - started < 5
        status = await client.workspace_execute_command_async(types.ExecuteCommandParams(command="lacuna.status"))
        assert status["engine"] == "down" and not status["ready"]
        assert sum("down" in m for m in messages) == 1

        engine = engine_process(constant_checkpoint, port)
        wait_healthy(url)
        for n in range(4, 40):  # the probe retries with backoff: back within seconds
            items = await suggest(n)
            if items:
                break
            await asyncio.sleep(0.5)
        assert items[0].insert_text.startswith("x")
        assert any("back" in m for m in messages)
    finally:
        if client is not None:
            await stop(client)
        engine.kill()
        engine.wait()


# Every DecodeOptions field, none at its default: a field added to DecodeOptions fails the test until
# it is given here.
EVERY_OPTION = dict(policy="steps", steps=3, threshold=0.5, tokens_per_step=2, ordering="margin", temperature=0.5,
                    top_p=0.9, seed=7, use_cache=False, refresh_every=2, min_tokens=1, single_line=True, lookup=3,
                    score_suffix=2, block_indent=4)


def test_every_decode_option_goes_over_the_wire_and_back():
    assert set(EVERY_OPTION) == {f.name for f in dataclasses.fields(DecodeOptions)}
    options = DecodeOptions(**EVERY_OPTION)
    assert all(getattr(options, f.name) != f.default for f in dataclasses.fields(DecodeOptions))
    wire = json.loads(json.dumps(options.to_wire()))  # as JSON carries it
    assert DecodeOptions.from_wire(wire) == options
    assert DecodeOptions.from_wire({"prompt": "a", "max_tokens": 4}) == DecodeOptions()  # the request's own keys
    assert DecodeOptions.from_wire({"threshold": 1, "ordering": None}).threshold == 1.0
    assert time_budget_from_wire(json.loads(json.dumps(time_budget_to_wire(0.25)))) == 0.25
    assert time_budget_to_wire(None) == {} and time_budget_from_wire({}) is None


async def test_a_remote_engine_sends_every_option_and_the_time_budget(constant_service, monkeypatch):
    """What RemoteEngine.infill is given is what the engine behind `lacuna engine` is given."""
    engine, given = constant_service.engine, []
    infill = engine.infill

    async def spy(*args, **kwargs):
        given.append(kwargs)
        return await infill(*args, **kwargs)

    monkeypatch.setattr(engine, "infill", spy)
    remote = RemoteEngine(constant_service.url)
    try:
        options = DecodeOptions(**EVERY_OPTION)
        await remote.infill("a = ", "", 4, n=2, options=options, time_budget=2.5)
        await remote.infill("a = ", "", 4)
    finally:
        await remote.close()
    assert given[0] == dict(n=2, options=options, time_budget=2.5)
    assert given[1] == dict(n=1, options=DecodeOptions(), time_budget=None)


async def test_a_remote_engine_stops_decoding_at_its_time_budget(slow_service):
    """Over HTTP as in process, the engine answers with what it has decoded once the budget is
    spent: fewer steps than the one-token-a-step infill needs, and the choice says "budget"."""
    remote = RemoteEngine(slow_service.url)
    options = DecodeOptions(use_cache=False)  # a full forward a step: 256 steps take seconds
    try:
        started = time.monotonic()
        [cut] = await remote.infill("def f(" * 50, "", 256, options=options, time_budget=0.2)
        elapsed = time.monotonic() - started
        [whole] = await remote.infill("def f(" * 50, "", 8, options=options)
    finally:
        await remote.close()
    assert cut.finish_reason == "budget" and 0 < cut.steps < 256
    assert elapsed < 0.2 + 1.5  # the budget, and one step and the round trip past it
    assert whole.finish_reason in ("stop", "length") and whole.steps >= 1


@pytest.mark.parametrize("ask, says", [
    (dict(n_tokens=4, options=DecodeOptions(policy="steps", steps=5)), "steps"),
    (dict(n_tokens=4, time_budget=0), "time_budget"),
    (dict(n_tokens=4, time_budget=61), "time_budget"),
])
async def test_a_remote_engine_refuses_bad_input_as_the_engine_does(constant_service, ask, says):
    remote = RemoteEngine(constant_service.url)
    try:
        with pytest.raises(ValueError, match=says):
            await remote.infill("a = ", "", **ask)
        with pytest.raises(ValueError, match=says):
            await constant_service.engine.infill("a = ", "", **ask)
    finally:
        await remote.close()
