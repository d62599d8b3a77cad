"""An engine behind a FIM HTTP endpoint (`lacuna engine`, or a hosted API of the same shape):
the `InfillEngine` of engine/api.py over HTTP, as the in-process Engine is one in memory.

One kept-alive connection pool. Cancelling an infill closes its HTTP request, which makes
`lacuna engine` stop denoising for it. When the endpoint is down, infills fail at once (no
waiting on every keystroke) while a probe retries with backoff; `on_change(up, message)` hears
each transition, so the server can tell the editor once. What the model can take (its positions,
the tokens its layout reserves) and where it runs come from `lacuna engine`'s `/health`, read
before the first infill; a hosted API without one leaves them unknown. To `lacuna engine` an
infill sends every DecodeOptions field and its time budget, as engine.api maps them to JSON (the
service reads them back with the same mapping); a hosted API gets the fields of the FIM APIs only.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import httpx

from engine.api import (
    API_KEY_ENV,
    Capacity,
    Completion,
    DecodeOptions,
    EngineError,
    Limits,
    check_infill,
    time_budget_to_wire,
)

log = logging.getLogger(__name__)
FIRST_RETRY_S, MAX_RETRY_S = 0.5, 30.0


class EngineUnavailable(EngineError):
    """The endpoint cannot be reached now."""


class RemoteEngine:
    def __init__(self, url: str, *, model: str | None = None, on_change: Callable[[bool, str], None] | None = None):
        self.url = url.rstrip("/")
        self.model = model
        self.on_change = on_change
        self.up = True
        self.name = f"{model or 'engine'} at {self.url}"
        self.device: str | None = None  # as the endpoint's /health says
        # Until /health says otherwise: the service's default limit, and the context unknown (the
        # endpoint trims what is over).
        self.capacity = Capacity(Limits().max_tokens, None, 0)
        self._described = False
        self.lacuna = False  # whether /health says it is `lacuna engine`, which takes Lacuna's fields
        key = os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(60.0, connect=2.0))
        self._probe: asyncio.Task | None = None

    async def infill(self, prefix: str, suffix: str, n_tokens: int, *, n: int = 1,
                     options: DecodeOptions = DecodeOptions(), time_budget: float | None = None) -> list[Completion]:
        check_infill(n_tokens, options, time_budget)  # refused here as the engine refuses it in process
        if not self.up:
            raise EngineUnavailable(f"the engine at {self.url} is down")
        if not self._described:
            await self.describe()
        body = {"prompt": prefix, "suffix": suffix, "max_tokens": n_tokens, "n": n,
                "temperature": options.temperature, "top_p": options.top_p}
        if options.single_line:
            body["stop"] = ["\n"]
        if self.lacuna:  # every option and the time budget: fields other FIM APIs may refuse
            body |= options.to_wire() | time_budget_to_wire(time_budget)
        if self.model:
            body["model"] = self.model
        try:
            response = await self.client.post(f"{self.url}/v1/fim/completions", json=body)
        except httpx.TransportError as err:
            self._went_down(err)
            raise EngineUnavailable(f"the engine at {self.url} cannot be reached: {err}") from None
        if response.status_code != 200:
            raise EngineError(f"the engine at {self.url} answered {response.status_code}: {response.text[:200]}")
        answer = response.json()
        lacuna = answer.get("lacuna") or {}
        steps = lacuna.get("steps", 0)
        # `lacuna engine` says which choices the time budget cut short ("budget"; OpenAI's "length").
        reasons = lacuna.get("finish_reasons") or []
        choices = sorted(answer.get("choices", []), key=lambda c: c.get("index", 0))
        return [Completion(c.get("text", ""), [], [], steps,
                           reasons[i] if i < len(reasons) else c.get("finish_reason") or "stop",
                           score=c["score"] if isinstance(c.get("score"), (int, float)) else None)
                for i, c in enumerate(choices)]

    async def describe(self) -> None:
        """Read the model's capacity and device from `/health` (`lacuna engine` reports them)."""
        try:
            response = await self.client.get(f"{self.url}/health", timeout=2.0)
            health = response.json() if response.status_code == 200 else {}
        except (httpx.TransportError, ValueError):
            return  # down: the infill finds out; up again, this is asked again
        self._described = True
        if not isinstance(health, dict):
            return
        self.device = health.get("device")
        if isinstance(health.get("max_tokens"), int):
            self.lacuna = True
            speed = health.get("context_per_second")
            self.capacity = Capacity(health["max_tokens"], health.get("max_context"),
                                     health.get("reserved_tokens") or 0,
                                     speed if isinstance(speed, (int, float)) and speed > 0 else None)

    def _went_down(self, err: Exception) -> None:
        if not self.up:
            return
        self.up = False
        log.warning("the engine at %s is down: %s", self.url, err)
        if self.on_change:
            self.on_change(False, f"the engine at {self.url} is down ({err}); retrying")
        self._probe = asyncio.ensure_future(self._wait_until_up())

    async def _wait_until_up(self) -> None:
        delay = FIRST_RETRY_S
        while True:
            await asyncio.sleep(delay)
            try:
                response = await self.client.get(f"{self.url}/health", timeout=2.0)
                if response.status_code < 500:
                    break
            except httpx.TransportError:
                pass
            delay = min(delay * 2, MAX_RETRY_S)
        self.up = True
        log.info("the engine at %s is back", self.url)
        if self.on_change:
            self.on_change(True, f"the engine at {self.url} is back")

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self.client.aclose()
