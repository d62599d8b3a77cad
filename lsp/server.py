"""The language server: thin pygls handlers over the documents and the completer.

The server talks to its engine through engine/api.py only. The in-process engine (and so torch)
is imported when the server loads a model itself, never when it is given an engine URL.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from lsprotocol import types
from pygls.lsp.server import LanguageServer

from engine.api import VERSION, EngineError, InfillEngine

from .completer import Completer
from .config import Options, update_options
from .document import Document
from .items import ACCEPTED, completion_items, inline_items
from .postprocess import Candidate
from .protocol import Protocol
from .remote import RemoteEngine

log = logging.getLogger(__name__)
STATUS = "lacuna.status"
PARSE_DELAY_S = 0.05  # a pause in typing this long, and edits are parsed


class LacunaServer(LanguageServer):
    def __init__(self, options: Options | None = None, engine: InfillEngine | None = None):
        super().__init__("lacuna", VERSION, protocol_cls=Protocol)
        self.options = options or Options()
        self.completer = Completer(self.options, engine)
        self.documents: dict[str, Document] = {}
        self.engine_ready: asyncio.Future | None = None
        self.parse_timers: dict[str, asyncio.TimerHandle] = {}

    def report_server_error(self, error: Exception, source) -> None:
        log.error("%s: %s", source.__name__, error)  # logged, not popped up in the editor

    def show(self, kind: types.MessageType, message: str) -> None:
        self.window_show_message(types.ShowMessageParams(kind, f"Lacuna: {message}"))

    def set_options(self, settings: object) -> None:
        options, errors = update_options(self.options, settings)
        started = self.engine_ready is not None or self.completer.engine is not None
        if started and (options.model_dir, options.engine_url) != (self.options.model_dir, self.options.engine_url):
            errors.append("a new modelDir or engineUrl takes effect when the server restarts")
        self.options = options
        self.completer.configure(options)
        for error in errors:
            self.show(types.MessageType.Warning, error)

    def encoding(self) -> str:
        """The negotiated position encoding: "utf-16", "utf-8" or "utf-32"."""
        encoding = self.workspace.position_encoding or types.PositionEncodingKind.Utf16
        return getattr(encoding, "value", encoding)

    # -- documents ------------------------------------------------------------------------

    def open(self, item: types.TextDocumentItem) -> None:
        self.documents[item.uri] = doc = Document(item.uri, item.text, item.language_id, item.version)
        self.warm_up_later(doc)

    def change(self, params: types.DidChangeTextDocumentParams) -> None:
        doc = self.documents.get(params.text_document.uri)
        if doc is None:
            return
        for change in params.content_changes:
            if isinstance(change, types.TextDocumentContentChangePartial):
                start, end = change.range.start, change.range.end
                doc.apply_change((start.line, start.character), (end.line, end.character), change.text,
                                 self.encoding())
            else:
                doc.apply_change(None, None, change.text)
        doc.version = params.text_document.version
        self.warm_up_later(doc)

    def close(self, uri: str) -> None:
        self.documents.pop(uri, None)
        self.completer.forget(uri)
        timer = self.parse_timers.pop(uri, None)
        if timer is not None:
            timer.cancel()

    def warm_up_later(self, doc: Document) -> None:
        """Parse the document once typing pauses, so the next completion finds its tree ready.
        tree-sitter holds the GIL while it parses, so parsing at once would delay the answers
        to the keystrokes that follow (typing through a suggestion must stay instant)."""
        loop = asyncio.get_running_loop()
        previous = self.parse_timers.pop(doc.uri, None)
        if previous is not None:
            previous.cancel()
        self.parse_timers[doc.uri] = loop.call_later(PARSE_DELAY_S, self.completer.warm_up, doc)

    # -- the engine -----------------------------------------------------------------------

    def load_engine(self) -> None:
        """Load the model off the event loop (requests answer empty until it is resident), or
        connect to the engine service the options name."""
        if self.completer.engine is not None or self.engine_ready is not None:
            return
        options = self.options
        if options.engine_url:
            self.completer.use_engine(RemoteEngine(options.engine_url, model=options.engine_model,
                                                   on_change=self.engine_changed))
            return

        def load() -> InfillEngine:
            from engine.engine import Engine  # torch: only for a model in this process

            return Engine.load(options.model_dir, device=options.device, int8=options.int8)

        async def install():
            try:
                self.completer.use_engine(await asyncio.to_thread(load))
            except Exception as error:  # a bad checkpoint must not take the server down
                log.error("cannot load the model: %s", error)
                self.show(types.MessageType.Error, f"cannot load the model: {error}")

        self.engine_ready = asyncio.ensure_future(install())

    def engine_changed(self, up: bool, message: str) -> None:
        """Tell the editor once when the engine service goes down and once when it is back."""
        self.show(types.MessageType.Info if up else types.MessageType.Warning, message)

    # -- completions ----------------------------------------------------------------------

    async def candidates(self, uri: str, position: types.Position) -> tuple[Document | None, int, list[Candidate]]:
        """The document, the cursor's offset in it and the candidates there."""
        doc = self.documents.get(uri)
        if doc is None:
            return None, 0, []
        if self.engine_ready is not None and not self.engine_ready.done():
            await asyncio.wait([self.engine_ready])  # the first requests wait for the model to load
        offset = doc.offset(position.line, position.character, self.encoding())
        try:
            found = await self.completer.complete(doc, offset, list(self.documents.values()))
        except (EngineError, ValueError) as error:
            log.warning("no completion: %s", error)
            found = []
        return doc, offset, found

    def status(self) -> dict:
        engine, completer = self.completer.engine, self.completer
        return {
            "server": f"lacuna {VERSION}",
            "model": engine and engine.name,
            "device": str(engine.device) if engine and engine.device is not None else None,
            "ready": engine is not None and engine.up,
            "engine": "in-process" if engine is None or engine.url is None else ("up" if engine.up else "down"),
            "lastLatencyMs": completer.last_latency_ms,
            "lastRequest": completer.last_timing,
            "accepted": completer.accepted,
            "cancelled": completer.cancelled,
        }


def create_server(options: Options | None = None, engine: InfillEngine | None = None) -> LacunaServer:
    ls = LacunaServer(options, engine)

    @ls.feature(types.INITIALIZE)
    def initialize(ls: LacunaServer, params: types.InitializeParams):
        ls.set_options(params.initialization_options)

    @ls.feature(types.INITIALIZED)
    def initialized(ls: LacunaServer, params: types.InitializedParams):
        ls.load_engine()

    @ls.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: LacunaServer, params: types.DidOpenTextDocumentParams):
        ls.open(params.text_document)

    @ls.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: LacunaServer, params: types.DidChangeTextDocumentParams):
        ls.change(params)

    @ls.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: LacunaServer, params: types.DidCloseTextDocumentParams):
        ls.close(params.text_document.uri)

    @ls.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(ls: LacunaServer, params: types.InlineCompletionParams):
        doc, offset, found = await ls.candidates(params.text_document.uri, params.position)
        return inline_items(doc, offset, found, ls.encoding()) if doc else types.InlineCompletionList(items=[])

    @ls.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions())
    async def completion(ls: LacunaServer, params: types.CompletionParams):
        doc, offset, found = await ls.candidates(params.text_document.uri, params.position)
        return completion_items(doc, offset, found, ls.encoding()) if doc else types.CompletionList(True, [])

    @ls.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(ls: LacunaServer, params: types.DidChangeConfigurationParams):
        settings = params.settings
        if isinstance(settings, dict) and isinstance(settings.get("lacuna"), dict):
            settings = settings["lacuna"]  # VS Code and others nest settings under their section
        ls.set_options(settings)

    @ls.command(ACCEPTED)
    def accepted(ls: LacunaServer, *args):
        return ls.completer.record_acceptance()

    @ls.command(STATUS)
    def status(ls: LacunaServer, *args):
        return ls.status()

    return ls


def serve(options: Options, *, tcp: bool = False, host: str = "127.0.0.1", port: int = 2087,
          verbose: bool = False) -> None:
    """`lacuna serve`: stdio, or TCP on host:port."""
    # stdout carries the protocol: logs go to stderr, where editors show them.
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = create_server(options)
    if tcp:
        server.start_tcp(host, port)
    else:
        server.start_io()
