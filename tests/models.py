"""Tiny models with known output, built from real model code, for the tests (the fixtures in
conftest.py and the VS Code end-to-end run use them)."""

import dataclasses
from pathlib import Path

import torch
from tokenizers import Tokenizer

from engine.config import PRESETS, ModelConfig
from engine.loader import BUNDLED_DIR, LoadedModel, SpecialIds, random_model, save_checkpoint
from engine.model import Transformer
from engine.training.train import init_weights

# A small Lacuna-family (Qwen2 blocks, shifted logits) and a Llama-family (LLaDA, unshifted) config.
QWEN2 = PRESETS["tiny"]
LLAMA = dataclasses.replace(PRESETS["tiny"], model_type="llada", qkv_bias=False, tie_embeddings=False)
CAUSAL = dataclasses.replace(LLAMA, model_type="llama_causal")  # the bundled model's family, tiny


def constant_model(chars: str = "x"):
    """A tiny model whose weights make it predict `chars` everywhere, confidently: real model code
    with deterministic output, for end-to-end tests that need a visible, predictable suggestion.
    With several characters each is equally likely: greedy decoding writes the first, sampling a mix."""
    loaded = random_model(dataclasses.replace(QWEN2, tie_embeddings=False), seed=5)
    model = loaded.model
    tokens = [loaded.tokenizer.encode(char, add_special_tokens=False).ids[0] for char in chars]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0  # residual dimension 0 is a constant ...
        for layer in model.model.layers:  # ... that no layer writes to ...
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.model.norm.weight.zero_()  # ... and the only one the output layer reads.
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokens, 0] = 5.0
    return loaded


def chain_model(text: str):
    """A tiny model that writes `text[1:]` after `text[0]`: each character predicts the character
    that follows it in `text` (the last one predicts EOS), confidently, while a mask predicts
    nothing, so the infill is decoded left to right, one step a character. Real model code with a
    deterministic, multi-word, multi-line suggestion. A character's successor must be unique."""
    successors = dict(zip(text, text[1:]))
    if len(successors) != len(text) - 1 or text[-1] in successors:
        raise ValueError(f"each character of {text!r} must have one successor")
    loaded = random_model(dataclasses.replace(QWEN2, tie_embeddings=False), seed=5)
    model, tokenizer = loaded.model, loaded.tokenizer
    token = {ch: tokenizer.encode(ch, add_special_tokens=False).ids[0] for ch in text}
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()  # a mask, like any character not in `text`, is the zero vector
        for layer in model.model.layers:  # no layer writes to the residual stream ...
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)  # ... so the output layer reads each position's own token
        model.lm_head.weight.zero_()
        for dim, ch in enumerate(text):  # one residual dimension per character
            model.model.embed_tokens.weight[token[ch], dim] = 1.0
            model.lm_head.weight[token[successors[ch]] if ch in successors else loaded.special.eos, dim] = 3.0
    return loaded


# After a colon, two words, then an indented second line: for accepting a word or a line.
CHAIN_TEXT = ":ab cd\n\tef"


def tiny_causal_release(path: Path) -> Path:
    """A tiny random causal Llama with the bundled model's tokenizer and special ids, written to
    `path`: what `lacuna train adapt` and the GPU job start from, small."""
    model = Transformer(ModelConfig("llama_causal", 17696, 64, 128, 2, 4, 2, 16, 1024, rope_theta=100000.0,
                                    tie_embeddings=True))
    init_weights(model, seed=0)
    tokenizer = Tokenizer.from_file(str(BUNDLED_DIR / "tokenizer.json"))
    save_checkpoint(LoadedModel(model.eval(), tokenizer, SpecialIds(mask=16, eos=0, pad=0, bos=None), "tiny"), path)
    return path
