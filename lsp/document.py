"""An open document: its text and, for languages with a grammar, an incrementally edited tree.

The server keeps its own copy of each document's text, so every edit can be given to
tree-sitter exactly (pygls has already applied the edit to its copy by the time a handler
runs). Edits are recorded at once and parsed later, once per burst of keystrokes; `reparse()`
is safe from any thread while edits keep arriving.
"""

from __future__ import annotations

import bisect
import itertools
import threading

from tree_sitter import Point, Tree

from .languages import parser


def utf8(text: str) -> bytes:
    """`text` as tree-sitter reads it. Lone surrogates cannot come from UTF-8 but can from a
    client's JSON: they are kept, so that byte offsets stay consistent."""
    return text.encode("utf-8", "surrogatepass")


def is_word(ch: str) -> bool:
    """Whether `ch` can be part of an identifier."""
    return ch.isalnum() or ch == "_"


def line_start(text: str, offset: int, lines: int) -> int:
    """The start of the line `lines` lines above the one holding `offset`."""
    at = offset
    for _ in range(lines + 1):
        at = text.rfind("\n", 0, at)
        if at == -1:
            return 0
    return at + 1


def line_end(text: str, offset: int, lines: int) -> int:
    """The end of the line `lines` lines below the one holding `offset` (where its line break stands)."""
    at = offset - 1
    for _ in range(lines + 1):
        at = text.find("\n", at + 1)
        if at == -1:
            return len(text)
    return at


def units(text: str, encoding: str) -> int:
    """The length of `text` in the position encoding's code units."""
    if encoding == "utf-8":
        return len(utf8(text))
    if encoding == "utf-16":
        return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)
    return len(text)


class Document:
    def __init__(self, uri: str, text: str, language_id: str | None, version: int | None = None):
        self.uri, self.language_id, self.version = uri, language_id, version
        self.parser = parser(language_id)
        self.text = text
        self._line_starts: list[int] | None = None
        self._tree: Tree | None = self.parser.parse(utf8(text)) if self.parser else None
        self._pending: list[dict] = []  # edits not yet in the tree, in order
        self._state_lock = threading.Lock()  # text and pending edits
        self._parse_lock = threading.Lock()  # one reparse at a time

    @property
    def tree(self) -> Tree | None:
        """The syntax tree of the current text."""
        self.reparse()
        return self._tree

    def reparse(self) -> None:
        """Bring the tree up to date with the text (incrementally); safe from any thread."""
        with self._parse_lock:
            with self._state_lock:
                if not self._pending:
                    return
                tree = self._tree.copy()
                for edit in self._pending:
                    tree.edit(**edit)
                applied, source = len(self._pending), utf8(self.text)
            tree = self.parser.parse(source, tree)  # tree-sitter lets other threads run meanwhile
            with self._state_lock:
                self._tree = tree
                del self._pending[:applied]

    @property
    def line_starts(self) -> list[int]:
        if self._line_starts is None:
            self._line_starts = [0, *itertools.accumulate(len(line) + 1 for line in self.text.split("\n")[:-1])]
        return self._line_starts

    def offset(self, line: int, character: int, encoding: str = "utf-16") -> int:
        """The string index of an LSP position; past the end of a line or document clamps to it."""
        starts = self.line_starts
        if line < 0:
            return 0
        if line >= len(starts):
            return len(self.text)
        start = starts[line]
        end = starts[line + 1] - 1 if line + 1 < len(starts) else len(self.text)
        if end > start and self.text[end - 1] == "\r" and end < len(self.text):
            end -= 1  # "\r\n" ends the line: clamp before both
        if encoding == "utf-32":
            return min(start + max(character, 0), end)
        count = 0
        for index in range(start, end):
            if count >= character:
                return index
            count += units(self.text[index], encoding)
        return end

    def position(self, offset: int, encoding: str = "utf-16") -> tuple[int, int]:
        """The LSP position (line, character) of a string index."""
        line = bisect.bisect_right(self.line_starts, offset) - 1
        return line, units(self.text[self.line_starts[line]:offset], encoding)

    def apply_change(self, start: tuple[int, int] | None, end: tuple[int, int] | None, text: str,
                     encoding: str = "utf-16") -> None:
        """An LSP content change: replace the range from `start` to `end` (line, character) with
        `text`, or the whole document when there is no range."""
        if start is None or end is None:
            self.edit(0, len(self.text), text)
            return
        begin = self.offset(*start, encoding)
        self.edit(begin, max(begin, self.offset(*end, encoding)), text)

    def edit(self, start: int, end: int, new_text: str) -> None:
        """Replace text[start:end] with `new_text`; the tree catches up at the next reparse."""
        with self._state_lock:
            old = self.text
            self.text = old[:start] + new_text + old[end:]
            self._line_starts = None
            if self._tree is None:
                return
            start_byte = len(utf8(old[:start]))
            self._pending.append(dict(
                start_byte=start_byte,
                old_end_byte=start_byte + len(utf8(old[start:end])),
                new_end_byte=start_byte + len(utf8(new_text)),
                start_point=self._point(old, start), old_end_point=self._point(old, end),
                new_end_point=self._point(self.text, start + len(new_text)),
            ))

    def _point(self, text: str, offset: int) -> Point:
        return Point(text.count("\n", 0, offset), len(utf8(text[line_start(text, offset, 0):offset])))

    def byte_offset(self, offset: int) -> int:
        return len(utf8(self.text[:offset]))
