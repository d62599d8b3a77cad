"""Documents under random incremental edits: text as the client has it, tree as a fresh parse."""

from hypothesis import given, settings
from hypothesis import strategies as st

from lsp.document import Document, units

PIECES = ["", "x", "def f(a):\n", "    return a\n", "(", ")", "{", "}", "\r\n", "😀", "é", '"', "#", "\n", "  "]


def client_apply(text: str, start: tuple[int, int], end: tuple[int, int], new: str, encoding: str) -> str:
    """The client's side of an edit, written independently of Document: LSP positions in code
    units of `encoding`, clamped to the line's content ('\\n' or '\\r\\n' end it)."""
    lines = text.split("\n")

    def index(line, character):
        if line >= len(lines):
            return len(text)
        base = sum(len(part) + 1 for part in lines[:line])
        content = lines[line][:-1] if line < len(lines) - 1 and lines[line].endswith("\r") else lines[line]
        count = 0
        for i, ch in enumerate(content):
            if count >= character:
                return base + i
            count += units(ch, encoding)
        return base + len(content)

    a = index(*start)
    b = max(a, index(*end))
    return text[:a] + new + text[b:]


positions = st.tuples(st.integers(0, 12), st.integers(0, 30))


@settings(max_examples=60, deadline=None)
@given(start_text=st.lists(st.sampled_from(PIECES), max_size=20).map("".join),
       edits=st.lists(st.tuples(positions, positions, st.lists(st.sampled_from(PIECES), max_size=3).map("".join)),
                      max_size=25),
       language=st.sampled_from(["python", "javascript", "rust", "plaintext"]),
       encoding=st.sampled_from(["utf-16", "utf-8", "utf-32"]))
def test_random_edits_keep_text_and_tree_in_step(start_text, edits, language, encoding):
    doc = Document("file:///t", start_text, language)
    expected = start_text
    for i, (start, end, new) in enumerate(edits):
        if end < start:
            start, end = end, start
        doc.apply_change(start, end, new, encoding)
        expected = client_apply(expected, start, end, new, encoding)
        assert doc.text == expected
        if i % 4 == 0:
            doc.reparse()  # interleave parses with edits, as the server does
    if doc.parser is not None:
        fresh = doc.parser.parse(expected.encode("utf-8", "surrogatepass"))
        assert str(doc.tree.root_node) == str(fresh.root_node)


def test_positions_past_the_end_clamp():
    doc = Document("file:///t", "ab\ncd", None)
    assert doc.offset(0, 99) == 2
    assert doc.offset(7, 0) == len(doc.text)
    assert doc.position(len(doc.text)) == (1, 2)


def test_big_documents_and_long_lines():
    text = ("x = 1\n" * 200_000) + "y" * 100_000
    doc = Document("file:///big.py", text, "python")
    doc.apply_change((200_000, 100_000), (200_000, 100_000), " = 2\n")
    assert doc.text.endswith("y = 2\n")
    assert not doc.tree.root_node.has_error
