"""Protocol items (inline and completion-menu) from candidates, without a server."""

from lsp.document import Document
from lsp.items import ACCEPTED, LABEL_CHARS, completion_items, inline_items, word_start
from lsp.postprocess import Candidate


def test_word_start():
    assert word_start("x = foo_bar", 11) == 4
    assert word_start("x = (", 5) == 5
    assert word_start("émile", 5) == 0


def test_inline_items_replace_the_auto_closed_suffix():
    doc = Document("file:///a.py", "print(\n", "python")
    found = [Candidate("'hi')", replace_suffix=0), Candidate("x", replace_suffix=0)]
    items = inline_items(doc, 6, found, "utf-16").items
    assert [i.insert_text for i in items] == ["'hi')", "x"]
    assert items[0].range.start.character == items[0].range.end.character == 6
    assert items[0].command.command == ACCEPTED and items[0].command.arguments == ["file:///a.py"]
    doc = Document("file:///b.py", "print()\n", "python")
    item = inline_items(doc, 6, [Candidate("'hi')", replace_suffix=1)], "utf-16").items[0]
    assert (item.range.start.character, item.range.end.character) == (6, 7)


def test_completion_items_start_at_the_word_and_label_the_first_line():
    doc = Document("file:///a.py", "value = compu\n", "python")
    long = "te_" + "x" * 60 + "()\nmore"
    items = completion_items(doc, 13, [Candidate("te()"), Candidate(long)], "utf-16").items
    assert items[0].label == "compute()" and items[0].text_edit.new_text == "compute()"
    assert items[0].text_edit.range.start.character == 8
    assert len(items[1].label) == LABEL_CHARS and items[1].label.endswith("…")
