"""The model Lacuna ships (engine/bundled): small enough to ship, loaded by default, and a real
infill model (its tokenizer matches it; it fills code with code)."""

import json

import pytest
import torch

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
