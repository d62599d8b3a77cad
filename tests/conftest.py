"""The suite's fixtures. Free of torch, so that the editor side's tests run without it: the models
they build come from tests/models.py, imported where a fixture needs one."""

import os
import shutil

import pytest


def needs_torch() -> None:
    """Skip a test whose fixture builds a model, where torch is not installed (the editor side's
    own tests run without it)."""
    pytest.importorskip("torch", reason="builds a model: pip install torch==2.13.0 -e '.[test]'")


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


@pytest.fixture(scope="session")
def tiny_causal_release(tmp_path_factory):
    """A tiny random causal Llama with the bundled model's tokenizer and special ids: what
    `lacuna train adapt` and the GPU job start from, small."""
    needs_torch()
    from models import tiny_causal_release

    return tiny_causal_release(tmp_path_factory.mktemp("tiny-causal"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny random-weight checkpoints of both families, written in the Hugging Face layout."""
    needs_torch()
    from models import LLAMA, QWEN2

    from engine.loader import random_model, save_checkpoint

    paths = {}
    for name, config in (("lacuna", QWEN2), ("llada", LLAMA)):
        path = tmp_path_factory.mktemp(name)
        save_checkpoint(random_model(config, seed=1), path)
        paths[name] = path
    return paths


@pytest.fixture(scope="session")
def constant_checkpoint(tmp_path_factory):
    needs_torch()
    from models import constant_model

    from engine.loader import save_checkpoint

    path = tmp_path_factory.mktemp("constant")
    save_checkpoint(constant_model("x"), path)
    return path


@pytest.fixture(scope="session")
def two_choice_checkpoint(tmp_path_factory):
    """Predicts "a" or "b", equally: greedy "aaa...", sampled alternatives differ from it."""
    needs_torch()
    from models import constant_model

    from engine.loader import save_checkpoint

    path = tmp_path_factory.mktemp("two-choice")
    save_checkpoint(constant_model("ab"), path)
    return path


@pytest.fixture(params=["lacuna", "llada"])
def family_engine(request):
    """A float64 engine per family: float64 keeps batching and padding from flipping argmaxes."""
    needs_torch()
    import torch
    from models import LLAMA, QWEN2

    from engine.engine import Engine
    from engine.loader import random_model

    config = QWEN2 if request.param == "lacuna" else LLAMA
    engine = Engine(random_model(config, dtype=torch.float64, seed=2))
    yield engine
    engine.close()


@pytest.fixture
def engine():
    needs_torch()
    import torch

    from engine.engine import Engine
    from engine.loader import random_model

    engine = Engine(random_model("tiny", dtype=torch.float64, seed=3))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def chain_checkpoint(tmp_path_factory):
    needs_torch()
    from models import CHAIN_TEXT, chain_model

    from engine.loader import save_checkpoint

    path = tmp_path_factory.mktemp("chain")
    save_checkpoint(chain_model(CHAIN_TEXT), path)
    return path
