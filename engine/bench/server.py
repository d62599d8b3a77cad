"""`lacuna bench --lsp`: the language server measured over the protocol, as an editor uses it.

A 5,000-line Python file is opened in `lacuna serve` (a subprocess, stdio); at positions through
the file the bench types a character and asks for an inline completion, then types the first
character of what was suggested and asks again (typing through). The server reports each
request's own time and its engine's (`lacuna.status`), so the time spent outside the engine
(context, span decision, post-processing, caches) is measured without the transport.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

from lsprotocol import types

from lsp.client import connect, disconnect, inline_completion, server_command

URI = "file:///bench/big.py"
FUNCTION = '''def handler_{i}(request, limit=10):
    """Handle request {i}."""
    items = [item for item in request.items if item.size < limit]
    if not items:
        return None
    total = sum(item.size for item in items)
    return total / len(items)


'''


def big_python_file(lines: int = 5000) -> str:
    chunk = FUNCTION.count("\n")
    return "import os\nimport sys\n\n\n" + "".join(FUNCTION.format(i=i) for i in range(lines // chunk))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 3)


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


async def _bench(server: list[str], requests: int) -> dict:
    client = await connect(server)
    text = big_python_file()
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        types.TextDocumentItem(uri=URI, language_id="python", version=1, text=text)))
    lines = text.split("\n")
    # Ends of statement lines in function bodies: where people type.
    spots = [i for i, line in enumerate(lines) if line.startswith("    ") and line.strip()]
    rng = random.Random(0)
    version, outside, end_to_end, typing_through, typing_through_wire = 1, [], [], [], []

    async def ask(line: int, character: int):
        start = time.perf_counter()
        answer = await inline_completion(client, URI, line, character)
        elapsed = (time.perf_counter() - start) * 1000
        status = await client.workspace_execute_command_async(types.ExecuteCommandParams(command="lacuna.status"))
        return answer, elapsed, status["lastRequest"]

    def type_text(line: int, character: int, new: str):
        nonlocal version
        version += 1
        client.text_document_did_change(types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=URI, version=version),
            content_changes=[types.TextDocumentContentChangePartial(
                range=types.Range(types.Position(line, character), types.Position(line, character)), text=new)]))

    await ask(spots[0], len(lines[spots[0]]))  # warm-up: the model's first run
    for line in rng.sample(spots, min(requests, len(spots))):
        column = len(lines[line])
        type_text(line, column, " ")
        lines[line] += " "
        await asyncio.sleep(0.2)  # Neovim asks 200 ms after a change: the edit is parsed meanwhile
        answer, elapsed, timing = await ask(line, column + 1)
        end_to_end.append(elapsed)
        outside.append(timing["totalMs"] - timing["engineMs"])
        if answer.items:
            typed = answer.items[0].insert_text[0]
            type_text(line, column + 1, typed)
            lines[line] += typed
            _, elapsed, timing = await ask(line, column + 2)
            if timing.get("typedThrough"):
                typing_through.append(timing["totalMs"])
                typing_through_wire.append(elapsed)
    pid = client._server.pid if client._server else None  # pygls has no public handle on the server process
    status = await client.workspace_execute_command_async(types.ExecuteCommandParams(command="lacuna.status"))
    result = {
        "file_lines": len(lines), "requests": len(end_to_end), "model": status["model"],
        "outside_engine_p50_ms": _percentile(outside, 0.5), "outside_engine_p95_ms": _percentile(outside, 0.95),
        "typing_through_p50_ms": _percentile(typing_through, 0.5), "typing_through_count": len(typing_through),
        "typing_through_round_trip_p50_ms": _percentile(typing_through_wire, 0.5),
        "end_to_end_p50_ms": _percentile(end_to_end, 0.5), "end_to_end_p95_ms": _percentile(end_to_end, 0.95),
        "server_rss_mb": _rss_mb(pid) if pid else None,
    }
    await disconnect(client)
    return result


def run(model: str | None = None, device: str | None = None, requests: int = 40) -> dict:
    return asyncio.run(_bench(server_command(model, device), requests))
