"""The autoregressive baseline decodes greedily, through its CUDA graphs or step by step."""

import pytest
import torch

from engine.bench.latency import Autoregressive
from engine.loader import random_model

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_autoregressive_baseline_is_greedy_causal_decoding(device):
    model = random_model("tiny", device=device, dtype=torch.float64, seed=11).model
    context = [(i * 37) % 256 for i in range(150)]
    expected = list(context)
    with torch.inference_mode():
        for _ in range(10):
            n = len(expected)
            ids, positions = torch.tensor([expected], device=device), torch.arange(n, device=device)[None]
            hidden = model(ids, positions, model.new_cache(1, n), causal=True)
            expected.append(int(model.logits(hidden[:, -1]).argmax()))
    assert Autoregressive(model, graphs=False)(context, 10) == expected[150:]
    assert Autoregressive(model, graphs=True)(context, 10) == expected[150:]


def test_bench_times_partial_windows_beside_full_ones():
    from engine.bench.latency import run
    from engine.engine import Engine

    loaded = random_model("tiny", seed=11)
    full, partial = Engine(loaded, warmup=False), Engine(loaded, warmup=False, full_windows=False)
    try:
        rows = run(full, shape="tiny", contexts=(64,), middles=(8,), samplers=("reference", "cached"), reps=1,
                   partial=partial)
    finally:
        full.close(), partial.close()
    assert [(r["sampler"], r.get("windows")) for r in rows] == [("reference", None), ("cached", "full"),
                                                                ("cached", "partial")]
    assert rows[2]["vs_full"] == pytest.approx(rows[2]["p50_ms"] / rows[1]["p50_ms"], abs=0.01)
