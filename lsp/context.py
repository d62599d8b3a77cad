"""What the model sees: prefix and suffix windows around the cursor, and before them the syntax
context that lies outside the windows, most relevant first: definitions of the names used near
the cursor (from every open document), the headers of the enclosing functions and classes, and
the file's imports."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tree_sitter import Node

from .document import Document, line_end, line_start

CHARS_PER_TOKEN = 3  # a conservative average for code, so budgets in tokens become characters
IMPORT_TYPES = {"import_statement", "import_from_statement", "future_import_statement", "import_declaration",
                "use_declaration", "preproc_include", "using_declaration"}
SCOPE_TYPES = {"function_definition", "class_definition", "function_declaration", "method_definition",
               "class_declaration", "method_declaration", "function_item", "impl_item", "trait_item",
               "interface_declaration", "struct_specifier", "class_specifier", "namespace_definition"}
DEFINITION_TYPES = SCOPE_TYPES | {"type_declaration", "struct_item", "enum_item", "type_alias_declaration",
                                  "enum_declaration", "decorated_definition"}
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
NEAR_LINES = 3  # names on this many lines around the cursor count as used near it


@dataclass
class Context:
    prefix: str  # syntax context, then the prefix window
    suffix: str


def _window_start(text: str, offset: int, chars: int) -> int:
    """The start of the prefix window: at most `chars` back, on a line boundary when possible."""
    start = max(0, offset - chars)
    if start > 0:
        newline = text.find("\n", start, offset)
        start = newline + 1 if newline != -1 else start
    return start


def _window_end(text: str, offset: int, chars: int) -> int:
    end = min(len(text), offset + chars)
    if end < len(text):
        newline = text.rfind("\n", offset, end)
        end = newline + 1 if newline != -1 else end
    return end


def _header(doc: Document, node: Node) -> str:
    """The line where a definition starts, with its indentation: its signature."""
    starts = doc.line_starts
    row = node.start_point.row
    end = starts[row + 1] - 1 if row + 1 < len(starts) else len(doc.text)
    return doc.text[starts[row]:end]


def _enclosing_headers(doc: Document, offset: int) -> list[str]:
    node = doc.tree.root_node.descendant_for_byte_range(doc.byte_offset(offset), doc.byte_offset(offset))
    headers = []
    while node is not None:
        if node.type in SCOPE_TYPES:
            headers.append(_header(doc, node))
        node = node.parent
    return headers[::-1]  # outermost first, as they appear in the file


@dataclass
class Outline:
    """A document's imports and named definitions (name -> headers), for one tree."""
    tree: object
    imports: list[str]
    definitions: dict[str, list[str]]


class Outlines:
    """Each open document's outline, rebuilt only when its tree changed. The completer owns one;
    the server warms it up right after reparsing, off the event loop."""

    def __init__(self):
        self._by_uri: dict[str, Outline] = {}

    def of(self, doc: Document) -> Outline:
        tree = doc.tree
        cached = self._by_uri.get(doc.uri)
        if cached is not None and cached.tree is tree:
            return cached
        self._by_uri[doc.uri] = result = _outline(doc, tree)
        return result

    def forget(self, uri: str) -> None:
        self._by_uri.pop(uri, None)


def _outline(doc: Document, tree) -> Outline:
    imports = [n.text.decode("utf-8", "replace") for n in tree.root_node.children if n.type in IMPORT_TYPES]
    definitions: dict[str, list[str]] = {}
    stack = list(tree.root_node.children)
    while stack:
        node = stack.pop()
        if node.type not in DEFINITION_TYPES:
            continue
        target = node.child_by_field_name("definition") if node.type == "decorated_definition" else node
        if target is None:
            continue
        name = target.child_by_field_name("name")
        if name is not None:
            definitions.setdefault(name.text.decode("utf-8", "replace"), []).append(_header(doc, target))
        body = target.child_by_field_name("body")
        if body is not None and target.type in ("class_definition", "class_declaration", "impl_item"):
            stack.extend(body.children)  # methods too
    return Outline(tree, imports, definitions)


def build_context(doc: Document, offset: int, documents: list[Document], outlines: Outlines, *,
                  prefix_tokens: int = 1024, suffix_tokens: int = 256, context_tokens: int = 256) -> Context:
    text = doc.text
    start = _window_start(text, offset, prefix_tokens * CHARS_PER_TOKEN)
    end = _window_end(text, offset, suffix_tokens * CHARS_PER_TOKEN)
    prefix, suffix = text[start:offset], text[offset:end]
    if doc.tree is None or context_tokens <= 0:
        return Context(prefix, suffix)
    # Below, lines are counted from past the character at the cursor: at a line's end, one more.
    near = text[line_start(text, offset, NEAR_LINES):line_end(text, offset + 1, NEAR_LINES)]
    names = set(IDENTIFIER.findall(near))
    snippets = []
    for other in [doc] + [d for d in documents if d is not doc and d.language_id == doc.language_id]:
        definitions = outlines.of(other).definitions
        snippets += [header for name in sorted(names) for header in definitions.get(name, ())]
    snippets += _enclosing_headers(doc, offset) + outlines.of(doc).imports
    budget, chosen, seen = context_tokens * CHARS_PER_TOKEN, [], set()
    window = prefix + suffix
    for snippet in snippets:
        if snippet in seen or snippet in window or len(snippet) + 1 > budget:
            continue
        seen.add(snippet)
        chosen.append(snippet)
        budget -= len(snippet) + 1
    return Context("".join(s + "\n" for s in chosen) + prefix, suffix)
