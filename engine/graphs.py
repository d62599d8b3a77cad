"""CUDA graphs for the denoising loop: whole steps replayed with one launch.

A step is a few hundred small kernels; launched one by one from Python they cost several times
their GPU time. So a greedy request stepping alone on CUDA runs its steps (the forward of its
whole middle and the unmasking) as replays of a graph over static tensors, as gpt-fast does for
decoding. A replay may hold GRAPH_CHUNK steps; on the H200 we measured, four steps per replay
cost exactly four times one, so a replay holds one step and a cancel still acts within a step.
On other devices `Replay` simply calls the function, so the same path is tested on CPUs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .api import DecodeOptions, EngineError
from .model import KVCache, Transformer
from .sampler import Denoiser, Layout

GRAPH_CHUNK = 1  # denoising steps per replay; cancellation and time budgets act between replays
GRAPH_SLOTS = 256  # graphs are captured for caches of a multiple of this many slots


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
    are shifted), a cache of `slots` slots, one decoding policy and step counts.

    Its tensors are static. A request moves its cache in when it takes the graph over (the
    slots past its keys are masked), and its denoising state in and out around each replay.
    """

    def __init__(self, model: Transformer, rows: int, width: int, slots: int, shift: int,
                 options: DecodeOptions, counts: tuple[int | None, ...], special):
        device = model.device
        self.shift, middle = shift, width - shift
        self.cache = model.new_cache(rows, slots)
        self.attn_mask = torch.zeros(rows, 1, 1, slots, dtype=torch.bool, device=device)
        self.positions = torch.zeros(rows, width, dtype=torch.long, device=device)
        # Every token allowed first: `run` copies in a request's token-healing constraint.
        anything = torch.ones(model.config.vocab_size, dtype=torch.bool, device=device)
        self.state = Denoiser(Layout([special.mask] * width, shift, width), rows, options, special, device=device,
                              first_tokens=anything)
        self.non_finite = torch.zeros((), dtype=torch.bool, device=device)
        self.steps_run = torch.zeros((), dtype=torch.long, device=device)
        self.owner: int | None = None  # the id of the request whose keys are in the cache

        def steps():
            for count in counts:
                hidden = model(self.state.x, self.positions, self.cache, attn_mask=self.attn_mask)
                logits = model.logits(hidden[:, :middle])
                self.non_finite |= ~torch.isfinite(logits).all()
                self.steps_run += self.state.masked.any()
                self.state.unmask(logits, None, count)

        self.replay = Replay(steps, device)

    def take(self, owner: int, cache: KVCache, key_mask: Tensor | None, den: Denoiser) -> tuple[KVCache, Tensor]:
        """Copy request `owner`'s context cache into the graph's, which then holds its keys; returns
        the graph's cache and key mask, where the request steps in place from now on."""
        own = cache.slots
        for dst, src in zip(self.cache.k + self.cache.v, cache.k + cache.v):
            dst[:, :, :own] = src
            dst[:, :, own:] = 0  # masked, but stale values of an earlier request must be finite
        self.attn_mask.zero_()
        self.attn_mask[:, 0, 0, :own] = True if key_mask is None else key_mask
        self.positions.copy_(torch.arange(den.start - self.shift, den.end, device=self.positions.device))
        self.owner = owner
        return self.cache, self.attn_mask[:, 0, 0]

    def run(self, den: Denoiser) -> None:
        """Advance `den` by one chunk of steps (fewer take effect once it is done)."""
        self.state.load_window(self.shift, den.x[:, den.start - self.shift:den.end], den.masked, den.confidence)
        self.state.first_bias.copy_(0 if den.first_bias is None else den.first_bias)
        self.non_finite.zero_()
        self.steps_run.zero_()
        self.replay()
        if bool(self.non_finite):
            raise EngineError("the model produced NaN or infinite logits")
        den.load_window(self.shift, self.state.x, self.state.masked, self.state.confidence, int(self.steps_run))


def cache_slots(slots: int) -> int:
    """The graph cache size for a request with `slots` keys."""
    return -(-slots // GRAPH_SLOTS) * GRAPH_SLOTS

