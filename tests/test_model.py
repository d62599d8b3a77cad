"""Our transformer against transformers' Qwen2, Llama and Qwen3 (CoDA's layers) run bidirectionally."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from engine.config import ModelConfig
from engine.model import Transformer

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
CASES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2-untied": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    "llama-llama3-rope": (LlamaConfig, LlamaForCausalLM, dict(
        tie_word_embeddings=False, rope_theta=5e5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-linear-rope-bias": (LlamaConfig, LlamaForCausalLM, dict(
        attention_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # CoDA's network is Qwen3's (q/k norms, no biases) with its own model_type.
    "coda-qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(tie_word_embeddings=False, head_dim=24, rope_theta=1e6)),
}


def pair(case):
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(0)
    hf = model_cls._from_config(config_cls(**COMMON, **extra), dtype=torch.float32).eval()
    config = hf.config.to_dict()
    if config_cls is Qwen3Config:
        config["model_type"] = "CoDA"
    ours = Transformer(ModelConfig.from_hf(config)).eval()
    ours.load_state_dict(hf.state_dict(), strict=not ours.config.tie_embeddings)
    return hf, ours


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_bidirectional(case):
    hf, ours = pair(case)
    ids = torch.randint(0, 300, (2, 50))
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=torch.zeros(2, 1, 50, 50)).logits
        causal = hf(input_ids=ids).logits
        got = ours.logits(ours(ids, torch.arange(50).expand(2, -1), ours.new_cache(2, 50)))
    assert (got - expected).abs().max() < 1e-4
    assert (got - causal).abs().max() > 1e-3  # the comparison would catch a causal mask


def test_causal_mode_matches_transformers_causal():
    hf, ours = pair("qwen2")
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours.logits(ours(ids, torch.arange(40)[None], ours.new_cache(1, 40), causal=True))
        last = ours.logits(ours(ids, torch.arange(40)[None], ours.new_cache(1, 40), causal=True,
                                rows=torch.tensor([39])))
    assert (got - expected).abs().max() < 1e-4
    assert (last[0, 0] - expected[0, 39]).abs().max() < 1e-4


def test_cached_window_matches_full_forward():
    """A forward of a few positions against cached keys equals the full forward there."""
    _, ours = pair("llama-llama3-rope")
    ids = torch.randint(0, 300, (1, 60))
    positions = torch.arange(60)[None]
    with torch.no_grad():
        full = ours.logits(ours(ids, positions, ours.new_cache(1, 60)))
        cache = ours.new_cache(1, 60)
        ours(ids, positions, cache)
        window = torch.tensor([[20, 21, 22, 40]])
        got = ours.logits(ours(ids.gather(1, window), window, cache))
        rows = ours.logits(ours(ids, positions, ours.new_cache(1, 60), rows=window[0]))
    assert (got[0] - full[0, window[0]]).abs().max() < 1e-4
    assert (rows[0] - full[0, window[0]]).abs().max() < 1e-4


@pytest.mark.parametrize("model_type, shift", [("qwen2", 1), ("dream", 1), ("llama", 0), ("llada", 0)])
def test_family_logit_shift(model_type, shift):
    config = ModelConfig.from_hf({**Qwen2Config(**COMMON).to_dict(), "model_type": model_type})
    assert config.family.logit_shift == shift


@pytest.mark.parametrize("case", CASES)
def test_parameter_count(case):
    hf, ours = pair(case)
    assert ours.config.parameters == sum(p.numel() for p in ours.parameters()) == hf.num_parameters()
