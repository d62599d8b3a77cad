"""The Helix configuration (editors/helix/languages.toml): Helix is not packaged for Debian, so
the file is checked as Helix reads it, and its options as the server reads them."""

import pathlib

import tomllib

from lsp.config import Options, update_options

LANGUAGES_TOML = pathlib.Path(__file__).parent.parent / "editors" / "helix" / "languages.toml"
LANGUAGES = {"python", "javascript", "typescript", "go", "rust", "java", "c", "cpp"}


def test_languages_toml_starts_lacuna_for_each_language():
    config = tomllib.loads(LANGUAGES_TOML.read_text())
    server = config["language-server"]["lacuna"]
    assert server["command"] == "lacuna" and server["args"] == ["serve"]
    # `config` is what Helix sends as initializationOptions: every key a server option
    assert update_options(Options(), server["config"])[1] == []
    languages = {language["name"]: language for language in config["language"]}
    assert set(languages) == LANGUAGES
    for language in languages.values():
        assert "lacuna" in language["language-servers"]
