"""The model Lacuna ships (engine/bundled): small enough to ship, loaded by default, and a real
infill model (its tokenizer matches it; it fills code with code)."""

import json

import pytest
import torch

from engine.api import DecodeOptions, leaves_block
from engine.config import CheckpointError
from engine.engine import Engine
from engine.loader import BUNDLED_DIR, load_checkpoint

MB = 2**20


def test_it_ships_within_the_size_limits():
    weights = list(BUNDLED_DIR.glob("*.safetensors"))
    assert weights and all(p.stat().st_size <= 16 * MB for p in weights)
    assert sum(p.stat().st_size for p in BUNDLED_DIR.iterdir()) <= 64 * MB
    assert (BUNDLED_DIR / "README.md").read_text().startswith("# ")  # the model card


def test_it_is_the_default_model():
    engine = Engine.load(device="cpu", warmup=False)
    try:
        assert engine.loaded.name == "bundled" and not engine.loaded.random_weights
        config = json.loads((BUNDLED_DIR / "config.json").read_text())
        assert engine.tokenizer.get_vocab_size() <= config["vocab_size"]
        # A function body after its signature: the infill is Python that reads the argument.
        text = engine.complete("def double(x):\n    return ", "\n", 8)[0].text
        assert text.strip() and "\ufffd" not in text
    finally:
        engine.close()


def test_a_truncated_copy_is_refused_clearly(tmp_path):
    for item in BUNDLED_DIR.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    shard = next(tmp_path.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        load_checkpoint(tmp_path, "cpu", torch.float32)


def test_after_an_indentation_the_line_comes_at_the_cursor_not_deeper():
    """The cursor on a line holding only its indentation: the model's tokens hold an indentation of
    four as a line break and three spaces, then ` return`. Healing that gives the line break and the
    four spaces back lets the first token take the three and the second start with the last space;
    with only tokens that start with all four allowed, the model wrote a deeper indentation."""
    engine = Engine.load(device="cpu", warmup=False)
    options = DecodeOptions(min_tokens=1, single_line=True)
    try:
        for prefix in ['def area(r):\n    """The area of a circle of radius r."""\n    ',
                       "def f(n):\n    for i in range(n):\n        if i % 3 == 0:\n            print(i)\n"
                       "        elif i % 5 == 0:\n            ",
                       "func main() {\n\tfor i := 0; i < 3; i++ {\n\t\t"]:
            [completion] = engine.complete(prefix, "\n", 16, options=options)
            assert completion.text.strip() and not completion.text[0].isspace(), completion.text
    finally:
        engine.close()


def test_a_block_ends_where_its_indentation_does():
    """With `block_indent`, a multi-line infill stops after the first whole line that leaves the
    block, and the text is the same as far as that line: fewer steps, the same suggestion."""
    engine = Engine.load(device="cpu", warmup=False)
    prefix = "def total(prices):\n    result = 0\n    for price in prices:\n        "
    try:
        [full] = engine.complete(prefix, "", 64, options=DecodeOptions())
        [ended] = engine.complete(prefix, "", 64, options=DecodeOptions(block_indent=5))
    finally:
        engine.close()
    assert leaves_block(ended.text, 5) and not leaves_block(ended.text.rpartition("\n")[0], 5), ended.text
    assert full.text.startswith(ended.text) and len(full.text) > len(ended.text)
    assert ended.steps < full.steps
