"""`lacuna bench --engine-url URL`: the engine service measured from outside.

- `compare`: the same infills in-process and over HTTP, side by side, so the transport's cost
  shows as a ratio.
- `load`: simulated editors, each asking every `interval_ms` with its previous request
  cancelled (as typing does), for `seconds`; reports latency, errors, batch sizes and the
  engine's memory over time.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import httpx

from ..api import DecodeOptions
from ..engine import Engine


def sample_context(chars: int) -> tuple[str, str]:
    """A prefix and suffix of real code: the engine's own source, repeated to length."""
    source = "".join(p.read_text() for p in sorted(Path(__file__).parents[1].glob("*.py")))
    text = (source * (chars // len(source) + 1))[:chars]
    cut = text.rfind("\n", 0, chars * 3 // 4) + 1
    return text[:cut], text[cut:]


def _percentile(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _row(transport: str, context: int, middle: int, times: list[float]) -> dict:
    return {"transport": transport, "context_chars": context, "middle": middle,
            "p50_ms": round(statistics.median(times), 2), "p95_ms": round(_percentile(times, 0.95), 2)}


def compare(engine: Engine, url: str, *, contexts=(2000, 8000), middles=(16, 64), reps: int = 5,
            api_key: str | None = None, progress=None) -> list[dict]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rows = []
    with httpx.Client(headers=headers, timeout=120) as client:
        for context in contexts:
            prefix, suffix = sample_context(context)
            for middle in middles:
                body = {"prompt": prefix, "suffix": suffix, "max_tokens": middle}
                runs = {
                    "in-process": lambda: engine.complete(prefix, suffix, middle, options=DecodeOptions()),
                    "http": lambda: client.post(f"{url}/v1/fim/completions", json=body).raise_for_status(),
                }
                timed = {}
                for transport, fn in runs.items():
                    fn()  # warm-up
                    timed[transport] = []
                    for _ in range(reps):
                        start = time.perf_counter()
                        fn()
                        timed[transport].append((time.perf_counter() - start) * 1000)
                pair = [_row(t, context, middle, times) for t, times in timed.items()]
                pair[1]["http_over_in_process"] = round(pair[1]["p50_ms"] / pair[0]["p50_ms"], 3)
                for row in pair:
                    rows.append(row)
                    if progress:
                        progress(row)
    return rows


async def _editor(client: httpx.AsyncClient, url: str, index: int, stop_at: float, interval: float,
                  results: dict) -> None:
    prefix, suffix = sample_context(1500 + 100 * index)
    in_flight: asyncio.Task | None = None
    typed = 0
    while time.monotonic() < stop_at:
        if in_flight is not None and not in_flight.done():
            in_flight.cancel()  # the user typed on: the old suggestion is no longer wanted
            results["cancelled"] += 1
        typed += 1
        body = {"prompt": prefix + "x" * typed, "suffix": suffix, "max_tokens": 16}
        in_flight = asyncio.ensure_future(_timed_post(client, url, body, results))
        await asyncio.sleep(interval)
    if in_flight is not None:
        await asyncio.gather(in_flight, return_exceptions=True)


async def _timed_post(client: httpx.AsyncClient, url: str, body: dict, results: dict) -> None:
    start = time.perf_counter()
    try:
        response = await client.post(f"{url}/v1/fim/completions", json=body)
    except httpx.HTTPError as err:
        results["errors"].append(repr(err))
        return
    if response.status_code != 200:
        results["errors"].append(f"{response.status_code}: {response.text[:200]}")
        return
    results["latencies"].append((time.perf_counter() - start) * 1000)


def _batch_histogram(metrics_text: str) -> dict[str, float]:
    counts = {}
    for line in metrics_text.splitlines():
        if line.startswith("lacuna_batch_requests_bucket"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            counts[bound] = float(line.rsplit(" ", 1)[1])
    return counts


async def load(url: str, *, editors: int = 16, seconds: float = 60, interval_ms: float = 150,
               api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results = {"latencies": [], "errors": [], "cancelled": 0}
    limits = httpx.Limits(max_connections=editors * 4)
    async with httpx.AsyncClient(headers=headers, timeout=30, limits=limits) as client:
        before = _batch_histogram((await client.get(f"{url}/metrics")).text)
        rss = [(await client.get(f"{url}/health")).json().get("rss_mb")]
        stop_at = time.monotonic() + seconds
        tasks = [asyncio.ensure_future(_editor(client, url, i, stop_at, interval_ms / 1000, results))
                 for i in range(editors)]
        while not all(t.done() for t in tasks):
            await asyncio.sleep(min(5.0, seconds / 4))
            rss.append((await client.get(f"{url}/health")).json().get("rss_mb"))
        await asyncio.gather(*tasks)
        after = _batch_histogram((await client.get(f"{url}/metrics")).text)
    steps = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
    latencies = results["latencies"]
    return {
        "editors": editors, "seconds": seconds, "interval_ms": interval_ms,
        "answered": len(latencies), "cancelled": results["cancelled"], "errors": len(results["errors"]),
        "first_errors": results["errors"][:3],
        "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "p95_ms": round(_percentile(latencies, 0.95), 1) if latencies else None,
        "steps_by_batch_requests_at_most": steps,  # cumulative Prometheus buckets
        "engine_rss_mb": rss,
    }
