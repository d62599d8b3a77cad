import dataclasses

import pytest
import torch

from engine.config import SHAPES
from engine.loader import random_model, save_checkpoint
from engine.runner import Engine

# A small Qwen2-family (shifted logits) and a Llama-family (LLaDA, unshifted) config.
QWEN2 = SHAPES["tiny"]
LLAMA = dataclasses.replace(SHAPES["tiny"], model_type="llada", qkv_bias=False, tie_embeddings=False)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny random-weight checkpoints of both families, written in the Hugging Face layout."""
    paths = {}
    for name, config in (("qwen2", QWEN2), ("llada", LLAMA)):
        path = tmp_path_factory.mktemp(name)
        save_checkpoint(random_model(config, seed=1), path)
        paths[name] = path
    return paths


def constant_model(char: str = "x"):
    """A tiny model whose weights make it predict `char` everywhere, confidently: real model code
    with deterministic output, for end-to-end tests that need a visible, predictable suggestion."""
    loaded = random_model(dataclasses.replace(QWEN2, tie_embeddings=False), seed=5)
    model, token = loaded.model, loaded.tokenizer.encode(char, add_special_tokens=False).ids[0]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0  # residual dimension 0 is a constant ...
        for layer in model.model.layers:  # ... that no layer writes to ...
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.model.norm.weight.zero_()  # ... and the only one the output layer reads.
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[token, 0] = 5.0
    return loaded


@pytest.fixture(scope="session")
def constant_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("constant")
    save_checkpoint(constant_model("x"), path)
    return path


@pytest.fixture(params=["qwen2", "llada"])
def family_engine(request):
    """A float64 engine per family: float64 keeps batching and padding from flipping argmaxes."""
    config = QWEN2 if request.param == "qwen2" else LLAMA
    engine = Engine(random_model(config, dtype=torch.float64, seed=2))
    yield engine
    engine.close()


@pytest.fixture
def engine():
    engine = Engine(random_model("tiny", dtype=torch.float64, seed=3))
    yield engine
    engine.close()
