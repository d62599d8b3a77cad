import dataclasses
import os
import shutil

import pytest
import torch

from engine.config import PRESETS
from engine.engine import Engine
from engine.loader import random_model, save_checkpoint


def pytest_collection_modifyitems(config, items):
    """Tests marked `download` fetch from a registry: they run only when `-m` names them."""
    if "download" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="downloads; opt in with `pytest -m download`")
    for item in items:
        if "download" in item.keywords:
            item.add_marker(skip)


# .ci/run installs the editors' programs and sets this: there a missing one fails its tests.
REQUIRE_EDITORS = os.environ.get("LACUNA_REQUIRE_EDITORS") == "1"


def require_program(name: str, install: str) -> None:
    """Skip the test when the program `name` is not on PATH, saying how to install it; fail it
    instead under LACUNA_REQUIRE_EDITORS=1."""
    if shutil.which(name) is None:
        missing = f"{name} is not installed: {install}"
        pytest.fail(missing) if REQUIRE_EDITORS else pytest.skip(missing)


# A small Lacuna-family (Qwen2 blocks, shifted logits) and a Llama-family (LLaDA, unshifted) config.
QWEN2 = PRESETS["tiny"]
LLAMA = dataclasses.replace(PRESETS["tiny"], model_type="llada", qkv_bias=False, tie_embeddings=False)


@pytest.fixture(scope="session")
def tiny_causal_release(tmp_path_factory):
    """A tiny random causal Llama with the bundled model's tokenizer and special ids: what
    `lacuna train adapt` and the GPU job start from, small."""
    from tokenizers import Tokenizer

    from engine.config import ModelConfig
    from engine.loader import BUNDLED_DIR, LoadedModel, SpecialIds
    from engine.model import Transformer
    from engine.training.train import init_weights

    path = tmp_path_factory.mktemp("tiny-causal")
    model = Transformer(ModelConfig("llama_causal", 17696, 64, 128, 2, 4, 2, 16, 1024, rope_theta=100000.0,
                                    tie_embeddings=True))
    init_weights(model, seed=0)
    tokenizer = Tokenizer.from_file(str(BUNDLED_DIR / "tokenizer.json"))
    save_checkpoint(LoadedModel(model.eval(), tokenizer, SpecialIds(mask=16, eos=0, pad=0, bos=None), "tiny"), path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny random-weight checkpoints of both families, written in the Hugging Face layout."""
    paths = {}
    for name, config in (("lacuna", QWEN2), ("llada", LLAMA)):
        path = tmp_path_factory.mktemp(name)
        save_checkpoint(random_model(config, seed=1), path)
        paths[name] = path
    return paths


def constant_model(chars: str = "x"):
    """A tiny model whose weights make it predict `chars` everywhere, confidently: real model code
    with deterministic output, for end-to-end tests that need a visible, predictable suggestion.
    With several characters each is equally likely: greedy decoding writes the first, sampling a mix."""
    loaded = random_model(dataclasses.replace(QWEN2, tie_embeddings=False), seed=5)
    model = loaded.model
    tokens = [loaded.tokenizer.encode(char, add_special_tokens=False).ids[0] for char in chars]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0  # residual dimension 0 is a constant ...
        for layer in model.model.layers:  # ... that no layer writes to ...
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.model.norm.weight.zero_()  # ... and the only one the output layer reads.
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokens, 0] = 5.0
    return loaded


@pytest.fixture(scope="session")
def constant_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("constant")
    save_checkpoint(constant_model("x"), path)
    return path


@pytest.fixture(scope="session")
def two_choice_checkpoint(tmp_path_factory):
    """Predicts "a" or "b", equally: greedy "aaa...", sampled alternatives differ from it."""
    path = tmp_path_factory.mktemp("two-choice")
    save_checkpoint(constant_model("ab"), path)
    return path


@pytest.fixture(params=["lacuna", "llada"])
def family_engine(request):
    """A float64 engine per family: float64 keeps batching and padding from flipping argmaxes."""
    config = QWEN2 if request.param == "lacuna" else LLAMA
    engine = Engine(random_model(config, dtype=torch.float64, seed=2))
    yield engine
    engine.close()


@pytest.fixture
def engine():
    engine = Engine(random_model("tiny", dtype=torch.float64, seed=3))
    yield engine
    engine.close()


def chain_model(text: str):
    """A tiny model that writes `text[1:]` after `text[0]`: each character predicts the character
    that follows it in `text` (the last one predicts EOS), confidently, while a mask predicts
    nothing, so the infill is decoded left to right, one step a character. Real model code with a
    deterministic, multi-word, multi-line suggestion. A character's successor must be unique."""
    successors = dict(zip(text, text[1:]))
    if len(successors) != len(text) - 1 or text[-1] in successors:
        raise ValueError(f"each character of {text!r} must have one successor")
    loaded = random_model(dataclasses.replace(QWEN2, tie_embeddings=False), seed=5)
    model, tokenizer = loaded.model, loaded.tokenizer
    token = {ch: tokenizer.encode(ch, add_special_tokens=False).ids[0] for ch in text}
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()  # a mask, like any character not in `text`, is the zero vector
        for layer in model.model.layers:  # no layer writes to the residual stream ...
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)  # ... so the output layer reads each position's own token
        model.lm_head.weight.zero_()
        for dim, ch in enumerate(text):  # one residual dimension per character
            model.model.embed_tokens.weight[token[ch], dim] = 1.0
            model.lm_head.weight[token[successors[ch]] if ch in successors else loaded.special.eos, dim] = 3.0
    return loaded


# After a colon, two words, then an indented second line: for accepting a word or a line.
CHAIN_TEXT = ":ab cd\n\tef"


@pytest.fixture(scope="session")
def chain_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("chain")
    save_checkpoint(chain_model(CHAIN_TEXT), path)
    return path
