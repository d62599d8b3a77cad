"""The autoregressive baseline decodes greedily, chunked as its CUDA graphs are or step by step."""

import torch

from engine.bench import Autoregressive
from engine.loader import random_model


def test_autoregressive_baseline_is_greedy_causal_decoding():
    model = random_model("tiny", dtype=torch.float64, seed=11).model
    context = [(i * 37) % 256 for i in range(150)]
    expected = list(context)
    with torch.inference_mode():
        for _ in range(10):
            n = len(expected)
            hidden = model(torch.tensor([expected]), torch.arange(n)[None], model.new_cache(1, n), causal=True)
            expected.append(int(model.logits(hidden[:, -1]).argmax()))
    assert Autoregressive(model, graphs=False)(context, 10) == expected[150:]
    assert Autoregressive(model, graphs=True)(context, 10) == expected[150:]
