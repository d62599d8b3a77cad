"""Autoregressive fill-in-the-middle coders (family `qwen2_fim`): Qwen2.5-Coder's published layout
(tests/published.py) is recognised from its tokenizer, prompted with its own sentinels, matches
transformers' Qwen2 and infills through `Engine`, `lacuna complete` and `lacuna serve`; a
checkpoint missing a sentinel, and StarCoder2's layout, are refused at load."""

import json

import pytest
import torch
from published import QWEN25_ADDED, QWEN_SPECIALS, byte_tokenizer_with, open_dcoder, qwen25_coder, starcoder2
from safetensors.torch import load_file, save_file
from test_server import command, inline, open_doc, start, stop
from tokenizers import Tokenizer
from transformers import Qwen2ForCausalLM

from engine.api import DecodeOptions
from engine.config import CheckpointError
from engine.engine import Engine
from engine.loader import load_checkpoint
from engine.sampler import build_layout
from lsp.cli import main

PRE, SUF, MID = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
# [Qwen-Coder-card]: the ids its generation stops at.
CARD_STOPS = [151664, 151662, 151659, 151660, 151661, 151662, 151663, 151664, 151645, 151643]
PREFIX = "def mean(values):\n    total = sum(values)\n    return "
SUFFIX = "\n\n\ndef median(values):\n    return sorted(values)[len(values) // 2]\n"
CHAIN = "ab\n\tcd"  # a multi-line middle; each character's successor is unique


@pytest.fixture(scope="module")
def coder(tmp_path_factory):
    return qwen25_coder(tmp_path_factory.mktemp("qwen2.5-coder"))


def added_ids(directory):
    """tokenizer.json's added tokens, by content."""
    return {t["content"]: t["id"] for t in json.loads((directory / "tokenizer.json").read_text())["added_tokens"]}


def rewrite(source, target, edit):
    """A copy of the checkpoint `source` at `target` with an untied head, its weights changed by
    `edit(weights, token_id)`: a model whose output is known (as tests/conftest.py's)."""
    target.mkdir()
    for file in source.iterdir():
        if file.name != "model.safetensors":
            (target / file.name).write_bytes(file.read_bytes())
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    weights = {k: v.float() for k, v in load_file(source / "model.safetensors").items()}
    weights["lm_head.weight"] = torch.zeros_like(weights["model.embed_tokens.weight"])
    for name, tensor in weights.items():  # no layer writes to the residual stream
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor.zero_()
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    edit(weights, lambda text: tokenizer.encode(text, add_special_tokens=False).ids[0])  # one token each
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}, target / "model.safetensors")
    return target


def chain(text, stop):
    """After <|fim_middle|> the model writes `text`, then `stop`: each token predicts its successor."""
    def edit(weights, token):
        embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
        embed.zero_()  # any other token is the zero vector, and predicts nothing in particular
        weights["model.norm.weight"].fill_(1.0)
        sequence = [token(MID), *map(token, text), token(stop)]
        for dim, (this, following) in enumerate(zip(sequence, sequence[1:])):
            embed[this, dim] = 1.0
            head[following, dim] = 3.0
    return edit


def constant(char):
    """Every position predicts `char` (tests/conftest.py's constant_model)."""
    def edit(weights, token):
        weights["model.embed_tokens.weight"][:, 0] = 10.0
        weights["model.norm.weight"].zero_()
        weights["model.norm.weight"][0] = 1.0
        weights["lm_head.weight"][token(char), 0] = 5.0
    return edit


def test_qwen_coder_is_recognised_from_its_tokenizer_and_stops_where_its_card_does(coder):
    loaded = load_checkpoint(coder)
    config, special, tokenizer = loaded.model.config, loaded.special, loaded.tokenizer
    assert json.loads((coder / "config.json").read_text())["model_type"] == "qwen2"
    assert config.model_type == "qwen2_fim" and config.family.causal and config.family.logit_shift == 1
    ids = added_ids(coder)
    assert special.fim == (ids[PRE], ids[SUF], ids[MID]) == (151659, 151661, 151660)
    assert set(CARD_STOPS) <= set(special.stop_ids)
    assert special.eos == ids["<|endoftext|>"] == 151643 and special.bos is None
    # No mask token: the masks, never fed, take the first embedding row the tokenizer lacks.
    assert special.mask == 151665 == tokenizer.get_vocab_size() and special.mask in special.banned
    assert set(range(151665, config.vocab_size)) <= set(special.banned)


def test_the_prompt_is_the_model_s_own_sentinels_around_prefix_and_suffix(coder):
    engine = Engine(load_checkpoint(coder), warmup=False)
    try:
        ids = added_ids(coder)
        prefix, suffix = engine.encode(PREFIX), engine.encode(SUFFIX)
        layout = engine.layout(prefix, suffix, 4)
        context = [ids[PRE], *prefix, ids[SUF], *suffix, ids[MID]]
        assert layout.tokens == context + [engine.special.mask] * 4
        assert (layout.start, layout.end) == (len(context), len(context) + 4)
        # The same ids tokenizer_config.json lists.
        decoder = json.loads((coder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
        assert [decoder[str(i)]["content"] for i in (layout.tokens[0], layout.tokens[len(prefix) + 1],
                                                     layout.tokens[layout.start - 1])] == [PRE, SUF, MID]
        assert engine.capacity.reserved_tokens == 3
    finally:
        engine.close()


def test_logits_and_greedy_infill_match_transformers_qwen2(coder):
    """transformers' own Qwen2ForCausalLM, read from the same directory, on the FIM prompt."""
    hf = Qwen2ForCausalLM.from_pretrained(coder, dtype=torch.float64).eval()
    loaded = load_checkpoint(coder, dtype=torch.float64)
    engine = Engine(loaded, warmup=False)
    try:
        prompt = engine.layout(engine.encode(PREFIX), engine.encode(SUFFIX), 1).tokens[:-1]
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = hf(input_ids=ids).logits
            got = loaded.model.logits(loaded.model(ids, torch.arange(len(prompt))[None],
                                                   loaded.model.new_cache(1, len(prompt)), causal=True))
        assert (got - expected).abs().max() < 1e-5  # logits() returns float32
        [completion] = engine.complete(PREFIX, SUFFIX, 10, options=DecodeOptions(min_tokens=10))
    finally:
        engine.close()
    special = loaded.special
    generated = hf.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                            suppress_tokens=[special.mask, *special.banned], eos_token_id=list(special.stop_ids),
                            pad_token_id=special.eos)
    assert completion.token_ids == generated[0, len(prompt):].tolist()
    assert completion.steps <= 10 and completion.context_tokens == len(prompt)


def test_candidates_are_scored_as_middles_that_end_there(coder):
    """A FIM model read the suffix already: a candidate's score is transformers' log-likelihood of
    its middle followed by <|endoftext|> after the prompt."""
    hf = Qwen2ForCausalLM.from_pretrained(coder, dtype=torch.float64).eval()
    engine = Engine(load_checkpoint(coder, dtype=torch.float64), warmup=False)
    try:
        prompt = engine.layout(engine.encode(PREFIX), engine.encode(SUFFIX), 1).tokens[:-1]
        options = DecodeOptions(temperature=1.0, seed=3, score_suffix=32, min_tokens=2)
        sampled = engine.complete(PREFIX, SUFFIX, 6, n=3, options=options)
    finally:
        engine.close()
    for completion in sampled:
        tokens = torch.tensor([prompt + completion.token_ids + [engine.special.eos]])
        with torch.no_grad():
            log_probs = hf(tokens).logits[0, :-1].log_softmax(-1).gather(-1, tokens[0, 1:, None])[:, 0]
        assert completion.score == pytest.approx(log_probs[len(prompt) - 1:].sum().item(), rel=1e-6)


def test_typing_reuses_the_context_up_to_the_first_changed_token(coder):
    """The suffix sits before the middle: typing changes the middle of the context, and keys are
    reused up to there. The answer is a fresh engine's."""
    fresh, reusing = (Engine(load_checkpoint(coder, dtype=torch.float64), warmup=False) for _ in range(2))
    fed = []
    reusing.loaded.model.register_forward_hook(lambda module, args, output: fed.append(args[0].shape[1]))
    options = DecodeOptions(min_tokens=6)
    try:
        reusing.complete(PREFIX, SUFFIX, 6, n=2, options=options)
        fed.clear()
        got = reusing.complete(PREFIX + "t", SUFFIX, 6, n=2, options=options)
        # The typed byte, <|fim_suffix|>, the suffix and <|fim_middle|>: the prefix's keys are reused.
        assert fed[0] == 1 + 1 + len(reusing.encode(SUFFIX)) + 1
        assert [c.token_ids for c in got] == [c.token_ids for c in fresh.complete(PREFIX + "t", SUFFIX, 6, n=2,
                                                                                    options=options)]
    finally:
        fresh.close()
        reusing.close()


@pytest.mark.parametrize("stop", ["<|endoftext|>", "<|fim_pad|>", "<|file_sep|>"])
def test_a_multi_line_middle_ends_at_the_stop_token_and_never_writes_into_the_suffix(coder, tmp_path, stop):
    engine = Engine(load_checkpoint(rewrite(coder, tmp_path / "chain", chain(CHAIN, stop))), warmup=False)
    try:
        assert engine.tokenizer.token_to_id(stop) in engine.special.stop_ids
        [completion] = engine.complete("def f():\n", "\n\treturn ef\n", 32)
    finally:
        engine.close()
    assert (completion.text, completion.finish_reason) == (CHAIN, "stop")


def test_a_long_prompt_is_trimmed_at_its_far_ends_never_a_sentinel():
    prefix, suffix = list(range(100, 160)), list(range(200, 260))
    layout = build_layout(prefix, suffix, 8, mask=1, bos=None, eos=2, eos_after_suffix=False, shifted=True,
                          max_len=64, fim=(10, 11, 12))
    tokens = layout.tokens
    assert len(tokens) == 64 and (layout.start, layout.end) == (56, 64)
    assert [tokens.count(s) for s in (10, 11, 12)] == [1, 1, 1]
    assert tokens[0] == 10 and tokens[layout.start - 1] == 12 and tokens[layout.start:] == [1] * 8
    cut = tokens.index(11)
    kept_prefix, kept_suffix = tokens[1:cut], tokens[cut + 1:layout.start - 1]
    assert kept_prefix == prefix[-len(kept_prefix):] and kept_suffix == suffix[:len(kept_suffix)]  # its far ends cut
    assert len(kept_prefix) + len(kept_suffix) == 64 - 8 - 3 and kept_suffix
    with pytest.raises(ValueError, match="do not fit"):
        build_layout(prefix, suffix, 62, mask=1, bos=None, eos=2, eos_after_suffix=False, shifted=True, max_len=64,
                     fim=(10, 11, 12))


def test_a_plain_qwen2_or_one_with_a_mask_stays_the_diffusion_family(tmp_path):
    """Open-dCoder's layout (no sentinels here) and Open-dCoder as published: Qwen2.5-Coder's
    tokenizer, FIM sentinels and all, plus its mask <M>."""
    assert load_checkpoint(open_dcoder(tmp_path / "plain")).model.config.model_type == "qwen2"
    directory = open_dcoder(tmp_path / "with-sentinels")
    byte_tokenizer_with(QWEN_SPECIALS + [PRE, "<|fim_middle|>", SUF, "<|fim_pad|>", "<M>"]).save(
        str(directory / "tokenizer.json"))
    loaded = load_checkpoint(directory)
    assert loaded.model.config.model_type == "qwen2" and loaded.special.fim is None
    assert loaded.tokenizer.id_to_token(loaded.special.mask) == "<M>"


def test_a_tokenizer_lacking_a_sentinel_is_refused_naming_it(tmp_path):
    without_middle = [(token, special) for token, special in QWEN25_ADDED if token != MID]
    directory = qwen25_coder(tmp_path / "coder", added=without_middle)
    with pytest.raises(CheckpointError, match=r"lacks the fill-in-the-middle token <\|fim_middle\|>.*other sentinels"):
        load_checkpoint(directory)
    # tokenizer_config.json lists it; tokenizer.json does not have it.
    tok_config = json.loads((directory / "tokenizer_config.json").read_text())
    tok_config["added_tokens_decoder"]["151660"] = {"content": MID, "special": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(CheckpointError, match=r"<\|fim_middle\|>, and tokenizer_config.json lists it"):
        load_checkpoint(directory)


def test_starcoder2_is_refused_at_load_naming_what_the_engine_lacks(tmp_path):
    with pytest.raises(CheckpointError, match="unsupported model: StarCoder2") as refused:
        load_checkpoint(starcoder2(tmp_path / "starcoder2"))
    assert all(part in str(refused.value) for part in ("LayerNorm", "c_fc", "gelu_pytorch_tanh", "sliding"))


def test_lacuna_complete_infills_with_the_fim_prompt(coder, tmp_path, capsys):
    model = rewrite(coder, tmp_path / "chain", chain(CHAIN, "<|endoftext|>"))
    source = tmp_path / "f.py"
    source.write_text("def f():\n\n\treturn ef\n")
    assert main(["complete", str(source), "--line", "1", "--character", "0", "--tokens", "16", "--json",
                 "--model", str(model)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["text"], result["finish_reason"]) == (CHAIN, "stop")


async def test_lacuna_serve_suggests_from_a_fim_model(coder, tmp_path):
    model = rewrite(coder, tmp_path / "constant", constant("x"))
    client, _, _ = await start(command("--model", str(model)))
    try:
        uri = "file:///work/area.py"
        open_doc(client, uri, "def area(width, height):\n    result = \n    return result\n")
        answer = await inline(client, uri, 1, 13)
        assert answer.items and answer.items[0].insert_text and answer.items[0].insert_text.strip("x") == ""
    finally:
        await stop(client)


def test_the_catalogue_lists_qwen_coder_s_base_models_with_their_licence(capsys):
    assert main(["models"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for size in ("0.5B", "1.5B", "7B"):
        row = rows[f"qwen2.5-coder-{size.lower()}"]
        assert f"Qwen/Qwen2.5-Coder-{size} " in row and f"qwen2_fim, {size}, Apache-2.0" in row
