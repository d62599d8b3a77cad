"""CUDA paths: graph replays give what eager forwards give. Runs where a CUDA GPU is present."""

import copy

import pytest
import torch

from engine.bench import Autoregressive
from engine.loader import random_model
from engine.runner import Engine
from engine.sampler import DecodeOptions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PREFIX = "def mean(values):\n    total = sum(values)\n    return "
SUFFIX = "\n\n\nprint(mean([1, 2, 3]))\n"


def test_graphed_engine_matches_eager():
    # float64 so that the graphs' masked attention kernel cannot flip an argmax.
    loaded = random_model("tiny", device="cuda", dtype=torch.float64, seed=3)
    graphed, eager = Engine(loaded, cuda_graphs=True), Engine(loaded, cuda_graphs=False)
    try:
        for options in (DecodeOptions(policy="fixed", tokens_per_step=3), DecodeOptions(policy="steps", steps=6),
                        DecodeOptions(policy="steps", refresh_every=3)):
            for prefix, n in ((PREFIX, 24), ("x" * 300 + PREFIX, 24), ("", 5)):
                got = graphed.complete(prefix, SUFFIX, n, n=2, options=options)
                want = eager.complete(prefix, SUFFIX, n, n=2, options=options)
                assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert graphed._graphs and not eager._graphs
        # Concurrent requests step together eagerly, then alone through a graph.
        requests = [graphed.submit("y" * i + PREFIX, SUFFIX, 16 + i) for i in range(4)]
        results = [r.result(timeout=60)[0].token_ids for r in requests]
        assert results == [eager.complete("y" * i + PREFIX, SUFFIX, 16 + i)[0].token_ids for i in range(4)]
    finally:
        graphed.close()
        eager.close()


def test_graphed_autoregressive_baseline_matches_cpu():
    loaded = random_model("tiny", device="cuda", dtype=torch.float64, seed=4)
    on_cpu = copy.deepcopy(loaded.model).cpu()
    context = list(range(40, 240))
    assert Autoregressive(loaded.model)(context, 12) == Autoregressive(on_cpu)(context, 12)
