"""The resident engine: cache exactness, batching, candidates, cancellation, budgets, bad input."""

import asyncio
import dataclasses
import threading
from concurrent.futures import CancelledError, Future

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import CAUSAL, LLAMA
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from engine.api import DecodeOptions, EngineError
from engine.config import PRESETS
from engine.engine import Engine, context_speed
from engine.loader import load_checkpoint, random_model
from engine.sampler import dream_schedule

PREFIX = "def mean(values):\n    total = sum(values)\n    return "
SUFFIX = "\n\n\nprint(mean([1, 2, 3]))\n"


@pytest.mark.parametrize("options", [
    DecodeOptions(policy="steps", steps=8),
    DecodeOptions(policy="threshold", threshold=0.005),
    DecodeOptions(policy="fixed", tokens_per_step=3, ordering="margin", temperature=0.7, top_p=0.9, seed=4),
])
def test_cache_refreshed_every_step_equals_the_reference(family_engine, options):
    reference = family_engine.complete(PREFIX, SUFFIX, 24, n=2, options=dataclasses.replace(options, use_cache=False))
    cached = family_engine.complete(PREFIX, SUFFIX, 24, n=2, options=dataclasses.replace(options, refresh_every=1))
    assert [c.token_ids for c in cached] == [c.token_ids for c in reference]
    assert [c.steps for c in cached] == [c.steps for c in reference]


def test_cached_sampler_returns_a_full_infill(family_engine):
    completion, = family_engine.complete(PREFIX, SUFFIX, 16, options=DecodeOptions(policy="fixed"))
    assert completion.steps == 4
    assert len(completion.confidences) == len(completion.token_ids)
    assert completion.finish_reason in ("stop", "length")


@pytest.mark.parametrize("family", ["lacuna", "llada"])
def test_logit_shift_per_family_against_transformers(checkpoints, family):
    """One masked token, decoded greedily, is transformers' argmax at the family's position."""
    loaded = load_checkpoint(checkpoints[family])
    config = loaded.model.config.to_hf()
    hf_cls, cfg_cls = (Qwen2ForCausalLM, Qwen2Config) if family == "lacuna" else (LlamaForCausalLM, LlamaConfig)
    hf_config = cfg_cls(**{k: v for k, v in config.items() if k != "model_type"})
    hf = hf_cls._from_config(hf_config, dtype=torch.float32).eval()
    hf.load_state_dict(loaded.model.state_dict(), strict=False)
    engine = Engine(loaded, warmup=False)
    try:
        ids = engine.encode(PREFIX)  # as ids: no token healing, the plain layout
        completion, = engine.submit_ids(ids, engine.encode(SUFFIX), 1,
                                        options=DecodeOptions(policy="steps", use_cache=False)).result()
    finally:
        engine.close()
    tokens = [loaded.special.bos] + ids + [loaded.special.mask] + engine.encode(SUFFIX)
    if family == "lacuna":
        tokens.append(loaded.special.eos)  # Lacuna's models, like DreamOn, close the suffix with EOS
    start = 1 + len(ids)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([tokens]), attention_mask=torch.zeros(1, 1, len(tokens), len(tokens))).logits
    row = logits[0, start - 1 if family == "lacuna" else start]
    row[[loaded.special.mask, *loaded.special.banned]] = -torch.inf
    expected = int(row.argmax())
    if expected in (loaded.special.eos, loaded.special.pad):
        assert completion.token_ids == [] and completion.finish_reason == "stop"
    else:
        assert completion.token_ids == [expected]


def causal_and_transformers():
    """A tiny random causal model, and the same weights in transformers' Llama."""
    loaded = random_model(CAUSAL, dtype=torch.float64, seed=5)
    hf_config = LlamaConfig(**{k: v for k, v in CAUSAL.to_hf().items() if k != "model_type"})
    hf = LlamaForCausalLM._from_config(hf_config, dtype=torch.float64).eval()
    hf.load_state_dict(loaded.model.state_dict(), strict=False)
    return loaded, hf


def test_a_causal_model_decodes_as_transformers_generates_whatever_the_suffix():
    """An autoregressive Llama run causally (the bundled model's family): every candidate's infill
    is transformers' greedy continuation of the prefix, with or without a suffix, which is not even
    fed (nor are the masks)."""
    loaded, hf = causal_and_transformers()
    engine = Engine(loaded, warmup=False)
    fed = []
    loaded.model.register_forward_hook(lambda module, args, output: fed.append(args[0].shape[1]))
    try:
        ids = engine.encode(PREFIX)
        answers = [engine.submit_ids(ids, engine.encode(suffix), 12, n=2, options=DecodeOptions(min_tokens=12)).result()
                   for suffix in (SUFFIX, "")]
    finally:
        engine.close()
    assert fed[0] == 1 + len(ids)  # BOS and the prefix
    special = loaded.special
    generated = hf.generate(torch.tensor([[special.bos] + ids]), max_new_tokens=12, min_new_tokens=12,
                            do_sample=False, suppress_tokens=[special.mask], eos_token_id=special.eos,
                            pad_token_id=special.eos)
    assert [c.token_ids for answer in answers for c in answer] == [generated[0, len(ids) + 1:].tolist()] * 4
    assert all(c.steps == 12 for answer in answers for c in answer)  # one token a step


def test_a_causal_models_candidates_are_scored_by_their_likelihood_followed_by_the_suffix():
    """Each candidate's score is transformers' log-likelihood of its infill and then the first
    `score_suffix` suffix tokens after the prefix; without the option there is no score."""
    loaded, hf = causal_and_transformers()
    engine = Engine(loaded, warmup=False)
    try:
        ids, suffix = engine.encode(PREFIX), engine.encode(SUFFIX)
        options = DecodeOptions(temperature=1.0, seed=2, score_suffix=5)
        sampled = engine.submit_ids(ids, suffix, 8, n=3, options=options).result()
        greedy = engine.submit_ids(ids, suffix, 8, n=2, options=DecodeOptions(score_suffix=5)).result()  # the same two
        unscored, = engine.submit_ids(ids, suffix, 8).result()
    finally:
        engine.close()
    assert len({tuple(c.token_ids) for c in sampled}) > 1
    for completion in sampled + greedy:
        tokens = torch.tensor([[loaded.special.bos] + ids + completion.token_ids + suffix[:5]])
        with torch.no_grad():
            log_probs = hf(tokens).logits[0, :-1].log_softmax(-1).gather(-1, tokens[0, 1:, None])[:, 0]
        assert completion.score == pytest.approx(log_probs[len(ids):].sum().item(), rel=1e-6)
    assert unscored.score is None


def test_a_causal_model_reuses_the_keys_of_a_context_typed_on():
    """Keys of a causal model's context depend on nothing after them: a request whose context starts
    as the last one's (the same file, typed on) feeds only the rest, and gets the same answer."""
    fresh, reusing = (Engine(random_model(CAUSAL, dtype=torch.float64, seed=5), warmup=False) for _ in range(2))
    fed = []
    reusing.loaded.model.register_forward_hook(lambda module, args, output: fed.append(args[0].shape[1]))
    typed_on = PREFIX + "total / len(values)\n\n\ndef median(values):\n    return "
    options = DecodeOptions(min_tokens=8)
    try:
        reusing.complete(PREFIX, SUFFIX, 8, n=2, options=options)
        fed.clear()
        got = reusing.complete(typed_on, SUFFIX, 8, n=2, options=options)
        assert fed[0] <= len(typed_on) - len(PREFIX) + 1  # a byte a token: the new text and the healed end
        assert [c.token_ids for c in got] == [c.token_ids for c in fresh.complete(typed_on, SUFFIX, 8, n=2,
                                                                                    options=options)]
    finally:
        fresh.close()
        reusing.close()


def test_prompt_lookup_gives_the_same_infill_in_fewer_steps():
    """A random causal model soon repeats itself: the repeats are drafted and kept, and the
    infill is the one decoded a token a step."""
    engine = Engine(random_model(CAUSAL, seed=5), warmup=False)
    try:
        one, drafted = (engine.complete(PREFIX * 3, "", 32, options=DecodeOptions(min_tokens=32, lookup=k))[0]
                        for k in (0, 2))
    finally:
        engine.close()
    assert drafted.token_ids == one.token_ids and len(one.token_ids) == 32
    assert one.steps == 32 and drafted.steps < 24


def test_a_single_line_after_a_healed_token_no_token_continues_with_a_line_break():
    """Byte tokens: none holds a line break after the healed "f", so that set is empty."""
    engine = Engine(random_model(CAUSAL, seed=5), warmup=False)
    try:
        completion, = engine.complete("def f", "", 6, options=DecodeOptions(min_tokens=1, single_line=True))
    finally:
        engine.close()
    assert completion.text and "\n" not in completion.text[:-1]


def test_an_answer_to_a_request_cancelled_meanwhile_is_dropped(engine):
    """The worker answers a request it retired; an asyncio wrapper may cancel the request's future
    from another thread in between. The answer is dropped and the worker keeps serving (it died
    of InvalidStateError before)."""
    request = engine.submit(PREFIX, SUFFIX, 4)
    request.result()
    request.future = Future()
    request.future.cancel()
    engine._resolve(request)
    assert engine.complete(PREFIX, SUFFIX, 4)[0].steps > 0


def test_concurrent_callers_share_denoising_steps(engine):
    prompts = [("x" * i + PREFIX, SUFFIX[: 20 - i], 8 + 2 * i) for i in range(6)]
    options = DecodeOptions(policy="steps")
    alone = [engine.complete(p, s, n, options=options)[0].token_ids for p, s, n in prompts]
    engine.stats["max_batch_requests"] = 0
    results = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def call(i):
        barrier.wait()
        prefix, suffix, n = prompts[i]
        results[i] = engine.complete(prefix, suffix, n, options=options)[0].token_ids

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == alone
    assert engine.stats["max_batch_requests"] > 1


def test_candidates_share_one_batch(engine):
    before = engine.stats["steps"]
    sampled = engine.complete(PREFIX, SUFFIX, 12, n=4, options=DecodeOptions(temperature=1.0, seed=7))
    assert len(sampled) == 4
    assert engine.stats["steps"] - before == max(c.steps for c in sampled)  # one forward per step, not per row
    assert len({tuple(c.token_ids) for c in sampled}) > 1
    greedy = engine.complete(PREFIX, SUFFIX, 12, n=3)
    assert len({tuple(c.token_ids) for c in greedy}) == 1


def test_cancel_stops_within_one_step(engine):
    slow = DecodeOptions(policy="steps", use_cache=False)
    request = engine.submit(PREFIX * 40, SUFFIX * 10, 200, options=slow)
    while engine.stats["steps"] == 0 or not request.denoiser.steps:
        threading.Event().wait(0.01)
    assert request.cancel()
    at_cancel = engine.stats["steps"]
    with pytest.raises(CancelledError):
        request.result(timeout=60)
    assert engine.stats["steps"] - at_cancel <= 1
    assert request.denoiser.steps < 200
    assert not request.cancel()  # already finished
    assert engine.complete(PREFIX, SUFFIX, 4)[0].steps >= 1  # still serving


async def test_cancelling_an_async_infill_stops_and_frees_it(engine):
    slow = DecodeOptions(policy="steps", use_cache=False)
    task = asyncio.ensure_future(engine.infill(PREFIX * 40, SUFFIX * 10, 200, options=slow))
    while engine.pending == 0 or engine.stats["steps"] == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(500):
        if engine.pending == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.pending == 0  # nothing left behind in the engine's books
    assert (await engine.infill(PREFIX, SUFFIX, 4))[0].steps >= 1


def test_time_budget_returns_what_is_decoded(engine):
    nothing, = engine.complete(PREFIX, SUFFIX, 16, time_budget=1e-9)  # over before the worker sees it
    assert (nothing.text, nothing.steps, nothing.finish_reason) == ("", 0, "budget")
    slow = DecodeOptions(policy="steps", use_cache=False)
    partial, = engine.complete(PREFIX * 40, SUFFIX, 200, options=slow, time_budget=0.3)
    assert partial.finish_reason == "budget"
    assert 0 < partial.steps < 200


def test_bad_requests_get_clear_errors(engine):
    for n_tokens in (0, -3, engine.max_tokens + 1):
        with pytest.raises(ValueError, match="n_tokens"):
            engine.submit(PREFIX, SUFFIX, n_tokens)
    with pytest.raises(ValueError, match="n must"):
        engine.submit(PREFIX, SUFFIX, 4, n=0)
    with pytest.raises(ValueError, match=r"steps \(5\) must not be more than the 4 masked tokens"):
        engine.submit(PREFIX, SUFFIX, 4, options=DecodeOptions(policy="steps", steps=5))
    for budget in (0, -1, 60.5, float("nan")):
        with pytest.raises(ValueError, match="time_budget"):
            engine.submit(PREFIX, SUFFIX, 4, time_budget=budget)
    assert engine.complete(PREFIX, SUFFIX, 4, options=DecodeOptions(policy="steps", steps=4), time_budget=60)
    assert engine.complete("", "", 4)[0].steps >= 1
    assert engine.complete("", SUFFIX, 4)[0].steps >= 1
    assert engine.complete(PREFIX, "", 4)[0].steps >= 1


def test_context_longer_than_the_model_is_trimmed():
    config = dataclasses.replace(LLAMA, max_position_embeddings=64)
    engine = Engine(random_model(config))
    try:
        completion, = engine.complete(PREFIX * 20, SUFFIX * 20, 16, options=DecodeOptions(policy="fixed"))
        assert completion.steps == 4
        with pytest.raises(ValueError, match="do not fit"):
            engine.submit(PREFIX, SUFFIX, 64)
    finally:
        engine.close()


def test_nan_logits_fail_only_that_request():
    loaded = random_model(LLAMA, seed=9)  # untied: a poisoned input embedding spares the output layer
    poison = loaded.tokenizer.token_to_id("Z")
    with torch.no_grad():
        loaded.model.model.embed_tokens.weight[poison] = float("nan")
    engine = Engine(loaded)
    try:
        bad = engine.submit("Z" + PREFIX, SUFFIX, 16, options=DecodeOptions(policy="steps"))
        good = engine.submit(PREFIX, SUFFIX, 16, options=DecodeOptions(policy="steps"))
        with pytest.raises(EngineError, match="NaN"):
            bad.result(timeout=60)
        assert good.result(timeout=60)[0].steps == 16
        assert engine.complete(PREFIX, SUFFIX, 4)[0].steps >= 1
    finally:
        engine.close()


def test_closed_engine_refuses_work():
    engine = Engine(random_model("tiny"), warmup=False)
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.submit(PREFIX, SUFFIX, 4)


def test_the_engine_measures_its_speed_at_start_up_and_reports_it():
    engine = Engine(random_model("tiny"))
    try:
        assert engine.capacity.context_per_second > 0
    finally:
        engine.close()
    cold = Engine(random_model("tiny"), warmup=False)
    try:
        assert cold.capacity.context_per_second is None
    finally:
        cold.close()


def test_a_stalled_start_up_run_cannot_make_the_context_look_free():
    # 224 tokens more in the long runs: 0.29 s more on 2 CPU cores (about 770 tokens a second).
    assert context_speed(224, [0.51, 0.52, 0.61], [0.22, 0.25, 0.23]) == pytest.approx(224 / 0.29)
    # Every short run stalled as long as a long one: the context still costs a quarter of a run.
    assert context_speed(224, [0.51, 0.52, 0.61], [0.51, 0.7, 0.55]) == pytest.approx(224 / (0.51 / 4))


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("options", [
    DecodeOptions(policy="fixed", tokens_per_step=3),
    DecodeOptions(policy="steps", steps=5, refresh_every=3),
    DecodeOptions(policy="threshold", threshold=0.005),
])
def test_graphed_steps_match_eager_full_windows(device, options):
    """The CUDA-graph path steps exactly as eager full windows do; off CUDA it replays eagerly.
    float64, so that different attention kernels cannot flip an argmax."""
    loaded = random_model("tiny", device=device, dtype=torch.float64, seed=3)
    graphed, eager = Engine(loaded, cuda_graphs=True), Engine(loaded, cuda_graphs=False, full_windows=True)
    try:
        for prefix, n in ((PREFIX, 24), ("x" * 300 + PREFIX, 24), ("", 5)):
            got = graphed.complete(prefix, SUFFIX, n, n=2, options=options)
            want = eager.complete(prefix, SUFFIX, n, n=2, options=options)
            assert [(c.token_ids, c.steps) for c in got] == [(c.token_ids, c.steps) for c in want]
        assert graphed.runner.graphs and not eager.runner.graphs
        assert all((g.replay.graph is not None) == (device == "cuda") for g in graphed.runner.graphs.values())
        # Requests that arrive together step eagerly, then alone through graphs.
        requests = [graphed.submit("y" * i + PREFIX, SUFFIX, 16 + i, options=options) for i in range(4)]
        got = [r.result(timeout=60)[0].token_ids for r in requests]
        assert got == [eager.complete("y" * i + PREFIX, SUFFIX, 16 + i, options=options)[0].token_ids
                       for i in range(4)]
    finally:
        graphed.close()
        eager.close()


def test_lone_surrogates_in_the_context(engine):
    assert engine.complete("x = '\udcff' + ", "\n", 4)[0].steps >= 1


REUSE_FILE = PREFIX + "total / len(values)\n\n\ndef median(values):\n    ordered = sorted(values)\n    return ordered\n"


@pytest.fixture(scope="module")
def reuse_engines():
    engines = [Engine(random_model(CAUSAL, dtype=torch.float64, seed=5), warmup=False) for _ in range(2)]
    yield engines
    for engine in engines:
        engine.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(["insert", "delete", "jump"]), st.integers(0, 10**4),
                                st.text(alphabet="ab (),:\n", min_size=1, max_size=5)), min_size=1, max_size=6))
def test_contexts_reused_across_edits_give_what_encoding_from_scratch_gives(reuse_engines, edits):
    """Typing, deleting and jumping elsewhere in a file: the engine that keeps the contexts it
    encoded (ContextStore) answers every request as one that encodes each from scratch."""
    reusing, fresh = reuse_engines
    text, cursor = REUSE_FILE, len(PREFIX)
    options = DecodeOptions(min_tokens=4)
    for kind, at, typed in edits:
        if kind == "insert":
            text, cursor = text[:cursor] + typed + text[cursor:], cursor + len(typed)
        elif kind == "delete":
            gone = min(cursor, len(typed))
            text, cursor = text[:cursor - gone] + text[cursor:], cursor - gone
        else:
            cursor = at % (len(text) + 1)
        fresh.runner.store.clear()
        got = reusing.complete(text[:cursor], text[cursor:], 4, options=options)
        assert [c.token_ids for c in got] == [c.token_ids for c in fresh.complete(text[:cursor], text[cursor:], 4,
                                                                                    options=options)]
    assert reusing.runner.store.entries  # contexts are kept ...
    assert reusing.runner.store.bytes <= reusing.runner.store.max_bytes  # ... within their memory


def test_the_context_store_keeps_the_longest_and_drops_the_least_recently_used():
    engine = Engine(random_model(CAUSAL, seed=5), warmup=False)
    try:
        store = engine.runner.store
        engine.complete("def f(x):\n    return x", "", 2)
        engine.complete("def f(x):\n    return x + 1", "", 2)  # covers the first: it is dropped
        assert len(store.entries) == 1
        engine.complete("class A:\n    pass", "", 2)
        assert len(store.entries) == 2
        query = engine.layout(engine.encode("def f(x):\n    return x + 12"), [], 1)
        kept, n = store.longest(torch.tensor(query.tokens[:query.start]))
        assert n == len(kept.context_tokens) > len(engine.encode("def f(x):\n    return x"))  # the longer one's
        store.max_bytes = store.bytes - 1  # room for one context less: the least recently used goes
        engine.complete("import os", "", 2)
        assert len(store.entries) == 2 and any(c is kept for c in store.entries.values())  # "class A" went
    finally:
        engine.close()


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("steps", [None, 5, 9])
def test_a_dream_model_decodes_by_dreams_schedule_graphed_as_eager(device, steps):
    """The Dream family's "steps" policy counts as Dream's decoder does; the CUDA-graph path, which
    reads each step's count ahead, steps as the eager one."""
    loaded = random_model(dataclasses.replace(PRESETS["tiny"], model_type="dream"), device=device,
                          dtype=torch.float64, seed=3)
    options = DecodeOptions(policy="steps", steps=steps)
    graphed, eager = Engine(loaded, cuda_graphs=True), Engine(loaded, cuda_graphs=False, full_windows=True)
    try:
        request = eager.submit(PREFIX, SUFFIX, 24, options=options)
        request.result(timeout=60)
        assert request.denoiser.schedule == [c for c in dream_schedule(24, steps or 24) if c]
        for prefix, n in ((PREFIX, 24), ("x" * 300 + PREFIX, 24), ("", 5)):
            options = DecodeOptions(policy="steps", steps=min(steps or n, n))
            got = graphed.complete(prefix, SUFFIX, n, n=2, options=options)
            want = eager.complete(prefix, SUFFIX, n, n=2, options=options)
            assert [(c.token_ids, c.steps) for c in got] == [(c.token_ids, c.steps) for c in want]
        assert graphed.runner.graphs
    finally:
        graphed.close()
        eager.close()


@pytest.mark.parametrize("model_type", ["llada", "dream", "lacuna", "llama_spm", "llama_causal"])
def test_full_windows_are_the_default_and_partial_ones_an_option(model_type):
    """Every step of a diffusion model feeds its whole middle unless told otherwise (a causal
    model's window is its own either way)."""
    loaded = random_model(dataclasses.replace(PRESETS["tiny"], model_type=model_type))
    for kwargs, full in (({}, True), ({"full_windows": False}, False)):
        engine = Engine(loaded, warmup=False, **kwargs)
        try:
            assert engine.runner.full_windows is full
            assert not engine.runner.cuda_graphs  # on a CPU, never
        finally:
            engine.close()


@pytest.mark.parametrize("options", [DecodeOptions(policy="steps", steps=8), DecodeOptions(),
                                     DecodeOptions(policy="fixed", tokens_per_step=2, min_tokens=8)])
def test_full_windows_of_a_context_causal_model_are_the_uncached_steps(options):
    """A context-causal model's context keys depend on nothing after them, so feeding the whole
    middle against them is the uncached step exactly (`llama_spm`, the adapted bundled model)."""
    from test_graphs import PREFIXES, lively

    engine = Engine(lively("llama_spm"), warmup=False)
    try:
        for prefix in PREFIXES:
            cached = engine.complete(prefix, SUFFIX, 24, n=2, options=options)
            uncached = engine.complete(prefix, SUFFIX, 24, n=2, options=dataclasses.replace(options, use_cache=False))
            assert [(c.token_ids, c.steps) for c in cached] == [(c.token_ids, c.steps) for c in uncached]
    finally:
        engine.close()
