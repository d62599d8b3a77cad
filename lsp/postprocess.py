"""Turn a raw infill from the model into a completion the editor can show, or drop it.

`postprocess` applies one small rule per function, in order, in the manner of Tabby's postprocess filters. Rules
see only a window of the document (the cursor's line and WINDOW lines each side), so their cost does not grow
with the file. Text is handled with '\n' line endings and converted back to the document's at the end.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass

from engine.api import OPENERS, indentation
from lsp.document import line_end, line_start, utf8
from lsp.languages import parser

WINDOW = 100  # lines of context kept on each side of the cursor
REPEATED_LINES = 2  # lines below the cursor's that the infill must repeat to be cut there (fewer where it ends)
LINE = 400  # characters of the cursor's line the bracket rules scan on each side: minified lines are huge
CLOSERS, QUOTES, PAIRS = ")]}", "\"'`", {")": "(", "]": "[", "}": "{"}
# A line back at its block's level that carries the statement on: `} else {`, `else:`, `except E:`.
CONTINUES = re.compile(r"\s*(?:[)\]}]|(?:else|elif|except|finally)\b).*[:{(\[]\s*$")
# A line that starts a top-level statement: column 0, not a closer, brace or continuation (`}`, `else:`).
TOP_LEVEL = re.compile(r"^(?![)\]}{]|(?:else|elif|except|finally)\b)\S", re.M)


@dataclass(frozen=True)
class Candidate:
    text: str  # text to insert at the cursor
    replace_suffix: int = 0  # characters after the cursor the insertion replaces (auto-closed brackets/quotes)


def postprocess(infill: str, *, prefix: str, suffix: str, language: str | None, multiline: bool) -> Candidate | None:
    """Apply the rules below in order to one raw infill; None means drop the candidate."""
    head, tail = _window(prefix, suffix)
    crlf = "\r\n" in head or "\r\n" in tail
    head, tail, text = (s.replace("\r\n", "\n") for s in (head, tail, infill))
    text = keep_the_cursors_indentation(text, head)
    text = limit_to_scope(text, head, tail) if multiline else single_line(text)
    text = drop_suffix_repeats(trim_end(text, tail), head, tail)
    text, replace = close_brackets(trim_end(text, tail), head, tail)
    if not replace:
        text = stop_at_suffix_closer(text, tail)
    text = trim_end(text, tail)
    if is_empty(text) or introduces_syntax_error(text, replace, head, tail, language):
        return None
    return Candidate(text.replace("\n", "\r\n") if crlf else text, replace)


def keep_the_cursors_indentation(text: str, head: str) -> str:
    """On a line holding only the indentation the line above calls for (an editor's auto-indent), the
    infill does not indent further: the extra whitespace of its first line goes, and as much of every
    other line's (`{` then two spaces: the model's `  a += b;` as if the file were indented by four)."""
    above, _, cur = head.rpartition("\n")
    extra = text[: indentation(text)]
    ref = _last_code_line(above)
    if cur.strip() or not cur or not extra or "\n" in extra or not ref:
        return text
    # A block's body is one level in: two or four spaces or a tab (not a cursor in mid-indentation).
    level = cur.removeprefix(ref[: indentation(ref)]) if ref.rstrip().endswith(OPENERS) else ""
    if indentation(cur) != indentation(ref) + len(level) or level not in ("", "  ", "    ", "\t"):
        return text
    return "\n".join(line.removeprefix(extra) for line in text.split("\n"))


def single_line(text: str) -> str:
    """Keep the first line only: the server asked for a one-line completion."""
    return text.split("\n", 1)[0]


def limit_to_scope(text: str, head: str, tail: str) -> str:
    """Cut a multi-line infill where it leaves the block it began in, judged by indentation (Tabby's rule)."""
    lines = text.split("\n")
    above, _, cur = head.rpartition("\n")
    written = [line for line in (cur + lines[0], *lines[1:]) if line.strip()]
    if len(lines) == 1 or not written:
        return text
    if cur.strip() and lines[0].strip():
        base, strict = indentation(cur), True  # it finishes the cursor's statement (and the block that opens)
    else:  # it starts new lines: in the block of the line above, or in the body that line opens
        ref = cur if cur.strip() else _last_code_line(above)
        strict = ref.rstrip().endswith(OPENERS)
        first = indentation(written[0])
        base = indentation(ref) if strict else min(indentation(ref), first) if ref else first
    rest, _, after = tail.partition("\n")
    below = next((s for s in after.split("\n") if s.strip()), "")
    for i, line in enumerate(lines[1:], 1):
        if not line.strip() or indentation(line) > base or (indentation(line) == base and not strict):
            continue
        closing = _closes(line)
        # The suffix already closes this block: right after the cursor, or on its next line at the same level.
        if closing and (_closes(rest) or (_closes(below) and indentation(below) == indentation(line))):
            return "\n".join(lines[:i]).rstrip()
        if strict and indentation(line) == base and CONTINUES.match(line):
            continue
        return "\n".join(lines[: i + closing]).rstrip()  # a closing line the suffix lacks is kept
    return text


def drop_suffix_repeats(text: str, head: str, tail: str) -> str:
    """Cut the infill where it runs into what follows the cursor: from its first line that starts a repeat of the
    lines below the cursor's (two of them, or as many as either has left; spacing within a line aside). A model
    that does not read the suffix writes it again, often after what was missing."""
    cur = head.rpartition("\n")[2]
    rest, _, after = tail.partition("\n")
    lines = text.split("\n")
    whole = [cur + lines[0], *lines[1:]]  # the lines as they will read in the document
    nonblank = [i for i, line in enumerate(whole) if line.strip()]
    following = list(itertools.islice((_squeezed(line) for line in after.split("\n") if line.strip()), REPEATED_LINES))
    for n, i in enumerate(nonblank):
        ahead = [_squeezed(whole[j]) for j in nonblank[n:n + REPEATED_LINES]]
        if following and ahead[: len(following)] == following[: len(ahead)]:
            text = trim_end("\n".join(lines[:i]), tail)
            break
    # Then its overlap with the rest of the cursor's line: `foo(|, b)` + `a, b)`. Closers alone are left to
    # close_brackets; an overlap must end between words and must not unbalance a balanced line.
    cur, rest = cur[-LINE:], rest[:LINE]
    want = _shape(cur + rest)
    for k in range(min(len(text), len(rest)), 0, -1):
        if (
            text.endswith(rest[:k])
            and rest[:k].strip(CLOSERS + QUOTES + " \t")
            and not re.match(r"\w\w", rest[k - 1 : k + 1])
            and (_shape(cur + text[:-k] + rest) == want or _shape(cur + text + rest) != want)
        ):
            return trim_end(text[:-k], tail)
    return text


def close_brackets(text: str, head: str, tail: str) -> tuple[str, int]:
    """Don't double the closers an editor auto-inserted after the cursor: replace them (one line) or drop ours."""
    cur, rest = head.rpartition("\n")[2][-LINE:], tail.partition("\n")[0][:LINE]
    run = len(rest) - len(rest.lstrip(CLOSERS + QUOTES))
    ends = [k for k in range(run, 0, -1) if text.endswith(rest[:k])]
    if not ends:
        return text, 0
    # Replace the most closers that leave the line as balanced as the editor had it (`print(|)` + `len(x)`
    # closes its own bracket and replaces nothing); with no balanced choice, still never double them.
    want = _shape(cur + rest)
    k = next((k for k in [*ends, 0] if _shape(cur + text + rest[k:]) == want), ends[0])
    if "\n" in text:  # multi-line: the editor's closers end up after our last line, so drop ours
        return text[: len(text) - k], 0
    return text, k


def stop_at_suffix_closer(text: str, tail: str) -> str:
    """Cut a one-line infill before a closer of a bracket opened before the cursor when the rest of the line
    starts with that closer and the infill runs on past it: `foo(|)` + `a, b) + 1` gives `a, b`, and in an
    f-string's field `{|}"` + `name}!"` gives `name` (the model did not read, or did not heed, the suffix)."""
    rest = tail.partition("\n")[0].lstrip()
    _, strays = _balance(text)
    if "\n" in text or not strays or rest[:1] != text[strays[0]]:
        return text
    return text[: strays[0]]


def trim_end(text: str, tail: str) -> str:
    """Strip trailing whitespace, but keep spaces that separate a one-line infill from the rest of the cursor's line."""
    stripped = text.rstrip()
    keep = tail.partition("\n")[0].strip() and "\n" not in text[len(stripped) :]
    return text if keep else stripped


def is_empty(text: str) -> bool:
    """Drop a completion with nothing to insert."""
    return not text.strip()


def introduces_syntax_error(text: str, replace: int, head: str, tail: str, language: str | None) -> bool:
    """Reject a completion that adds a parse error the document did not have (plain text: never).

    Only a window is parsed, from the last top-level line (column 0) at most WINDOW lines above the cursor to the
    next one at most WINDOW lines below, so large files cost no more than small ones. Errors the window already
    has are tolerated: only error nodes the insertion creates count, and where the document was already broken
    at the cursor, errors there may change shape. Brackets (and a Python block) that the completion opens are
    closed before parsing: the user goes on typing after a completion.
    """
    if (p := parser(language)) is None:
        return False
    start = ([0] + [m.start() for m in TOP_LEVEL.finditer(head)])[-1]
    found = TOP_LEVEL.search(tail, tail.find("\n") + 1) if "\n" in tail else None
    before, after = utf8(head[start:]), utf8(tail[: found.start() if found else len(tail)])
    tree, old = _baseline(language, before + after)
    ins = utf8(text + _closure(head.rpartition("\n")[2], text, language))
    cut, rep = len(before), len(utf8(tail[:replace]))
    end, delta = cut + len(ins), len(ins) - rep
    tree = tree.copy()  # the baseline is shared through the cache: edit a copy and reparse incrementally
    tree.edit(cut, cut + rep, end, _point(before), _point(before + after[:rep]), _point(before + ins))
    new = p.parse(before + ins + after[rep:], tree)
    broken_at_cursor = any(s <= cut + rep and e >= cut for _, s, e in old)
    for kind, s, e in _errors(new.root_node):
        s_old, e_old = (pos if pos <= cut else pos - delta if pos >= end else None for pos in (s, e))
        if (kind, s_old, e_old) not in old and not (broken_at_cursor and s <= end and e >= cut):
            return True
    return False


@functools.lru_cache(maxsize=16)
def _baseline(language: str, source: bytes):
    """The parse of the window without the completion: cached, as every candidate of a request shares it."""
    tree = parser(language).parse(source)
    return tree, frozenset(_errors(tree.root_node))


def _errors(root) -> list[tuple[str, int, int]]:
    """(type, start, end) of the ERROR and MISSING nodes, descending only into subtrees that have errors."""
    found, stack = [], [root]  # a stack, not recursion: errors can sit deep in nested brackets
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            found.append((node.type, node.start_byte, node.end_byte))
        elif node.has_error:
            stack.extend(node.children)
    return found


def _closure(cur: str, text: str, language: str) -> str:
    """What closes the brackets and quotes the completion leaves open (an indented `pass` after a Python ':')."""
    line = (cur + text)[-LINE - len(text) :]
    opened, _ = _balance(line, '"' if language == "rust" else QUOTES)  # Rust's ' also starts lifetimes
    ours = [line[i] for i in opened if i >= len(line) - len(text)]
    if not ours and language == "python" and text.rstrip().endswith(":"):
        last = line.rpartition("\n")[2]
        return "\n" + last[: indentation(last)] + "    pass"
    return "".join({"(": ")", "[": "]", "{": "}"}.get(c, c) for c in reversed(ours))


def _balance(code: str, quotes: str = QUOTES) -> tuple[list[int], list[int]]:
    """Indices of the brackets and quotes left open in `code`, and of the closers that match nothing (strings
    skipped)."""
    opened: list[int] = []
    strays: list[int] = []
    escaped = False
    for i, ch in enumerate(code):
        top = code[opened[-1]] if opened else ""
        if top and top in quotes:
            if escaped or ch == "\\":
                escaped = not escaped
            elif ch == top or (ch == "\n" and top != "`"):  # only template strings span lines
                opened.pop()
        elif ch in quotes or ch in "([{":
            opened.append(i)
        elif ch in PAIRS:
            if top == PAIRS[ch]:
                opened.pop()
            else:
                strays.append(i)
    return opened, strays


def _shape(code: str) -> tuple[str, int]:
    opened, strays = _balance(code)
    return "".join(code[i] for i in opened), len(strays)


def _last_code_line(text: str) -> str:
    """The last line of `text` that is not blank ("" for none)."""
    return next((line for line in reversed(text.split("\n")) if line.strip()), "")


def _closes(line: str) -> bool:
    return line.lstrip()[:1] in tuple(CLOSERS)


def _squeezed(line: str) -> tuple[str, str]:
    """A line's indentation and its code without spaces: `+= 1` and `+=1` are the same statement."""
    return line[: indentation(line)], "".join(line.split())


def _point(source: bytes) -> tuple[int, int]:
    return source.count(b"\n"), len(source) - source.rfind(b"\n") - 1  # tree-sitter's (row, byte column) at the end


def _window(prefix: str, suffix: str) -> tuple[str, str]:
    """The prefix from the line WINDOW lines above the cursor, the suffix to the end of the line WINDOW lines below."""
    return prefix[line_start(prefix, len(prefix), WINDOW) :], suffix[: line_end(suffix, 0, WINDOW)]
