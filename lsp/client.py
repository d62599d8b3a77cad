"""A pygls client for `lacuna serve` in a subprocess: for the demo and the benchmark."""

from __future__ import annotations

import sys

from lsprotocol import types
from pygls.lsp.client import LanguageClient

from engine.api import VERSION


def server_command(model: str | None = None, device: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "lsp.cli", "serve"]
    if model:
        command += ["--model", model]
    if device:
        command += ["--device", device]
    return command


async def connect(command: list[str]) -> LanguageClient:
    client = LanguageClient("lacuna-client", VERSION)
    await client.start_io(*command)
    await client.initialize_async(types.InitializeParams(capabilities=types.ClientCapabilities()))
    client.initialized(types.InitializedParams())
    return client


async def disconnect(client: LanguageClient) -> None:
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()


async def inline_completion(client: LanguageClient, uri: str, line: int, character: int):
    return await client.text_document_inline_completion_async(types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line, character),
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked)))
