"""Where Lacuna's server departs from pygls's protocol handling, and why."""

from __future__ import annotations

import os
import sys

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams, JsonRpcInvalidRequest
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method


class Protocol(LanguageServerProtocol):
    # pygls has no public way to answer a request outside its handler, nor to ask whether
    # `shutdown` was received: `_send_response` and `_shutdown` below are its private API.

    def structure_message(self, data):
        if isinstance(data, dict) and data.get("method") == "initialize":
            prefer_utf8(data)
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
            refused = JsonRpcInvalidRequest("the server is shutting down")
            self._send_response(message.id, error=refused.to_response_error())
            return
        super().handle_message(message)


    @lsp_method(types.EXIT)
    def lsp_exit(self, *args):
        # Leave at once: every answer is written and nothing is left to save, while the
        # interpreter's teardown (torch's alone) would keep the editor waiting about a second.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if self._shutdown else 1)
        yield  # a generator, as pygls's handlers are


def prefer_utf8(initialize: dict) -> None:
    """Put UTF-8 first among the client's position encodings: pygls takes the first it knows,
    and UTF-8 spares converting every position (UTF-16 stays the default)."""
    general = ((initialize.get("params") or {}).get("capabilities") or {}).get("general") or {}
    encodings = general.get("positionEncodings")
    if isinstance(encodings, list) and "utf-8" in encodings:
        general["positionEncodings"] = ["utf-8"] + [e for e in encodings if e != "utf-8"]
