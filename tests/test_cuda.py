"""CUDA paths: captured graph replays give what eager forwards give. Runs where a GPU is."""

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


@pytest.mark.parametrize("options", [
    DecodeOptions(policy="fixed", tokens_per_step=3),
    DecodeOptions(policy="steps", steps=6, refresh_every=3),
    DecodeOptions(policy="threshold", threshold=0.005),
])
def test_captured_graphs_match_eager(options):
    # float64, so that different attention kernels cannot flip an argmax.
    loaded = random_model("tiny", device="cuda", dtype=torch.float64, seed=3)
    graphed, eager = Engine(loaded), Engine(loaded, cuda_graphs=False, full_windows=True)
    try:
        assert graphed.cuda_graphs
        for prefix, n in ((PREFIX, 24), ("x" * 300 + PREFIX, 24), ("", 5)):
            got = graphed.complete(prefix, SUFFIX, n, n=2, options=options)
            want = eager.complete(prefix, SUFFIX, n, n=2, options=options)
            assert [(c.token_ids, c.steps) for c in got] == [(c.token_ids, c.steps) for c in want]
        assert all(g.replay.graph is not None for g in graphed._graphs.values())
        requests = [graphed.submit("y" * i + PREFIX, SUFFIX, 16 + i, options=options) for i in range(4)]
        got = [r.result(timeout=60)[0].token_ids for r in requests]
        assert got == [eager.complete("y" * i + PREFIX, SUFFIX, 16 + i, options=options)[0].token_ids
                       for i in range(4)]
    finally:
        graphed.close()
        eager.close()


def test_captured_autoregressive_baseline_matches_cpu():
    loaded = random_model("tiny", device="cuda", dtype=torch.float64, seed=4)
    on_cpu = copy.deepcopy(loaded.model).cpu()
    context = [(i * 37) % 256 for i in range(200)]
    assert Autoregressive(loaded.model)(context, 13) == Autoregressive(on_cpu, graphs=False)(context, 13)
