"""The language server end to end: `lacuna serve` in a subprocess, driven by pygls's client."""

import asyncio
import json
import sys

import pytest
import pytest_asyncio
from lsprotocol import types
from pygls.lsp.client import LanguageClient

PY_URI = "file:///work/example.py"
TEXT_URI = "file:///work/notes.txt"

# One event loop for the module, so that the tests which need no options of their own can share
# one server: each start costs seconds (torch, the model). They open documents of their own.
pytestmark = pytest.mark.asyncio(loop_scope="module")


def command(*extra):
    return [sys.executable, "-m", "lsp.cli", "serve", *extra]


@pytest.fixture(scope="module")
def server_command(constant_checkpoint):
    return command("--model", str(constant_checkpoint))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(server_command):
    """A server with the default options, and its initialize result."""
    client, result, _ = await start(server_command)
    yield client, result
    await stop(client)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def utf8(server_command):
    """A server whose client offered UTF-8 positions."""
    client, result, _ = await start(server_command, encodings=[types.PositionEncodingKind.Utf16,
                                                               types.PositionEncodingKind.Utf8])
    yield client, result
    await stop(client)


async def start(server, options=None, encodings=None):
    """A client connected to a new server, initialized; and the messages the server shows."""
    client = LanguageClient("test", "0")
    messages = []
    client.feature(types.WINDOW_SHOW_MESSAGE)(lambda params: messages.append(params.message))
    await client.start_io(*server)
    capabilities = types.ClientCapabilities(
        general=types.GeneralClientCapabilities(position_encodings=encodings) if encodings else None)
    result = await client.initialize_async(types.InitializeParams(
        capabilities=capabilities, initialization_options=options or {}))
    client.initialized(types.InitializedParams())
    return client, result, messages


async def stop(client):
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()


def open_doc(client, uri, text, language="python", version=1):
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        types.TextDocumentItem(uri=uri, language_id=language, version=version, text=text)))


def change(client, uri, version, start, end, text):
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        [types.TextDocumentContentChangePartial(
            range=types.Range(types.Position(*start), types.Position(*end)), text=text)]))


async def inline(client, uri, line, character):
    return await client.text_document_inline_completion_async(types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri), position=types.Position(line, character),
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic)))


async def test_capabilities_and_inline_completion(shared):
    client, result = shared
    caps = result.capabilities
    assert caps.inline_completion_provider is not None
    assert caps.completion_provider is not None
    assert {"lacuna.accepted", "lacuna.status"} <= set(caps.execute_command_provider.commands)
    assert caps.position_encoding == types.PositionEncodingKind.Utf16
    uri = "file:///work/area.py"
    open_doc(client, uri, "def area(width, height):\n    result = \n    return result\n")
    answer = await inline(client, uri, 1, 13)
    assert answer.items, "the constant model always suggests something"
    item = answer.items[0]
    assert item.insert_text.strip("x") == "" and item.insert_text
    assert item.range.start == types.Position(1, 13)
    assert item.command.command == "lacuna.accepted"
    before = (await status(client))["accepted"]
    count = await client.workspace_execute_command_async(types.ExecuteCommandParams(
        item.command.command, item.command.arguments))
    assert count == before + 1
    after = await status(client)
    assert after["accepted"] == count and after["ready"]


async def test_classic_completion_items(shared):
    client, _ = shared
    uri = "file:///work/classic.py"
    open_doc(client, uri, "value = compute(ab)\n")
    result = await client.text_document_completion_async(types.CompletionParams(
        types.TextDocumentIdentifier(uri), types.Position(0, 18)))
    assert result.items
    item = result.items[0]
    # The edit starts at the word before the cursor so that clients can filter on it.
    assert item.text_edit.range.start == types.Position(0, 16)
    assert item.text_edit.new_text.startswith("ab")
    assert item.command.command == "lacuna.accepted"
    assert item.text_edit.new_text in item.documentation.value


async def test_typing_through_and_incremental_edits(shared):
    client, _ = shared
    uri = "file:///work/typing.txt"
    open_doc(client, uri, "Notes: ", language="plaintext")
    first = (await inline(client, uri, 0, 7)).items[0].insert_text
    change(client, uri, 2, (0, 7), (0, 7), "x")
    rest = (await inline(client, uri, 0, 8)).items[0].insert_text
    assert rest == first[1:]


async def test_no_completion_inside_a_word_or_comment(shared):
    client, _ = shared
    uri = "file:///work/words.py"
    open_doc(client, uri, "total = amount\n# a comment \n")
    assert (await inline(client, uri, 0, 10)).items == ()  # amo|unt
    assert (await inline(client, uri, 1, 12)).items == ()


async def test_utf8_when_the_client_offers_it_and_emoji_positions(utf8):
    client, result = utf8
    assert result.capabilities.position_encoding == types.PositionEncodingKind.Utf8
    uri = "file:///work/smile.txt"
    open_doc(client, uri, "😀 smile: ", language="plaintext")
    answer = await inline(client, uri, 0, 11)  # 4 bytes of emoji + 7
    assert answer.items and answer.items[0].range.start == types.Position(0, 11)


async def word_start(client, uri, end):
    """Where a completion edit at the end of `s = '😀' + ab` starts: the emoji is 2 UTF-16 units
    and 4 UTF-8 bytes."""
    open_doc(client, uri, "s = '😀' + ab")
    result = await client.text_document_completion_async(types.CompletionParams(
        text_document=types.TextDocumentIdentifier(uri), position=types.Position(0, end)))
    return result.items[0].text_edit.range.start


async def test_positions_count_utf16_code_units_by_default(shared):
    assert await word_start(shared[0], "file:///work/units16.py", 13) == types.Position(0, 11)


async def test_positions_count_utf8_bytes_once_negotiated(utf8):
    assert await word_start(utf8[0], "file:///work/units8.py", 15) == types.Position(0, 13)


async def test_bad_configuration_is_reported_and_defaulted(server_command):
    client, _, messages = await start(server_command, options={"maxTokens": "many", "candidates": 2})
    try:
        for _ in range(50):
            if messages:
                break
            await asyncio.sleep(0.05)
        assert any("maxTokens" in m for m in messages)
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"lacuna": {"multiline": "yes"}}))
        open_doc(client, PY_URI, "x = ")
        assert (await inline(client, PY_URI, 0, 4)).items  # still serving
        assert any("multiline" in m for m in messages)
    finally:
        await stop(client)


async def test_bad_requests_get_answers(shared):
    client, _ = shared
    uri = "file:///work/closed.py"
    assert (await inline(client, "file:///unknown.py", 0, 0)).items == ()
    open_doc(client, uri, "a = 1\r\nb = ")
    assert (await inline(client, uri, 99, 99)).items is not None  # past the end clamps
    assert (await inline(client, uri, 1, 4)).items
    client.text_document_did_close(types.DidCloseTextDocumentParams(types.TextDocumentIdentifier(uri)))
    assert (await inline(client, uri, 1, 4)).items == ()


class Wire:
    """The server's stdio, spoken byte by byte, for what a well-behaved client never sends."""

    def __init__(self, process):
        self.process = process

    def send(self, body: bytes) -> None:
        self.process.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def request(self, id, method, params) -> None:
        self.send(json.dumps({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).encode())

    async def response(self, id) -> dict:
        while True:
            header = await self.process.stdout.readuntil(b"\r\n\r\n")
            length = int(header.split(b"Content-Length:")[1].split(b"\r\n")[0])
            message = json.loads(await self.process.stdout.readexactly(length))
            if message.get("id") == id and "method" not in message:
                return message


async def test_malformed_messages_on_the_wire(server_command):
    process = await asyncio.create_subprocess_exec(*server_command, stdin=asyncio.subprocess.PIPE,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    wire = Wire(process)
    try:
        wire.request(1, "initialize", {"capabilities": {}})
        assert "result" in await asyncio.wait_for(wire.response(1), 30)
        wire.send(json.dumps({"jsonrpc": "2.0", "method": "initialized", "params": {}}).encode())
        wire.send(b"{not json")  # logged; the server keeps reading
        wire.send(json.dumps({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
            "uri": PY_URI, "languageId": "python", "version": 1, "text": "x = "}}}).encode())
        # Params that do not match the protocol's types get InvalidParams, not silence.
        wire.request(2, "textDocument/inlineCompletion", {"textDocument": 5, "position": "here"})
        error = (await asyncio.wait_for(wire.response(2), 30))["error"]
        assert error["code"] == -32602 and "inlineCompletion" in error["message"]
        wire.request(3, "textDocument/inlineCompletion", {
            "textDocument": {"uri": PY_URI}, "position": {"line": 0, "character": 4},
            "context": {"triggerKind": 2}})
        assert (await asyncio.wait_for(wire.response(3), 30))["result"]["items"]
        # `exit` without `shutdown` first: the process ends at once, with code 1.
        wire.send(json.dumps({"jsonrpc": "2.0", "method": "exit"}).encode())
        assert await asyncio.wait_for(process.wait(), 10) == 1
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


# A block to fill after a long prefix: with random weights, one token a step, so it takes a while.
SLOW = "def mean(values):\n    total = sum(values)\n    return total\n\n" * 60 + "def median(values):\n    "
SLOW_END = {"line": SLOW.count("\n"), "character": 4}


async def status(client):
    return await client.workspace_execute_command_async(types.ExecuteCommandParams(command="lacuna.status"))


@pytest.fixture(scope="module")
def random_command(checkpoints):
    """A server whose model has random weights: low confidence, one token a step, so slow."""
    return command("--model", str(checkpoints["lacuna"]))


async def test_cancel_request_reaches_the_engine(random_command):
    process = await asyncio.create_subprocess_exec(*random_command, stdin=asyncio.subprocess.PIPE,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    wire = Wire(process)
    notify = lambda method, params: wire.send(json.dumps(  # noqa: E731
        {"jsonrpc": "2.0", "method": method, "params": params}).encode())
    ask = {"textDocument": {"uri": PY_URI}, "position": {"line": 2, "character": 11}, "context": {"triggerKind": 1}}
    try:
        wire.request(1, "initialize", {"capabilities": {}})
        await asyncio.wait_for(wire.response(1), 30)
        notify("initialized", {})
        notify("textDocument/didOpen", {"textDocument": {"uri": PY_URI, "languageId": "python", "version": 1,
                                                         "text": SLOW}})
        wire.request(2, "textDocument/inlineCompletion", ask)  # the default model: random, one token a step
        await asyncio.wait_for(wire.response(2), 60)
        wire.request(3, "textDocument/inlineCompletion", ask | {"position": SLOW_END})
        await asyncio.sleep(0.02)
        notify("$/cancelRequest", {"id": 3})
        assert (await asyncio.wait_for(wire.response(3), 30))["error"]["code"] == -32800
        wire.request(4, "workspace/executeCommand", {"command": "lacuna.status"})
        assert (await asyncio.wait_for(wire.response(4), 30))["result"]["cancelled"] == 1
    finally:
        process.kill()
        await process.wait()


async def test_a_newer_request_supersedes_the_one_in_flight(random_command):
    client, _, _ = await start(random_command)
    try:
        open_doc(client, PY_URI, SLOW)
        await inline(client, PY_URI, 0, 0)
        older = asyncio.ensure_future(inline(client, PY_URI, SLOW_END["line"], SLOW_END["character"]))
        await asyncio.sleep(0.02)
        newer = await inline(client, PY_URI, 2, 11)
        assert (await older).items == ()  # answered, empty: it was superseded
        assert newer.items is not None
        assert (await status(client))["cancelled"] == 1
    finally:
        await stop(client)


async def test_tcp_on_loopback(server_command, unused_tcp_port):
    process = await asyncio.create_subprocess_exec(*server_command, "--tcp", "--port", str(unused_tcp_port),
                                                   stderr=asyncio.subprocess.DEVNULL)
    client = LanguageClient("test", "0")
    try:
        for _ in range(100):
            try:
                await client.start_tcp("127.0.0.1", unused_tcp_port)
                break
            except OSError:
                await asyncio.sleep(0.1)
        await client.initialize_async(types.InitializeParams(capabilities=types.ClientCapabilities()))
        client.initialized(types.InitializedParams())
        open_doc(client, PY_URI, "x = ")
        assert (await inline(client, PY_URI, 0, 4)).items
    finally:
        process.kill()
        await process.wait()


async def test_debounce_lets_only_the_latest_request_ask(server_command):
    client, _, _ = await start(server_command, options={"debounceMs": 300})
    try:
        open_doc(client, PY_URI, "a = \nb = \n")
        first = asyncio.ensure_future(inline(client, PY_URI, 0, 4))
        await asyncio.sleep(0.05)
        second = await inline(client, PY_URI, 1, 4)
        assert (await first).items == () and second.items
    finally:
        await stop(client)


async def test_big_files_long_lines_nul_and_lone_surrogates(shared):
    client, _ = shared
    uri, text_uri, other_uri = "file:///work/big.py", "file:///work/bytes.txt", "file:///work/data.xyz"
    big = "value = 1\n" * 1_000_000 + "x" * 100_000 + " = "  # 10 MB, and a line of 100,000 characters
    open_doc(client, uri, big)
    assert (await asyncio.wait_for(inline(client, uri, 1_000_000, 100_003), 60)).items is not None
    # What a client may send for bytes read from disk: NUL, and undecodable bytes as lone surrogates.
    open_doc(client, text_uri, "a\x00b \udcff c ", language="plaintext")
    assert (await inline(client, text_uri, 0, 8)).items
    open_doc(client, other_uri, "some data ", language="cobol")  # no grammar: plain text
    assert (await inline(client, other_uri, 0, 10)).items
    for closed in (uri, text_uri, other_uri):
        client.text_document_did_close(types.DidCloseTextDocumentParams(types.TextDocumentIdentifier(closed)))


async def test_requests_after_shutdown_get_an_error(server_command):
    client, _, _ = await start(server_command)
    open_doc(client, PY_URI, "x = ")
    await client.shutdown_async(None)
    with pytest.raises(Exception, match="shutting down"):
        await asyncio.wait_for(inline(client, PY_URI, 0, 4), 10)
    client.exit(None)
    await asyncio.wait_for(client.stop(), 10)  # the process ends after `exit`


async def test_a_model_that_cannot_load_is_reported_and_requests_answer_empty(tmp_path):
    client, _, messages = await start(command("--model", str(tmp_path / "missing")))
    try:
        open_doc(client, PY_URI, "x = ")
        assert (await inline(client, PY_URI, 0, 4)).items == ()
        assert any("cannot load the model" in m and "does not exist" in m for m in messages)
        assert (await status(client))["ready"] is False
    finally:
        await stop(client)
