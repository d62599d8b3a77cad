"""`lacuna engine`: one resident Engine shared over HTTP with a fill-in-the-middle API.

`POST /v1/fim/completions` takes the request of Codestral's and Mercury's FIM APIs (`prompt` is
the text before the cursor, `suffix` the text after it) and answers OpenAI-style, with the
diffusion details in an extra `lacuna` object. Requests that arrive together share denoising
steps (the Engine batches them); a client that disconnects cancels its work. Also `GET /health`,
`GET /v1/models` and `GET /metrics` (Prometheus text).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..api import Completion, DecodeOptions, EngineError, Limits, check_infill, time_budget_from_wire
from ..engine import Engine

LOOPBACK = ("127.0.0.1", "::1", "localhost")


class FimRequest(BaseModel):
    """The request's own fields. How it decodes comes in the fields of DecodeOptions, by their names
    (DecodeOptions.from_wire: `temperature`, `top_p`, `seed` and `min_tokens` as other FIM APIs
    name them, and Lacuna's, e.g. `score_suffix`, `block_indent`, `policy`, `steps`), and its
    time budget in `time_budget_ms` (engine.api)."""

    model_config = ConfigDict(extra="ignore")  # clients send fields of other FIM APIs too

    prompt: str
    suffix: str = ""
    model: str | None = None
    max_tokens: int = Field(64, ge=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False


class RequestError(Exception):
    """A request the API refuses: the status and a message that names the field or limit."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.latency = Histogram("lacuna_request_seconds", "FIM request latency", registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch = Histogram("lacuna_batch_requests", "requests sharing a denoising step", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64))
        self.queue = Gauge("lacuna_queue_depth", "requests queued or being denoised", registry=self.registry)
        self.tokens = Counter("lacuna_tokens_generated", "tokens in answered infills", registry=self.registry)
        self.tokens_per_second = Gauge("lacuna_tokens_per_second", "the last request's infill tokens per second",
                                       registry=self.registry)
        self.cancelled = Counter("lacuna_cancellations", "requests whose client went away", registry=self.registry)
        self.requests = Counter("lacuna_requests", "FIM requests by HTTP status", ["status"], registry=self.registry)


def truncate_at_stop(completion: Completion, stop: list[str]) -> tuple[str, str]:
    """The text cut before the first stop string, and the OpenAI finish_reason."""
    text = completion.text
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if cuts:
        return text[:min(cuts)], "stop"
    # "budget" (the time ran out) is not an OpenAI reason: the infill is cut short, as at a length limit.
    return text, "stop" if completion.finish_reason == "stop" else "length"


def check_api_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or \
        request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise RequestError(401, "a valid API key is required (Authorization: Bearer KEY)")


async def read_fim_request(request: Request, limits: Limits) -> tuple[FimRequest, DecodeOptions, float | None]:
    """The request, how it decodes and its time budget in seconds (None: none); RequestError
    where any is refused."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise RequestError(413, f"the body is over the {limits.max_body_bytes}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise RequestError(413, f"the body is over the {limits.max_body_bytes}-byte limit")
    try:
        data = json.loads(bytes(body).decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RequestError(400, f"the body is not valid UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise RequestError(400, f"malformed JSON: {err}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the body must be a JSON object")
    try:
        fim = FimRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise RequestError(422, f"{field}: {first['msg']}", field) from None
    if fim.max_tokens > limits.max_tokens:
        raise RequestError(400, f"max_tokens is over the limit of {limits.max_tokens}", "max_tokens")
    if fim.n > limits.max_n:
        raise RequestError(400, f"n is over the limit of {limits.max_n}", "n")
    if len(fim.prompt) + len(fim.suffix) > limits.max_context_chars:
        raise RequestError(413, f"prompt and suffix are over the {limits.max_context_chars}-character limit", "prompt")
    fim.stop = [fim.stop] if isinstance(fim.stop, str) else fim.stop or []
    try:
        options = DecodeOptions.from_wire(data)
        if "\n" in fim.stop:  # a client that stops at a line break wants one line: no steps past it
            options = dataclasses.replace(options, single_line=True)
        budget = time_budget_from_wire(data)
        check_infill(fim.max_tokens, options, budget)  # as the engine checks it in process
    except ValueError as err:
        field = str(err).split()[0]
        raise RequestError(422, str(err), field if field in data else None) from None
    return fim, options, budget


async def until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)


def create_app(engine: Engine, *, model_name: str | None = None, api_key: str | None = None,
               limits: Limits = Limits()) -> FastAPI:
    limits = Limits(limits.max_body_bytes, min(limits.max_tokens, engine.max_tokens),
                    min(limits.max_n, engine.max_batch_rows), limits.max_context_chars)
    name = model_name or engine.loaded.name
    metrics = Metrics()
    engine.on_step = metrics.batch.observe
    metrics.queue.set_function(lambda: engine.pending)
    started = int(time.time())
    app = FastAPI(title="Lacuna engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError):
        metrics.requests.labels(str(err.status)).inc()
        return error_response(err.status, err.message, err.param)

    @app.get("/health")
    async def health(request: Request):
        check_api_key(request, api_key)
        capacity = engine.capacity
        return {"status": "ok", "model": name, "device": str(engine.device), "pending": engine.pending,
                "max_tokens": limits.max_tokens, "max_context": capacity.max_context,
                "reserved_tokens": capacity.reserved_tokens, "context_per_second": capacity.context_per_second,
                "pid": os.getpid(), "rss_mb": resident_mb()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_api_key(request, api_key)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started, "owned_by": "lacuna"}]}

    @app.get("/metrics")
    async def metrics_text(request: Request):
        check_api_key(request, api_key)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/fim/completions")
    async def fim_completions(request: Request):
        check_api_key(request, api_key)
        fim, options, budget = await read_fim_request(request, limits)
        stop = fim.stop
        start = time.perf_counter()
        work = asyncio.ensure_future(engine.infill(fim.prompt, fim.suffix, fim.max_tokens, n=fim.n, options=options,
                                                   time_budget=budget))
        watch = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not work.done():  # the client went away: stop denoising for it
            work.cancel()
            metrics.cancelled.inc()
            metrics.requests.labels("499").inc()
            return Response(status_code=499)
        try:
            completions = work.result()
        except ValueError as err:  # a request the engine refuses (e.g. masks the model's positions cannot hold)
            metrics.requests.labels("422").inc()
            return error_response(422, str(err))
        except EngineError as err:
            metrics.requests.labels("500").inc()
            return error_response(500, f"infill failed: {err}")
        seconds = time.perf_counter() - start
        produced = sum(len(c.token_ids) for c in completions)
        metrics.latency.observe(seconds)
        metrics.tokens.inc(produced)
        metrics.tokens_per_second.set(produced / max(seconds, 1e-9))
        metrics.requests.labels("200").inc()
        answer = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                  "model": name, "choices": [], "usage": usage(completions[0].context_tokens, produced)}
        reasons = []  # the engine's, by choice: "budget" where the time ran out (OpenAI's say "length")
        for index, completion in enumerate(completions):
            text, reason = truncate_at_stop(completion, stop)
            reasons.append("stop" if text != completion.text else completion.finish_reason)
            choice = {"index": index, "text": text, "finish_reason": reason, "logprobs": None}
            if options.score_suffix:
                choice["score"] = completion.score  # None where not scored (a bidirectional model)
            answer["choices"].append(choice)
        steps = max(c.steps for c in completions)
        confidences = [x for c in completions for x in c.confidences]
        answer["lacuna"] = {"steps": steps, "tokens_per_step": round(produced / len(completions) / max(steps, 1), 3),
                            "mean_confidence": round(sum(confidences) / len(confidences), 4) if confidences else None,
                            "latency_ms": round(seconds * 1000, 2), "pid": os.getpid(), "finish_reasons": reasons}
        if not fim.stream:
            return answer
        return StreamingResponse(sse_events(answer), media_type="text/event-stream")

    return app


def resident_mb() -> float | None:
    try:
        pages = int(open("/proc/self/statm").read().split()[1])
    except (OSError, IndexError, ValueError):  # not Linux
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def usage(prompt_tokens: int, produced: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": produced, "total_tokens": prompt_tokens + produced}


async def sse_events(answer: dict):
    """The answer as OpenAI-style stream chunks: a diffusion infill is final only once whole, so
    each choice comes as one chunk, then the usage, then `[DONE]`."""
    head = {k: answer[k] for k in ("id", "created", "model")} | {"object": "text_completion"}
    for choice in answer["choices"]:
        yield f"data: {json.dumps(head | {'choices': [choice]})}\n\n"
    yield f"data: {json.dumps(head | {'choices': [], 'usage': answer['usage'], 'lacuna': answer['lacuna']})}\n\n"
    yield "data: [DONE]\n\n"


def require_key_off_loopback(host: str, api_key: str | None) -> None:
    if host not in LOOPBACK and not api_key:
        raise SystemExit(f"binding to {host} serves beyond this machine: give --api-key or set LACUNA_API_KEY")


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8765, api_key: str | None = None,
          limits: Limits = Limits()) -> None:
    import uvicorn

    require_key_off_loopback(host, api_key)
    app = create_app(engine, api_key=api_key, limits=limits)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_keep_alive=30)
