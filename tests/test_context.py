"""Where and how much to complete, and what context the model sees, on real snippets."""

import pytest

from lsp.config import Options, update_options
from lsp.context import Outlines, build_context
from lsp.document import Document
from lsp.span import Span, plan_span


def at(source: str, language: str = "python", **options):
    """plan_span at the `|` in `source`."""
    offset = source.index("|")
    doc = Document("file:///t", source.replace("|", ""), language)
    return plan_span(doc, offset, Options(**options))


BLOCK, LINE = Span(True, 64, block_indent=1), Span(False, 21)  # a block opened at column 0 ends at a line there


@pytest.mark.parametrize("source, language, expected", [
    ("def f(x):|", "python", BLOCK),  # a line ending in ':'
    ("def f(x):\n    |", "python", BLOCK),  # an empty function body
    ("for item in items:\n    |\n", "python", BLOCK),
    ("function f() {\n  |\n}", "javascript", BLOCK),
    ("if (ready) {|", "javascript", BLOCK),
    ("fn main() {\n    |\n}", "rust", BLOCK),
    # Opened by an indented line: a line back at its indentation, or less, leaves the block.
    ("class A:\n    def f(self):\n        |", "python", Span(True, 64, block_indent=5)),
    ("class A:\n    def f(self):|", "python", Span(True, 64, block_indent=5)),
    ("func f() {\n\tif ok {\n\t\t|\n\t}\n}", "go", Span(True, 64, block_indent=2)),
    ("total = compute(|)", "python", LINE),  # text to the right: one line
    ("total = |", "python", LINE),
    ("x = fo|o", "python", None),  # inside a word with more of it to the right
    ("x = foo|", "python", LINE),
    ('x = "ab|c"', "python", None),  # inside a string
    ("# a note |", "python", None),  # inside a comment
    ("// a note |", "go", None),
    ('s = "done"|', "python", LINE),  # right after a closed string
    ('print(f"Hello {|}")', "python", LINE),  # code in a string: an f-string's field
    ('print(f"Hello {user.|}")', "python", LINE),
    ('print(f"Hello {user}|")', "python", None),  # after the field: the string again
    ("const s = `Hello, ${|}`;", "typescript", LINE),  # a template's substitution
    ("const s = `Hello, ${user.|}`;", "javascript", LINE),
    ("const s = `Hello, |`;", "javascript", None),
    ("some prose |", "plaintext", LINE),
])
def test_span_decisions(source, language, expected):
    assert at(source, language) == expected


def test_span_options():
    assert at("# a note |", complete_in_comments=True) == LINE
    assert at('x = "ab |"', complete_in_strings=True) == LINE
    assert at("def f(x):|", multiline=False) == LINE
    assert at("def f(x):|", max_tokens=30) == Span(True, 30, block_indent=1)


def test_context_puts_outside_definitions_headers_and_imports_before_the_window():
    helper = Document("file:///util.py", "import os\n\ndef scale(value: float, factor: float) -> float:\n"
                      "    return value * factor\n", "python")
    source = ("import math\n\nclass Shape:\n    def area(self, size):\n" + "        pass\n" * 300
              + "        return scale(size, |)\n")
    offset = source.index("|")
    doc = Document("file:///shape.py", source.replace("|", ""), "python")
    context = build_context(doc, offset, [doc, helper], Outlines(), prefix_tokens=40, suffix_tokens=10,
                            context_tokens=100)
    head = context.prefix.split("        pass\n", 1)[0]
    assert head.index("def scale(value: float, factor: float) -> float:") < head.index("class Shape:")
    assert head.index("    def area(self, size):") < head.index("import math")
    assert context.prefix.endswith("        return scale(size, ")
    assert context.suffix == ")\n"
    # Within the budget and never repeating what the windows already hold.
    small = build_context(doc, offset, [doc, helper], Outlines(), prefix_tokens=40, context_tokens=5)
    assert small.prefix.split("        pass", 1)[0] == "class Shape:\n"


def test_context_of_plain_text_is_the_windows():
    doc = Document("file:///n.txt", "a\nb\nc", None)
    context = build_context(doc, 3, [doc], Outlines())
    assert (context.prefix, context.suffix) == ("a\nb", "\nc")


def test_options_from_camel_case_with_bad_values_kept_at_default():
    options, errors = update_options(Options(), {
        "maxTokens": 32, "multiline": False, "enabledLanguages": ["python"], "engineUrl": "http://127.0.0.1:8765",
        "candidates": 100, "debounceMs": 1.5, "device": "gpu", "modelDir": 3, "colour": "blue"})
    assert (options.max_tokens, options.multiline, options.enabled_languages) == (32, False, ["python"])
    assert options.engine_url == "http://127.0.0.1:8765"
    assert (options.candidates, options.debounce_ms, options.device, options.model_dir) == (1, 0, None, None)
    assert len(errors) == 5 and any("colour" in e for e in errors)
    assert update_options(options, ["not", "an", "object"])[1]
    assert not options.language_enabled("go") and options.language_enabled("python")
