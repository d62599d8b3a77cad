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
