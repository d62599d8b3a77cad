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
