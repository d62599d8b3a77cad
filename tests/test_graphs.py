"""The CUDA-graph step against the eager one: the same tokens for every DecodeOptions field, the
token-healing constraints and each kind of diffusion family. Off CUDA a graph's step runs as
Python over its static tensors (`Replay` calls it), so this runs on any machine; on a GPU the
same steps are captured and replayed."""

import dataclasses

import pytest
import torch

from engine.api import ORDERINGS, DecodeOptions
from engine.config import PRESETS
from engine.engine import Engine
from engine.graphs import STEP_IGNORES, step_options
from engine.loader import random_model
from engine.request import Request
from engine.runner import StepRunner
from engine.sampler import Denoiser

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))
PREFIX = "def mean(values):\n    total = sum(values)\n    return "
SUFFIX = "\n\n\nprint(mean([1, 2, 3]))\n"
# With a prefix, the healing families give its last token back (here " "): the first middle token
# is constrained; without one, nothing is healed. The long one fills a larger graph cache.
PREFIXES = (PREFIX, "x" * 300 + PREFIX, "")
CHARS = "ab (\n"  # what `lively` predicts, with EOS

# Per DecodeOptions field, options that set it otherwise than its default; the test below checks
# that every field is here, so a new field is covered or fails that test.
CASES: dict[str, list[DecodeOptions]] = {
    "policy": [DecodeOptions(policy="steps"), DecodeOptions(policy="fixed")],
    "steps": [DecodeOptions(policy="steps", steps=5)],
    "threshold": [DecodeOptions(threshold=0.4)],
    "tokens_per_step": [DecodeOptions(policy="fixed", tokens_per_step=5)],
    "ordering": [DecodeOptions(policy="fixed", tokens_per_step=3, ordering=o) for o in ORDERINGS]
    + [DecodeOptions(threshold=0.4, ordering="left_to_right")],
    "temperature": [DecodeOptions(temperature=0.8, seed=1)],  # sampled: stepped eagerly
    "top_p": [DecodeOptions(top_p=0.5), DecodeOptions(temperature=0.8, top_p=0.5, seed=1)],
    "seed": [DecodeOptions(seed=7)],
    "use_cache": [DecodeOptions(use_cache=False)],  # every step a full forward: never graphed
    "refresh_every": [DecodeOptions(policy="steps", steps=8, refresh_every=3)],
    "min_tokens": [DecodeOptions(min_tokens=6), DecodeOptions(min_tokens=8),
                   DecodeOptions(policy="steps", steps=6, min_tokens=4),
                   DecodeOptions(policy="fixed", tokens_per_step=2, ordering="left_to_right", min_tokens=2)],
    "single_line": [DecodeOptions(single_line=True), DecodeOptions(single_line=True, min_tokens=5)],
    "lookup": [DecodeOptions(lookup=0)],  # a causal model's: no effect here, nor on the graph's key
    "score_suffix": [DecodeOptions(score_suffix=4)],  # as lookup
    # A block ends rows only while masks are left after it: decoded left to right, it ends early.
    "block_indent": [DecodeOptions(block_indent=4), DecodeOptions(policy="steps", steps=8, block_indent=1),
                     DecodeOptions(policy="fixed", tokens_per_step=2, ordering="left_to_right", min_tokens=8,
                                   block_indent=4)],
}
# A family of each kind: unshifted (LLaDA); shifted with Dream's schedule; context-causal with the
# suffix-prefix-middle layout (these three heal a prefix's last token); Lacuna's, which never heals.
FAMILIES = ("llada", "dream", "llama_spm", "lacuna")


def lively(model_type: str, seed: int = 3):
    """A tiny random model whose predictions differ from position to position and end lines and
    infills often (only CHARS and EOS are ever likely): min_tokens, single lines, block ends and
    healing all change its infills. float64, so that kernels cannot flip an argmax."""
    config = dataclasses.replace(PRESETS["tiny"], model_type=model_type, tie_embeddings=False,
                                 qkv_bias=model_type == "dream")
    loaded = random_model(config, dtype=torch.float64, seed=seed)
    ids = [loaded.tokenizer.encode(c, add_special_tokens=False).ids[0] for c in CHARS] + [loaded.special.eos]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(20)  # sharp attention: each position reads its own context
            elif name.endswith(("v_proj.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight",
                                "down_proj.weight")):
                param.mul_(5)
        head = loaded.model.lm_head.weight
        head.zero_()
        head[ids] = torch.randn(len(ids), head.shape[1], generator=generator, dtype=head.dtype)
    if model_type == "llama_spm":  # suffix SEP prefix MASK*N, with some byte as SEP
        loaded.special = dataclasses.replace(loaded.special, separator=loaded.special.bos)
    return loaded


@pytest.fixture(scope="module")
def engine_pairs():
    """(graphed, eager) engines per (device, family), made once."""
    pairs = {}

    def get(device: str, family: str) -> tuple[Engine, Engine]:
        if (device, family) not in pairs:
            loaded = lively(family)
            if device != "cpu":
                loaded.model.to(device)
            pairs[device, family] = (Engine(loaded, cuda_graphs=True, warmup=False),
                                     Engine(loaded, cuda_graphs=False, full_windows=True, warmup=False))
        return pairs[device, family]

    yield get
    for engines in pairs.values():
        for engine in engines:
            engine.close()


def test_every_decode_option_is_decoded_graphed():
    """Every DecodeOptions field has cases below, each setting it otherwise than by default; those
    a graphed step never reads are named in STEP_IGNORES."""
    names = {f.name for f in dataclasses.fields(DecodeOptions)}
    assert set(CASES) == names
    default = DecodeOptions()
    for name, cases in CASES.items():
        assert all(getattr(options, name) != getattr(default, name) for options in cases), name
    assert set(STEP_IGNORES) <= names
    # What a step reads stays in the key: two requests differing there never share a graph.
    for name in names - set(STEP_IGNORES):
        assert all(step_options(options) != step_options(default) for options in CASES[name]), name


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("options", [pytest.param(options, id=f"{name}{i}") for name, cases in CASES.items()
                                     for i, options in enumerate(cases)])
def test_graphed_steps_give_the_eager_steps_tokens(engine_pairs, device, family, options):
    """Each request alone, as graphs step it: the same tokens, steps and ends as eager steps of the
    same (full) windows give. On CUDA the graphs are captured."""
    graphed, eager = engine_pairs(device, family)
    graphed.runner.graphs.clear()
    for prefix in PREFIXES:
        got = graphed.complete(prefix, SUFFIX, 24, n=2, options=options)
        want = eager.complete(prefix, SUFFIX, 24, n=2, options=options)
        assert [(c.token_ids, c.steps, c.finish_reason) for c in got] == \
               [(c.token_ids, c.steps, c.finish_reason) for c in want], prefix
    # A greedy request with the cache steps through graphs; others step eagerly.
    assert bool(graphed.runner.graphs) == (options.temperature == 0 and options.use_cache)
    assert all((g.replay.graph is not None) == (device == "cuda") for g in graphed.runner.graphs.values())
    assert not eager.runner.graphs


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_constraints_change_these_infills(engine_pairs, device, family):
    """The parity above means something: on these models each constraint changes an infill."""
    _, eager = engine_pairs(device, family)

    def infills(options: DecodeOptions) -> list[tuple]:
        return [(c.token_ids, c.steps) for p in PREFIXES for c in eager.complete(p, SUFFIX, 24, options=options)]

    left_to_right = DecodeOptions(policy="fixed", tokens_per_step=2, ordering="left_to_right", min_tokens=8)
    for options, plain in ((DecodeOptions(min_tokens=8), DecodeOptions()),
                           (DecodeOptions(single_line=True), DecodeOptions()),
                           (dataclasses.replace(left_to_right, block_indent=4), left_to_right)):
        assert infills(options) != infills(plain), options
    # Healing: the first token holds the text the prefix gave back.
    healed = eager.submit(PREFIX, SUFFIX, 24)
    assert healed.healed == ("" if family == "lacuna" else " ")
    assert not healed.healed or healed.result()[0].token_ids[0] == eager.encode(" ")[0]


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("options", [
    DecodeOptions(policy="fixed", tokens_per_step=1, ordering="left_to_right"),
    DecodeOptions(policy="steps", min_tokens=3, ordering="left_to_right"),
    DecodeOptions(policy="fixed", ordering="confidence"),
])
def test_split_healing_is_graphed_as_eager(device, options):
    """A causal family's token healing in two tokens (Vocabulary.split_healing), which the engine
    builds for causal models only, which are never graphed: the graphed step still honours it, the
    same as an eager one, on a diffusion model given that constraint."""
    loaded = lively("llada")
    if device != "cpu":
        loaded.model.to(device)
    engine = Engine(loaded, cuda_graphs=False, warmup=False)  # for its layout and tokenizer only
    try:
        tokens = {c: engine.encode(c)[0] for c in CHARS}
        vocab = loaded.model.config.vocab_size

        def ids(chars: str) -> torch.Tensor:
            allowed = torch.zeros(vocab, dtype=torch.bool, device=loaded.model.device)
            allowed[[tokens[c] for c in chars]] = True
            return allowed

        # The text given back is "  (": a first token " " leaves " (" to the second, which must
        # then be " " (whose own second must be "(", which no constraint says: it is left free).
        first, split = ids(" ("), (torch.tensor([tokens[" "]], device=loaded.model.device), ids(" ")[None])

        def decode(runner: StepRunner) -> tuple[list, int]:
            layout = engine.layout(engine.encode(PREFIX), engine.encode(SUFFIX), 16)
            den = Denoiser(layout, 2, options, loaded.special,
                           device=loaded.model.device, first_tokens=first, split_healing=split)
            request = Request(1, den, 2, None)
            while not den.done:
                assert not runner.step([request])
            runner.forget(1)
            return den.middle.tolist(), den.steps

        graphed_runner = StepRunner(loaded, cuda_graphs=True, full_windows=True)
        got, want = decode(graphed_runner), decode(StepRunner(loaded, cuda_graphs=False, full_windows=True))
        assert got == want and graphed_runner.graphs
        middle = want[0][0]
        assert middle[0] in (tokens[" "], tokens["("])
        if options.ordering == "left_to_right":  # the second is decoded after the first: it is constrained
            assert middle[0] != tokens[" "] or middle[1] == tokens[" "]
    finally:
        engine.close()
