"""Whether to complete at the cursor, and how much: decided from the syntax there."""

from __future__ import annotations

from dataclasses import dataclass

from engine.api import BLOCK_OPENERS, indentation

from .config import Options
from .document import Document, is_word

# Code inside a string: Python's f-string `{...}`, JavaScript's and TypeScript's template `${...}`.
INTERPOLATIONS = ("interpolation", "template_substitution")


@dataclass(frozen=True)
class Span:
    multiline: bool
    tokens: int  # masked tokens to fill
    # A multi-line infill ends at a line indented less than this, which leaves the block the
    # cursor opens (DecodeOptions.block_indent); post-processing would cut it there anyway.
    block_indent: int | None = None


def _in_comment_or_string(doc: Document, offset: int) -> str | None:
    """"comment" or "string" when the cursor is inside one (and not in code interpolated into a
    string), else None."""
    tree = doc.tree
    if tree is None:
        return None
    byte = doc.byte_offset(offset)
    node = tree.root_node.descendant_for_byte_range(max(byte - 1, 0), byte)
    while node is not None:
        kind = node.type
        # The cursor right after a closed string or at the start of a comment is outside it.
        inside = node.start_byte < byte < node.end_byte or (kind.endswith("comment") and byte == node.end_byte)
        if "comment" in kind and inside:
            return "comment"
        if kind in INTERPOLATIONS and inside:
            return None
        if ("string" in kind or kind == "template_literal") and inside:
            return "string"
        node = node.parent
    return None


def plan_span(doc: Document, offset: int, options: Options) -> Span | None:
    text = doc.text
    line_start = text.rfind("\n", 0, offset) + 1
    line_end = text.find("\n", offset)
    before, after = text[line_start:offset], text[offset:line_end if line_end != -1 else len(text)]
    # In the middle of a word with more of it to the right, the user is editing, not writing.
    if before and after and is_word(before[-1]) and is_word(after[0]):
        return None
    where = _in_comment_or_string(doc, offset)
    if (where == "comment" and not options.complete_in_comments) or (
            where == "string" and not options.complete_in_strings):
        return None
    line_tokens = max(1, options.max_tokens // 3)
    if not options.multiline or after.strip() or where:
        return Span(False, line_tokens)
    opener = before  # the line that opens the block
    opens_block = before.rstrip().endswith(BLOCK_OPENERS)
    if not before.strip():  # a blank line: look at the last line with code
        previous = text[:line_start].rstrip()
        opener = previous[previous.rfind("\n") + 1:]
        opens_block = previous.endswith(BLOCK_OPENERS) or _empty_body_follows(text, offset)
    if not opens_block:
        return Span(False, line_tokens)
    return Span(True, options.max_tokens, indentation(opener) + 1)


def _empty_body_follows(text: str, offset: int) -> bool:
    """A blank line directly inside `{ }` (an empty function or block body)."""
    rest = text[offset:].lstrip()
    before = text[:offset].rstrip()
    return before.endswith("{") and rest.startswith("}")
