"""Tree-sitter grammars by LSP languageId, from the grammar wheels on PyPI (offline).

Languages without a grammar here are completed as plain text.
"""

from __future__ import annotations

import functools
import importlib

from tree_sitter import Language, Parser

# languageId -> (module, function returning the grammar)
GRAMMARS = {
    "python": ("tree_sitter_python", "language"),
    "javascript": ("tree_sitter_javascript", "language"),
    "javascriptreact": ("tree_sitter_javascript", "language"),
    "typescript": ("tree_sitter_typescript", "language_typescript"),
    "typescriptreact": ("tree_sitter_typescript", "language_tsx"),
    "go": ("tree_sitter_go", "language"),
    "rust": ("tree_sitter_rust", "language"),
    "java": ("tree_sitter_java", "language"),
    "c": ("tree_sitter_c", "language"),
    "cpp": ("tree_sitter_cpp", "language"),
}


@functools.cache
def grammar(language_id: str | None) -> Language | None:
    """The grammar for a languageId, or None for plain text."""
    if language_id not in GRAMMARS:
        return None
    module, function = GRAMMARS[language_id]
    return Language(getattr(importlib.import_module(module), function)())


def parser(language_id: str | None) -> Parser | None:
    language = grammar(language_id)
    return Parser(language) if language is not None else None
