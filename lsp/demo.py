"""`lacuna demo` and `lacuna complete`: one suggestion at one position of a file, through the
language server as an editor would ask for it, or straight from the engine."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from lsprotocol import types

from engine.api import DecodeOptions

from .client import connect, disconnect, inline_completion, server_command
from .document import Document

LANGUAGES = {".py": "python", ".js": "javascript", ".ts": "typescript", ".go": "go", ".rs": "rust",
             ".java": "java", ".c": "c", ".cpp": "cpp"}


def demo(file: str, line: int, character: int, *, model: str | None, device: str | None, as_json: bool) -> int:
    """Start `lacuna serve`, open `file`, ask for an inline completion at (line, character), print it."""
    path = Path(file).resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        print(f"lacuna demo: {err}", file=sys.stderr)
        return 2

    async def ask():
        client = await connect(server_command(model, device))
        try:
            client.text_document_did_open(types.DidOpenTextDocumentParams(types.TextDocumentItem(
                uri=path.as_uri(), language_id=LANGUAGES.get(path.suffix, "plaintext"), version=1, text=text)))
            answer = await inline_completion(client, path.as_uri(), line, character)
            status = await client.workspace_execute_command_async(types.ExecuteCommandParams(command="lacuna.status"))
        finally:
            await disconnect(client)
        print(f"lacuna demo: model {status['model']} on {status['device']}, "
              f"{status['lastLatencyMs'] or 0:.0f} ms in the engine", file=sys.stderr)
        return [item.insert_text for item in answer.items]

    items = asyncio.run(ask())
    print(json.dumps(items) if as_json else ("\n---\n".join(items) or "(no suggestion here)"))
    return 0


def complete(file: str, line: int, character: int, *, tokens: int, options: dict, model: str | None,
             device: str | None, as_json: bool, int8: bool = False) -> int:
    """Fill `tokens` masks at (line, character; UTF-16) with the in-process engine and print the infill."""
    try:
        text = Path(file).read_text(encoding="utf-8")
        doc = Document(Path(file).resolve().as_uri(), text, None)
        if not 0 <= line < len(doc.line_starts) or character < 0:
            raise ValueError(f"position {line}:{character} is outside the file ({len(doc.line_starts)} lines)")
        offset = doc.offset(line, character)
        decode = DecodeOptions(**options)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        print(f"lacuna complete: {err}", file=sys.stderr)
        return 2
    from engine.engine import Engine

    engine = Engine.load(model, device=device, int8=int8, max_tokens=max(tokens, 1))
    start = time.perf_counter()
    try:
        completion = engine.complete(text[:offset], text[offset:], tokens, options=decode)[0]
    except ValueError as err:
        print(f"lacuna complete: {err}", file=sys.stderr)
        return 2
    latency_ms = (time.perf_counter() - start) * 1000
    if as_json:
        print(json.dumps({
            "text": completion.text, "steps": completion.steps, "latency_ms": round(latency_ms, 2),
            "finish_reason": completion.finish_reason, "token_ids": completion.token_ids,
            "confidences": [round(c, 4) for c in completion.confidences], "model": engine.loaded.name,
        }))
    else:
        print(completion.text)
    return 0
