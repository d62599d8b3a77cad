"""The language server: thin pygls handlers over the documents and the completer."""

from __future__ import annotations

import asyncio
import logging

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams, JsonRpcInvalidRequest
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method

from engine.runner import Engine
from engine.sampler import EngineError

from .completer import Completer
from .config import Options, update_options
from .context import outline
from .document import Document
from .postprocess import Candidate
from .remote import RemoteEngine

log = logging.getLogger(__name__)
ACCEPTED = "lacuna.accepted"
STATUS = "lacuna.status"
LABEL_CHARS = 40
PARSE_DELAY_S = 0.05  # a pause in typing this long, and edits are parsed


class Protocol(LanguageServerProtocol):
    def structure_message(self, data):
        if isinstance(data, dict) and data.get("method") == "initialize":
            _prefer_utf8(data)
        try:
            return super().structure_message(data)
        except JsonRpcException as error:
            # pygls only logs a request it cannot read, and the client would wait forever.
            if isinstance(data, dict) and "id" in data and "method" in data:
                reason = JsonRpcInvalidParams(f"invalid params for {data['method']}: {error.__cause__ or error}")
                self._send_response(data["id"], error=reason.to_response_error())
            raise

    # The server keeps its own documents (document.py). pygls's copies would double the cost of
    # every keystroke (it rebuilds a document's whole text for each change), so they are skipped.
    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params):
        yield self.fm.features[types.TEXT_DOCUMENT_DID_OPEN], (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params):
        yield self.fm.features[types.TEXT_DOCUMENT_DID_CHANGE], (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params):
        yield self.fm.features[types.TEXT_DOCUMENT_DID_CLOSE], (params,), None

    def handle_message(self, message):
        # pygls drops requests after shutdown without an answer, leaving the client waiting.
        if self._shutdown and getattr(message, "id", None) is not None and getattr(message, "method", None):
            self._send_response(message.id, error=JsonRpcInvalidRequest("the server is shutting down").to_response_error())
            return
        super().handle_message(message)


def _prefer_utf8(initialize: dict) -> None:
    """Put UTF-8 first among the client's position encodings: pygls takes the first it knows,
    and UTF-8 spares converting every position (UTF-16 stays the default)."""
    general = ((initialize.get("params") or {}).get("capabilities") or {}).get("general") or {}
    encodings = general.get("positionEncodings")
    if isinstance(encodings, list) and "utf-8" in encodings:
        general["positionEncodings"] = ["utf-8"] + [e for e in encodings if e != "utf-8"]


class LacunaServer(LanguageServer):
    def __init__(self, options: Options | None = None, engine: Engine | None = None):
        super().__init__("lacuna", "0.1.0", protocol_cls=Protocol)
        self.options = options or Options()
        self.completer = Completer(self.options)
        self.completer.engine = engine
        self.documents: dict[str, Document] = {}
        self.engine_ready: asyncio.Future | None = None
        self.parse_timers: dict[str, asyncio.TimerHandle] = {}

    def report_server_error(self, error: Exception, source) -> None:
        log.error("%s: %s", source.__name__, error)  # logged, not popped up in the editor

    def set_options(self, settings: object) -> None:
        options, errors = update_options(self.options, settings)
        started = self.engine_ready is not None or self.completer.engine is not None
        if started and (options.model_dir, options.engine_url) != (self.options.model_dir, self.options.engine_url):
            errors.append("a new modelDir or engineUrl takes effect when the server restarts")
        self.options = self.completer.options = options
        for error in errors:
            self.window_show_message(types.ShowMessageParams(types.MessageType.Warning, f"Lacuna: {error}"))

    def warm_up_later(self, doc: Document) -> None:
        """Parse the document once typing pauses, so the next completion finds its tree ready.
        tree-sitter holds the GIL while it parses, so parsing at once would delay the answers
        to the keystrokes that follow (typing through a suggestion must stay instant)."""
        loop = asyncio.get_running_loop()
        previous = self.parse_timers.pop(doc.uri, None)
        if previous is not None:
            previous.cancel()
        self.parse_timers[doc.uri] = loop.call_later(PARSE_DELAY_S, warm_up, doc)

    def encoding(self) -> str:
        """The negotiated position encoding: "utf-16", "utf-8" or "utf-32"."""
        encoding = self.workspace.position_encoding or types.PositionEncodingKind.Utf16
        return getattr(encoding, "value", encoding)

    def load_engine(self) -> None:
        """Load the model off the event loop (requests answer empty until it is resident), or
        connect to the engine service the options name."""
        if self.completer.engine is not None or self.engine_ready is not None:
            return
        options = self.options
        if options.engine_url:
            self.completer.engine = RemoteEngine(options.engine_url, model=options.engine_model,
                                                 on_change=self.engine_changed)
            return

        def load() -> Engine:
            return Engine.load(options.model_dir, device=options.device)

        async def install():
            try:
                self.completer.engine = await asyncio.to_thread(load)
            except Exception as error:  # a bad checkpoint must not take the server down
                log.error("cannot load the model: %s", error)
                self.window_show_message(types.ShowMessageParams(
                    types.MessageType.Error, f"Lacuna: cannot load the model: {error}"))

        self.engine_ready = asyncio.ensure_future(install())

    def engine_changed(self, up: bool, message: str) -> None:
        """Tell the editor once when the engine service goes down and once when it is back."""
        kind = types.MessageType.Info if up else types.MessageType.Warning
        self.window_show_message(types.ShowMessageParams(kind, f"Lacuna: {message}"))


def describe_model(engine: Engine | RemoteEngine | None) -> str | None:
    if engine is None or isinstance(engine, RemoteEngine):
        return engine and engine.name
    return engine.loaded.name + (" (random weights)" if engine.loaded.random_weights else "")


def warm_up(doc: Document) -> None:
    """Parse a document's latest edits and outline it."""
    if doc.parser is not None:
        doc.reparse()
        outline(doc)


def create_server(options: Options | None = None, engine: Engine | None = None) -> LacunaServer:
    ls = LacunaServer(options, engine)

    @ls.feature(types.INITIALIZE)
    def initialize(ls: LacunaServer, params: types.InitializeParams):
        ls.set_options(params.initialization_options)

    @ls.feature(types.INITIALIZED)
    def initialized(ls: LacunaServer, params: types.InitializedParams):
        ls.load_engine()

    @ls.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: LacunaServer, params: types.DidOpenTextDocumentParams):
        item = params.text_document
        ls.documents[item.uri] = doc = Document(item.uri, item.text, item.language_id, item.version)
        ls.warm_up_later(doc)

    @ls.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: LacunaServer, params: types.DidChangeTextDocumentParams):
        doc = ls.documents.get(params.text_document.uri)
        if doc is None:
            return
        for change in params.content_changes:
            if isinstance(change, types.TextDocumentContentChangePartial):
                start, end = change.range.start, change.range.end
                doc.apply_change((start.line, start.character), (end.line, end.character), change.text, ls.encoding())
            else:
                doc.apply_change(None, None, change.text)
        doc.version = params.text_document.version
        ls.warm_up_later(doc)

    @ls.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: LacunaServer, params: types.DidCloseTextDocumentParams):
        ls.documents.pop(params.text_document.uri, None)
        ls.completer.forget(params.text_document.uri)
        timer = ls.parse_timers.pop(params.text_document.uri, None)
        if timer is not None:
            timer.cancel()

    async def candidates(ls: LacunaServer, uri: str, position: types.Position):
        doc = ls.documents.get(uri)
        if doc is None:
            return None, 0, []
        if ls.engine_ready is not None and not ls.engine_ready.done():
            await asyncio.wait([ls.engine_ready])  # the first requests wait for the model to load
        offset = doc.offset(position.line, position.character, ls.encoding())
        try:
            found = await ls.completer.complete(doc, offset, list(ls.documents.values()))
        except (EngineError, ValueError) as error:
            log.warning("no completion: %s", error)
            found = []
        return doc, offset, found

    def edit_range(ls: LacunaServer, doc: Document, start: int, cursor: int, candidate: Candidate) -> types.Range:
        encoding = ls.encoding()
        end = min(len(doc.text), cursor + candidate.replace_suffix)
        return types.Range(types.Position(*doc.position(start, encoding)), types.Position(*doc.position(end, encoding)))

    @ls.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(ls: LacunaServer, params: types.InlineCompletionParams):
        doc, offset, found = await candidates(ls, params.text_document.uri, params.position)
        return types.InlineCompletionList(items=[
            types.InlineCompletionItem(
                insert_text=c.text, range=edit_range(ls, doc, offset, offset, c),
                command=types.Command(title="Lacuna: accepted", command=ACCEPTED, arguments=[params.text_document.uri]))
            for c in found
        ])

    @ls.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions())
    async def completion(ls: LacunaServer, params: types.CompletionParams):
        doc, offset, found = await candidates(ls, params.text_document.uri, params.position)
        items = []
        if found:
            # Clients filter items by the word before the cursor, so each edit starts there.
            word_start = offset
            while word_start > 0 and (doc.text[word_start - 1].isalnum() or doc.text[word_start - 1] == "_"):
                word_start -= 1
            word = doc.text[word_start:offset]
            for c in found:
                text = word + c.text
                first_line = text.strip().split("\n", 1)[0]
                label = first_line if len(first_line) <= LABEL_CHARS else first_line[:LABEL_CHARS - 1] + "…"
                items.append(types.CompletionItem(
                    label=label, kind=types.CompletionItemKind.Snippet, detail="Lacuna",
                    filter_text=text, sort_text="0",
                    insert_text_format=types.InsertTextFormat.PlainText,
                    text_edit=types.TextEdit(edit_range(ls, doc, word_start, offset, c), text),
                    documentation=types.MarkupContent(types.MarkupKind.Markdown,
                                                      f"```{doc.language_id or ''}\n{text}\n```"),
                    command=types.Command(title="Lacuna: accepted", command=ACCEPTED, arguments=[params.text_document.uri])))
        return types.CompletionList(is_incomplete=True, items=items)

    @ls.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(ls: LacunaServer, params: types.DidChangeConfigurationParams):
        settings = params.settings
        if isinstance(settings, dict) and isinstance(settings.get("lacuna"), dict):
            settings = settings["lacuna"]  # VS Code and others nest settings under their section
        ls.set_options(settings)

    @ls.command(ACCEPTED)
    def accepted(ls: LacunaServer, *args):
        ls.completer.accepted += 1
        return ls.completer.accepted

    @ls.command(STATUS)
    def status(ls: LacunaServer, *args):
        engine = ls.completer.engine
        return {
            "server": "lacuna 0.1.0",
            "model": describe_model(engine),
            "device": str(engine.device) if engine else None,
            "ready": engine is not None and getattr(engine, "up", True),
            "engine": ("up" if engine.up else "down") if isinstance(engine, RemoteEngine) else "in-process",
            "lastLatencyMs": ls.completer.last_latency_ms,
            "lastRequest": ls.completer.last_timing,
            "accepted": ls.completer.accepted,
            "cancelled": ls.completer.cancelled,
        }

    return ls
