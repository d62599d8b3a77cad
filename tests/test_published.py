"""Each open family's published layout (tests/published.py) loads, infills through `Engine` and
`lacuna complete` with the family's logit shift and layout, and what the engine cannot run is
refused at load with one message."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from published import HEADS, SUPPORTED, llada, unsupported

from engine.api import DecodeOptions
from engine.config import CheckpointError
from engine.engine import Engine
from engine.loader import load_checkpoint
from lsp.cli import main


@pytest.fixture(scope="module", params=list(SUPPORTED))
def published(request, tmp_path_factory):
    name = request.param
    writer, model_type, shift, lead, tail = SUPPORTED[name]
    return name, writer(tmp_path_factory.mktemp(name)), model_type, shift, lead, tail


def test_loads_with_the_family_s_special_ids_and_infills(published):
    name, directory, model_type, shift, lead, tail = published
    loaded = load_checkpoint(directory)
    config, tokenizer, special = loaded.model.config, loaded.tokenizer, loaded.special
    assert (config.model_type, config.family.logit_shift) == (model_type, shift)
    assert tokenizer.id_to_token(special.mask) in ("<|mask|>", "<|mdm_mask|>", "<M>")
    assert tokenizer.token_to_id("<|endoftext|>") in special.stop_ids
    # Embedding rows beyond the tokenizer are never predicted.
    assert set(range(tokenizer.get_vocab_size(), config.vocab_size)) <= set(special.banned)
    engine = Engine(loaded, warmup=False)
    try:
        prefix, suffix = engine.encode("def add(a, b):\n    return "), engine.encode("\n")
        tokens = engine.layout(prefix, suffix, 3).tokens
        assert [tokenizer.id_to_token(t) for t in tokens[:len(lead)]] == lead
        assert tokens[len(lead):] == prefix + [special.mask] * 3 + suffix + [tokenizer.token_to_id(t) for t in tail]
        [completion] = engine.complete("def add(a, b):\n    return ", "\n", 4, options=DecodeOptions(policy="steps"))
        assert completion.steps >= 1 and completion.finish_reason in ("stop", "length")
    finally:
        engine.close()


def test_requests_decode_in_the_family_s_own_order_unless_they_name_one(published):
    """Dream's, DiffuCoder's and CoDA's authors unmask by entropy, LLaDA's and Open-dCoder's by confidence."""
    name, directory, model_type, *_ = published
    engine = Engine(load_checkpoint(directory), warmup=False)
    try:
        own = engine.submit("def f():\n    return ", "\n", 2)
        named = engine.submit("x = ", "\n", 2, options=DecodeOptions(ordering="margin"))
        own.result(), named.result()
        assert own.denoiser.options.ordering == ("entropy" if model_type in ("dream", "coda") else "confidence")
        assert named.denoiser.options.ordering == "margin"
    finally:
        engine.close()


def test_lacuna_complete_runs_on_the_published_layout(published, tmp_path, capsys):
    name, directory, *_ = published
    source = tmp_path / "f.py"
    source.write_text("def add(a, b):\n    return \n")
    assert main(["complete", str(source), "--line", "1", "--character", "11", "--tokens", "4", "--json",
                 "--model", str(directory)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"text", "steps", "latency_ms"} <= set(result)


def test_the_family_s_own_tokens_end_or_never_appear(tmp_path):
    from published import diffucoder, dreamon

    diffu = load_checkpoint(diffucoder(tmp_path / "diffucoder"))
    assert diffu.tokenizer.token_to_id("<|dlm_pad|>") in diffu.special.stop_ids
    on = load_checkpoint(dreamon(tmp_path / "dreamon"))
    assert on.tokenizer.token_to_id("<|expand|>") in on.special.banned
    lla = load_checkpoint(llada(tmp_path / "llada"))
    assert lla.tokenizer.token_to_id("<|eot_id|>") in lla.special.stop_ids


def _rms(x, weight, eps):
    return weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, theta):
    """Rotate-half RoPE at positions 0..T-1, as LLaDA's RotaryEmbedding computes it."""
    dim, length = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    freqs = torch.outer(torch.arange(length).float(), inv_freq)
    positions = torch.cat((freqs, freqs), dim=-1)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
    return x * positions.cos() + torch.cat((-x2, x1), dim=-1) * positions.sin()


def llada_reference(weights: dict, config: dict, ids: torch.Tensor) -> torch.Tensor:
    """LLaDA's forward written from its modeling_llada.py (LLaDALlamaBlock), on its own weight names."""
    t, eps, heads = "model.transformer.", config["rms_norm_eps"], config["n_heads"]
    x = weights[f"{t}wte.weight"][ids]
    for i in range(config["n_layers"]):
        b = f"{t}blocks.{i}."
        h = _rms(x, weights[f"{b}attn_norm.weight"], eps)
        q, k, v = (F.linear(h, weights[f"{b}{n}_proj.weight"]) for n in "qkv")
        q, k, v = (z.view(1, -1, heads, z.shape[-1] // heads).transpose(1, 2) for z in (q, k, v))
        q, k = _rope(q, config["rope_theta"]), _rope(k, config["rope_theta"])
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        x = x + F.linear(attention.transpose(1, 2).reshape(1, -1, config["d_model"]), weights[f"{b}attn_out.weight"])
        h = _rms(x, weights[f"{b}ff_norm.weight"], eps)
        h = F.silu(F.linear(h, weights[f"{b}ff_proj.weight"])) * F.linear(h, weights[f"{b}up_proj.weight"])
        x = x + F.linear(h, weights[f"{b}ff_out.weight"])
    return F.linear(_rms(x, weights[f"{t}ln_f.weight"], eps), weights[f"{t}ff_out.weight"])


def test_llada_s_published_names_compute_llada_s_forward(tmp_path):
    from safetensors.torch import load_file

    directory = llada(tmp_path / "llada")
    config = json.loads((directory / "config.json").read_text())
    assert config["d_model"] % HEADS == 0
    loaded = load_checkpoint(directory)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    expected = llada_reference(load_file(directory / "model.safetensors"), config, ids)
    with torch.no_grad():
        hidden = loaded.model(ids, torch.arange(24)[None], None)
        got = loaded.model.logits(hidden)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert math.isclose(loaded.model.config.rope_theta, 500000.0)


@pytest.mark.parametrize("kind, names", [
    ("fast-dllm-v2", ["Fast-dLLM v2", "block-diffusion"]),
    ("sdar", ["SDAR", "block-diffusion"]),
    ("llada-moe", ["LLaDA-MoE", "mixture of experts"]),
])
def test_a_family_the_engine_cannot_run_is_refused_at_load_by_name(tmp_path, kind, names):
    with pytest.raises(CheckpointError, match="unsupported model") as refused:
        load_checkpoint(unsupported(tmp_path / kind, kind))
    assert all(name in str(refused.value) for name in names)


@pytest.mark.parametrize("key, value", [("block_type", "sequential"), ("layer_norm_type", "default"),
                                        ("alibi", True), ("include_qkv_bias", True), ("attention_layer_norm", True)])
def test_a_llada_config_this_engine_cannot_run_names_the_key(tmp_path, key, value):
    directory = llada(tmp_path / "llada")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(CheckpointError, match=key):
        load_checkpoint(directory)


def test_a_missing_mask_is_named_with_the_family_s_convention(tmp_path):
    directory = llada(tmp_path / "llada")
    config = json.loads((directory / "config.json").read_text())
    del config["mask_token_id"]
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "<|mdm_mask|>"]
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(CheckpointError, match=r"LLaDA checkpoints give mask_token_id in config.json \(<\|mdm_mask"):
        load_checkpoint(directory)


def test_a_family_trained_on_whole_documents_gets_the_cursor_s_token_healed(tmp_path):
    from published import dream_coder

    engine = Engine(load_checkpoint(dream_coder(tmp_path / "dream")), warmup=False)
    try:
        prefix = "def add(a, b):\n    return "
        request = engine.submit(prefix, "\n", 6, options=DecodeOptions(policy="steps"))
        [completion] = request.result(timeout=60)
        assert request.healed == " " and engine.encode(prefix)[-1] == engine.encode(" ")[0]
        first = engine.tokenizer.decode(completion.token_ids[:1])
        assert first.startswith(" ")  # the space given back, and what follows it in the same token
        assert completion.text == engine.tokenizer.decode(completion.token_ids)[1:]
        # The layout: the prefix without its last token, then the masks.
        without = engine.encode(prefix)[:-1]
        assert request.denoiser.x[0, :request.denoiser.start].tolist()[-len(without):] == without
    finally:
        engine.close()


def test_lacuna_s_own_models_are_not_healed(tmp_path):
    from engine.loader import random_model

    engine = Engine(random_model("tiny"), warmup=False)
    try:
        request = engine.submit("x = ", "\n", 4)
        request.result(timeout=60)
        assert request.healed == ""
    finally:
        engine.close()
