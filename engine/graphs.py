"""CUDA graphs for the denoising loop: whole steps replayed with one launch.

A step is a few hundred small kernels; launched one by one from Python they cost several times
their GPU time. So a greedy request stepping alone on CUDA runs its steps (the forward of its
whole middle and the unmasking) as replays of a graph over static tensors, as gpt-fast does for
decoding. A replay may hold GRAPH_CHUNK steps; on the H200 we measured, four steps per replay
cost exactly four times one, so a replay holds one step and a cancel still acts within a step.
On other devices `Replay` simply calls the function, so the same path is tested on CPUs.

A graphed step honours a request as its eager step does: its options (those a step reads are the
graph's key, `step_options`) and its constraints (a healed first token, split healing, a single
line: their shapes are the key, `constraint_shape`, their values copied in by `take`). A
context-causal model's block mask is static too. A causal model is never graphed: the columns it
predicts (the leftmost mask and the drafted ones) change every step. A sampled request steps
eagerly; `block_indent` acts between replays, on the request's own state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from .api import DecodeOptions, EngineError
from .model import KVCache, Transformer
from .sampler import Denoiser, Layout

GRAPH_CHUNK = 1  # denoising steps per replay; cancellation and time budgets act between replays
GRAPH_SLOTS = 256  # graphs are captured for caches of a multiple of this many slots
# DecodeOptions fields a captured step never reads, reset in its key so that requests differing
# only there share a graph: the step counts are read ahead (`counts`), a sampled request or one
# without the cache is never graphed, prompt lookup and scores are a causal model's, and
# `block_indent` ends rows between replays. A field not named here stays in the key.
STEP_IGNORES = {"steps": None, "tokens_per_step": 4, "seed": None, "use_cache": True, "refresh_every": 0,
                "lookup": 2, "score_suffix": 0, "block_indent": None}


def step_options(options: DecodeOptions) -> DecodeOptions:
    """`options` as a graphed step reads them: the fields it never reads reset (STEP_IGNORES)."""
    return dataclasses.replace(options, **STEP_IGNORES)


def constraint_shape(den: Denoiser) -> tuple[bool, int, bool]:
    """What of a request's constraints its graph's static tensors are made for: a healed first
    token, the first ids of split healing (0: none), a single line."""
    split = 0 if den.split_healing is None else len(den.split_healing[0])
    return den.first_bias is not None, split, den.line_breaks is not None


def constraint_tensors(den: Denoiser) -> list[Tensor]:
    """A denoiser's constraint tensors, in the order `constraint_shape` describes them."""
    return [t for t in (den.first_bias, *(den.split_healing or ()), *(den.line_breaks or ())) if t is not None]


class Replay:
    """`fn`, which reads and writes only tensors it keeps, captured once and replayed."""

    def __init__(self, fn: Callable[[], None], device: torch.device):
        self.fn, self.graph = fn, None
        if device.type == "cuda":
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                fn()  # warm up outside the graph: cuBLAS workspaces, kernel selection
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                fn()

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()


class StepGraph:
    """Chunks of denoising steps for one request shape: `rows` candidates, a window of `width`
    positions (the middle, after the position that predicts its first token when the logits
    are shifted), a cache of `slots` slots, one decoding policy and step counts, and the shape of
    the request's constraints (`constraint_shape`); `context_causal`: the model's context attends
    causally (Family.context_causal).

    Its tensors are static. A request moves its cache and its constraints in when it takes the
    graph over (the slots past its keys are masked), and its denoising state in and out around
    each replay.
    """

    def __init__(self, model: Transformer, rows: int, width: int, slots: int, shift: int,
                 options: DecodeOptions, counts: tuple[int | None, ...], special,
                 constraints: tuple[bool, int, bool] = (False, 0, False), context_causal: bool = False):
        device = model.device
        self.shift, middle = shift, width - shift
        self.cache = model.new_cache(rows, slots)
        self.attn_mask = torch.zeros(rows, 1, 1, slots, dtype=torch.bool, device=device)
        self.positions = torch.zeros(rows, width, dtype=torch.long, device=device)
        # The first middle position: from it on, a context-causal model's queries see every key.
        self.block_start = torch.zeros(rows, dtype=torch.long, device=device)
        attention = {"causal": True, "block_start": self.block_start} if context_causal else {}
        # Constraints of the shape given, placeholders until `take` copies in a request's.
        healed, split, single_line = constraints
        vocab = model.config.vocab_size
        self.state = Denoiser(
            Layout([special.mask] * width, shift, width), rows, options, special, device=device,
            first_tokens=torch.ones(vocab, dtype=torch.bool, device=device) if healed else None,
            split_healing=(torch.zeros(split, dtype=torch.long, device=device),
                           torch.ones(split, vocab, dtype=torch.bool, device=device)) if split else None,
            line_breaks=(torch.zeros(vocab, dtype=torch.bool, device=device),
                         torch.zeros(vocab, dtype=torch.bool, device=device)) if single_line else None)
        self.non_finite = torch.zeros((), dtype=torch.bool, device=device)
        self.steps_run = torch.zeros((), dtype=torch.long, device=device)
        self.owner: int | None = None  # the id of the request whose keys are in the cache

        def steps():
            for count in counts:
                hidden = model(self.state.x, self.positions, self.cache, attn_mask=self.attn_mask, **attention)
                logits = model.logits(hidden[:, :middle])
                self.non_finite |= ~torch.isfinite(logits).all()
                self.steps_run += self.state.masked.any()
                self.state.unmask(logits, None, count)

        self.replay = Replay(steps, device)

    def take(self, owner: int, cache: KVCache, key_mask: Tensor | None, den: Denoiser) -> tuple[KVCache, Tensor]:
        """Copy request `owner`'s context cache into the graph's, which then holds its keys, and its
        constraints; returns the graph's cache and key mask, where the request steps in place from
        now on."""
        if constraint_shape(den) != constraint_shape(self.state):
            raise ValueError(f"a graph for constraints {constraint_shape(self.state)}, not {constraint_shape(den)}")
        for mine, theirs in zip(constraint_tensors(self.state), constraint_tensors(den)):
            mine.copy_(theirs)
        own = cache.slots
        for dst, src in zip(self.cache.k + self.cache.v, cache.k + cache.v):
            dst[:, :, :own] = src
            dst[:, :, own:] = 0  # masked, but stale values of an earlier request must be finite
        self.attn_mask.zero_()
        self.attn_mask[:, 0, 0, :own] = True if key_mask is None else key_mask
        self.positions.copy_(torch.arange(den.start - self.shift, den.end, device=self.positions.device))
        self.block_start.fill_(den.start)
        self.owner = owner
        return self.cache, self.attn_mask[:, 0, 0]

    def run(self, den: Denoiser) -> None:
        """Advance `den` by one chunk of steps (fewer take effect once it is done)."""
        # In each replay: `den` may have changed in between (block_indent ends rows).
        self.state.load_window(self.shift, den.x[:, den.start - self.shift:den.end], den.masked, den.confidence,
                               den.fresh)
        self.non_finite.zero_()
        self.steps_run.zero_()
        self.replay()
        if bool(self.non_finite):
            raise EngineError("the model produced NaN or infinite logits")
        den.load_window(self.shift, self.state.x, self.state.masked, self.state.confidence,
                        self.state.fresh, int(self.steps_run))


def cache_slots(slots: int) -> int:
    """The graph cache size for a request with `slots` keys."""
    return -(-slots // GRAPH_SLOTS) * GRAPH_SLOTS

