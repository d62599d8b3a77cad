"""Candidates as the protocol's items: inline completions (ghost text) and completion-menu items."""

from __future__ import annotations

from lsprotocol import types

from .document import Document, is_word
from .postprocess import Candidate

ACCEPTED = "lacuna.accepted"  # each item's command: the server counts acceptances
LABEL_CHARS = 40


def edit_range(doc: Document, start: int, cursor: int, candidate: Candidate, encoding: str) -> types.Range:
    """From `start` to past the text after the cursor that the candidate replaces."""
    end = min(len(doc.text), cursor + candidate.replace_suffix)
    return types.Range(types.Position(*doc.position(start, encoding)), types.Position(*doc.position(end, encoding)))


def word_start(text: str, offset: int) -> int:
    """Where the identifier that ends at `offset` starts."""
    while offset > 0 and is_word(text[offset - 1]):
        offset -= 1
    return offset


def accepted_command(uri: str) -> types.Command:
    return types.Command(title="Lacuna: accepted", command=ACCEPTED, arguments=[uri])


def inline_items(doc: Document, offset: int, found: list[Candidate], encoding: str) -> types.InlineCompletionList:
    return types.InlineCompletionList(items=[
        types.InlineCompletionItem(insert_text=c.text, range=edit_range(doc, offset, offset, c, encoding),
                                   command=accepted_command(doc.uri))
        for c in found
    ])


def completion_items(doc: Document, offset: int, found: list[Candidate], encoding: str) -> types.CompletionList:
    """One menu item per candidate. Clients filter items by the word before the cursor, so each
    edit starts there."""
    start = word_start(doc.text, offset)
    word = doc.text[start:offset]
    items = []
    for c in found:
        text = word + c.text
        first_line = text.strip().split("\n", 1)[0]
        label = first_line if len(first_line) <= LABEL_CHARS else first_line[:LABEL_CHARS - 1] + "…"
        items.append(types.CompletionItem(
            label=label, kind=types.CompletionItemKind.Snippet, detail="Lacuna", filter_text=text, sort_text="0",
            insert_text_format=types.InsertTextFormat.PlainText,
            text_edit=types.TextEdit(edit_range(doc, start, offset, c, encoding), text),
            documentation=types.MarkupContent(types.MarkupKind.Markdown, f"```{doc.language_id or ''}\n{text}\n```"),
            command=accepted_command(doc.uri)))
    return types.CompletionList(is_incomplete=True, items=items)
