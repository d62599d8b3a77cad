"""Checkpoint directories: what loads, and the one clear error for each thing that is wrong."""

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from engine.config import CheckpointError
from engine.engine import Engine
from engine.loader import byte_tokenizer, load_checkpoint, random_model, save_checkpoint
from engine.model import CONTEXT_ROWS
from engine.packed import GROUP, Int4Linear, native_bfloat16, pack, unpack
from engine.quantize import quantize_int8


def logits(loaded, ids):
    model = loaded.model
    with torch.no_grad():
        return model.logits(model(ids, torch.arange(ids.shape[1])[None], model.new_cache(1, ids.shape[1])))


@pytest.mark.parametrize("family", ["lacuna", "llada"])
def test_roundtrip_gives_the_same_model(checkpoints, family):
    loaded = load_checkpoint(checkpoints[family])
    assert loaded.model.config.model_type == family
    assert loaded.special.mask == loaded.tokenizer.token_to_id("<|mask|>")
    assert loaded.special.bos == loaded.tokenizer.token_to_id("<|beginoftext|>")
    again = load_checkpoint(checkpoints[family])
    ids = torch.randint(0, 256, (1, 20))
    assert torch.equal(logits(loaded, ids), logits(again, ids))


def test_sharded_checkpoint_loads(tmp_path):
    original = random_model("tiny", seed=5)
    limit = 300 * 1024  # above the largest tensor, the 256 KiB embedding
    save_checkpoint(original, tmp_path, max_shard_bytes=limit)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert all(p.stat().st_size <= limit + 8192 for p in shards)  # + the JSON header
    ids = torch.randint(0, 256, (1, 12))
    assert torch.equal(logits(load_checkpoint(tmp_path), ids), logits(original, ids))


def test_loads_a_transformers_checkpoint(tmp_path):
    """A directory written by transformers' save_pretrained, with Dream's config keys."""
    tokenizer = byte_tokenizer()
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    hf = Qwen2ForCausalLM._from_config(config, dtype=torch.float32)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(model_type="dream", eos_token_id=256)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"mask_token_id": 258}))
    loaded = load_checkpoint(tmp_path)
    assert loaded.model.config.family.logit_shift == 1
    assert (loaded.special.mask, loaded.special.eos, loaded.special.pad) == (258, 256, 256)
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=torch.zeros(1, 1, 16, 16)).logits
    assert (logits(loaded, ids) - expected).abs().max() < 1e-4


@pytest.fixture
def broken(checkpoints, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoints["lacuna"], directory)
    return directory


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


BREAKAGES = {
    "no config": (lambda d: (d / "config.json").unlink(), "config.json"),
    "no tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    "pickled weights only": (lambda d: ((d / "model.safetensors").rename(d / "pytorch_model.bin")), "pickled"),
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:1000]), "corrupt"),
    "garbage config": (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
    "garbage tokenizer": (lambda d: (d / "tokenizer.json").write_text("[]"), "tokenizer.json"),
    "unsupported architecture": (lambda d: edit_json(d / "config.json", model_type="mamba"), "mamba"),
    "unsupported rope": (lambda d: edit_json(d / "config.json", rope_parameters={"rope_type": "yarn"}), "yarn"),
    "config key missing": (lambda d: edit_json(d / "config.json", hidden_size=None), "hidden_size"),
    "shape mismatch": (lambda d: edit_json(d / "config.json", intermediate_size=999), "shape"),
    "no mask token": (lambda d: (edit_json(d / "config.json", mask_token_id=None),
                                 edit_json(d / "generation_config.json", mask_token_id=None),
                                 edit_json(d / "tokenizer_config.json", mask_token=None)), "mask"),
    "mask id beyond the embedding": (lambda d: edit_json(d / "config.json", mask_token_id=10**6),
                                     "mask token id 1000000 lies outside"),
    "a tokenizer bigger than the embedding": (lambda d: (d / "tokenizer.json").write_text(
        (Path(__file__).parent.parent / "engine" / "bundled" / "tokenizer.json").read_text()), "does not belong"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_broken_checkpoint_gets_one_clear_error(broken, breakage):
    damage, named = BREAKAGES[breakage]
    damage(broken)
    with pytest.raises(CheckpointError, match=named):
        load_checkpoint(broken)


def test_missing_shard_is_named(tmp_path):
    save_checkpoint(random_model("tiny"), tmp_path, max_shard_bytes=64 * 1024)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_checkpoint(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_int8_linear_layers_keep_the_model_s_predictions():
    fp32 = random_model("tiny", seed=3)
    int8 = random_model("tiny", seed=3)
    quantize_int8(int8)
    ids = torch.randint(0, 256, (1, 40))
    expected, got = logits(fp32, ids), logits(int8, ids)
    mlp = int8.model.model.layers[0].mlp
    assert "quantized" in type(mlp.gate_proj).__module__
    assert type(mlp.down_proj) is torch.nn.Linear  # its input's outliers: kept in float
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    assert torch.allclose(got, expected, atol=0.05)


@pytest.mark.parametrize("tied", [True, False])
def test_smoothing_before_int8_leaves_the_float_model_s_function_unchanged(tied):
    from dataclasses import replace

    from engine.config import PRESETS
    from engine.quantize import _smooth

    shape = replace(PRESETS["tiny"], tie_embeddings=tied)
    plain, smoothed = random_model(shape, seed=5), random_model(shape, seed=5)
    embedding = smoothed.model.model.embed_tokens.weight.clone()
    _smooth(smoothed)
    assert torch.equal(smoothed.model.model.embed_tokens.weight, embedding)  # a tied head is smoothed on a copy
    assert not torch.equal(plain.model.model.layers[0].mlp.up_proj.weight,
                           smoothed.model.model.layers[0].mlp.up_proj.weight)
    ids = torch.randint(0, 256, (1, 40))
    assert torch.allclose(logits(plain, ids), logits(smoothed, ids), atol=1e-4)


def test_a_checkpoint_mixing_dtypes_loads_in_the_dtype_asked(tmp_path):
    from safetensors.torch import load_file, save_file

    save_checkpoint(random_model("tiny", seed=4), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    mixed = {name: t.to(torch.bfloat16) if i % 2 else t.half() if i % 3 else t for i, (name, t) in
             enumerate(weights.items())}
    save_file(mixed, tmp_path / "model.safetensors")
    loaded = load_checkpoint(tmp_path)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert torch.isfinite(logits(loaded, torch.randint(0, 256, (1, 8)))).all()


def test_a_shard_missing_from_the_index_is_named(tmp_path):
    save_checkpoint(random_model("tiny", seed=5), tmp_path, max_shard_bytes=300 * 1024)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing the shard {shard.name}"):
        load_checkpoint(tmp_path)


def test_4_bit_weights_load_within_half_a_step_of_the_float_ones(tmp_path):
    original = random_model("tiny", seed=6)
    save_checkpoint(original, tmp_path / "float")
    weights = load_file(tmp_path / "float" / "model.safetensors")
    _save_4_bit(original, tmp_path)
    restored = load_checkpoint(tmp_path).model.state_dict()
    for name, tensor in weights.items():
        if tensor.dim() == 2:
            groups = tensor.reshape(tensor.shape[0], -1, GROUP)
            step = (groups.amax(-1) - groups.amin(-1)) / 15
            error = (restored[name] - tensor).abs().reshape(groups.shape).amax(-1)
            assert (error <= 0.6 * step + 1e-6).all(), name
        else:
            assert torch.equal(restored[name], tensor)


def test_a_matrix_on_the_4_bit_grid_is_stored_exactly():
    codes = torch.randint(0, 16, (8, 64)).float()
    codes[:, ::GROUP], codes[:, 1::GROUP] = 0, 15  # each group spans its whole range, as Q4_1 codes do
    step = torch.rand(8, 1) * 0.01 + 0.001
    weight = (codes - 7) * step  # zero point 7: exactly 119/17
    assert torch.allclose(unpack(pack(weight)), weight, atol=step.max().item() * 0.01)


def _save_4_bit(loaded, directory):
    """`loaded` saved with every matrix stored 4-bit, as the bundled model is."""
    save_checkpoint(loaded, directory)
    stored = {}
    for name, tensor in load_file(directory / "model.safetensors").items():
        parts = pack(tensor) if tensor.dim() == 2 else {"": tensor}
        stored.update({name + suffix: part for suffix, part in parts.items()})
    save_file(stored, directory / "model.safetensors")


def test_a_4_bit_layer_multiplies_its_codes_as_its_float_weight_does():
    torch.manual_seed(0)
    parts = pack(torch.randn(48, 96))
    weight, bias = torch.nn.Parameter(unpack(parts)), torch.nn.Parameter(torch.randn(48))
    layer = Int4Linear(weight, bias, parts)
    for shape in ((1, 96), (1, 3, 96), (CONTEXT_ROWS, 96)):  # the kernel, in bfloat16 activations
        x = torch.randn(shape)
        expected = torch.nn.functional.linear(x, weight, bias)
        assert layer(x).shape == expected.shape
        assert torch.allclose(layer(x), expected, atol=0.05 * expected.abs().max().item())
    x = torch.randn(CONTEXT_ROWS + 1, 96)  # a context: the float weight
    expected = torch.nn.functional.linear(x, weight, bias)
    assert torch.equal(layer(x), expected)
    in_bfloat16 = Int4Linear(weight, bias, parts, context_dtype=torch.bfloat16)
    assert in_bfloat16.weight.dtype == torch.bfloat16 and in_bfloat16(x).dtype == torch.float32
    assert torch.allclose(in_bfloat16(x), expected, atol=0.02 * expected.abs().max().item())


def test_on_a_cpu_an_engine_decodes_with_4_bit_weights_as_they_are(tmp_path):
    _save_4_bit(random_model("tiny", seed=7), tmp_path)
    engines = {int4: Engine.load(tmp_path, device="cpu", int4=int4, warmup=False) for int4 in (False, True)}
    try:
        models = {int4: engine.loaded.model for int4, engine in engines.items()}
        layers = [module for module in models[True].modules() if isinstance(module, Int4Linear)]
        # Every linear layer, q, k and v as one and gate and up as one, and the head tied to the
        # 4-bit embedding.
        assert len(layers) == 2 * 4 + 1
        attention = models[True].model.layers[0].self_attn
        assert attention.qkv_proj is not None and not hasattr(attention, "q_proj")
        assert not any(isinstance(module, Int4Linear) for module in models[False].modules())
        # A context multiplies in bfloat16 where the CPU does so in hardware.
        context_dtype = torch.bfloat16 if native_bfloat16() else torch.float32
        assert {layer.weight.dtype for layer in layers} == {context_dtype}
        assert models[True].context_dtype == context_dtype  # its activations too; its keys stay float32
        ids = torch.randint(0, 300, (1, 40))
        hidden = {}
        for int4, model in models.items():
            with torch.no_grad():
                cache = model.new_cache(1, 41)
                model(ids, torch.arange(40)[None], cache, kv_len=40)  # the context: the weights' float values
                hidden[int4] = model.logits(model(ids[:, -1:], torch.tensor([[40]]), cache))  # a step
        assert torch.allclose(hidden[True], hidden[False], atol=0.05 * hidden[False].abs().max().item())
        assert engines[True].complete("def f(", "", 8)[0].token_ids  # it serves
    finally:
        for engine in engines.values():
            engine.close()


def test_an_engine_loads_its_model_on_a_thread_that_ends(tmp_path, monkeypatch):
    # The thread that loads leaves no OpenMP team idling beside the engine worker's (engine.py).
    save_checkpoint(random_model("tiny", seed=8), tmp_path)
    loaders = []

    def load(*args, **kwargs):
        loaders.append(threading.current_thread())
        return load_checkpoint(*args, **kwargs)

    monkeypatch.setattr("engine.engine.load_checkpoint", load)
    engine = Engine.load(tmp_path, device="cpu", warmup=False)
    try:
        assert loaders[0] is not threading.current_thread() and not loaders[0].is_alive()
        assert engine.complete("def f(", "", 4)[0].token_ids
    finally:
        engine.close()


def test_a_4_bit_weight_missing_a_part_is_named(tmp_path):
    save_checkpoint(random_model("tiny", seed=6), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    weights.update({name + suffix: part for suffix, part in pack(weights.pop(name)).items() if suffix != ".zero"})
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"{name} lacks {name}.zero"):
        load_checkpoint(tmp_path)
