"""One denoising step for a batch of requests: the model's forwards and the context caches.

Requests whose context must be (re-)encoded share one padded full forward, the others share one
forward of their masked windows against their cached context; a greedy request stepping alone on
CUDA replays its steps as a CUDA graph (graphs.py). A request's candidates are rows of one batch
that share one context encoding. The runner owns every context cache; a request's denoiser
changes only through its own methods.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .api import EngineError
from .graphs import GRAPH_CHUNK, StepGraph, cache_slots, constraint_shape, step_options
from .loader import LoadedModel
from .model import KVCache
from .request import Request

MAX_GRAPHS = 8  # captured step graphs kept, the least recently used dropped first
# Memory for the keys of finished contexts kept for reuse (ContextStore): 256 MiB holds about
# 5,500 tokens of the bundled model's (46 KB a token in fp32), a few files' worth.
CONTEXT_STORE_BYTES = 256 * 2**20
MIN_REUSE = 16  # fewer shared tokens are encoded again: copying their keys saves nothing


@dataclass
class Context:
    """A request's cached keys and values, which slots hold its keys when the cache is padded,
    and the steps run since the context was encoded."""

    cache: KVCache
    key_mask: Tensor | None  # (rows, slots); None: every slot
    since_encode: int = 0
    # A causal or context-causal model's tokens before the middle: their keys depend on nothing
    # after them, so a later request whose context starts the same (the same file, typed on)
    # reuses them.
    context_tokens: Tensor | None = None


class StepRunner:
    def __init__(self, loaded: LoadedModel, *, cuda_graphs: bool, full_windows: bool):
        self.model = loaded.model
        self.special = loaded.special
        self.shift = self.model.config.family.logit_shift
        self.causal = self.model.config.family.causal
        # Its context's keys depend on nothing after them either; its middle attends both ways.
        self.context_causal = self.model.config.family.context_causal
        self.device = self.model.device
        self.cuda_graphs = cuda_graphs
        self.full_windows = full_windows
        self.contexts: dict[int, Context] = {}  # by request id
        self.store = ContextStore()  # finished contexts whose keys a later request may reuse
        self.graphs: dict[tuple, StepGraph] = {}
        self._merged = None  # (request ids, merged cache, key mask) of the last window batch

    def forget(self, request_id: int) -> None:
        context = self.contexts.pop(request_id, None)
        if context is not None and context.context_tokens is not None:
            self.store.add(context)

    def reset(self) -> None:
        """After a failed step: no merged cache survives it."""
        self._merged = None

    @torch.inference_mode()
    def step(self, batch: list[Request]) -> list[tuple[Request, EngineError]]:
        """Advance every request of `batch` by one denoising step (a lone graphed one by a chunk);
        the requests that failed, with why."""
        encode, window = [], []
        for request in batch:
            opts, context = request.denoiser.options, self.contexts.get(request.id)
            stale = context is None or not opts.use_cache or (
                opts.refresh_every and context.since_encode >= opts.refresh_every)
            (encode if stale else window).append(request)
        results, failed = [], []
        for request in list(encode):
            kept, reused = self._reusable(request)
            if reused:
                results.append(self._encode_after(request, kept, reused))
                encode.remove(request)
        if encode:
            results += self._encode_step(encode)
            self._merged = None
        graph = self._graph_for(window[0]) if len(window) == 1 else None
        if graph is not None:
            failed += self._graph_step(window[0], graph)
            window = []
        if window:
            results += self._window_step(window)
        for request, logits, columns in results:
            try:
                request.denoiser.update(logits, columns)
            except EngineError as err:
                failed.append((request, err))
            if request.id in self.contexts:
                self.contexts[request.id].since_encode += 1
        return failed

    def _encode_step(self, batch: list[Request]) -> list[tuple[Request, Tensor, Tensor]]:
        """A full forward over each request's whole sequence (a causal model's up to the middle),
        filling its context cache."""
        # Candidates share one encoding until their middles differ.
        rows = [r.denoiser.x[:1] if r.denoiser.steps == 0 else r.denoiser.x for r in batch]
        longest = max(x.shape[1] for x in rows)
        padded = any(x.shape[1] < longest for x in rows)
        # Shorter rows are padded by repeating their first token at position 0, which writes the
        # same keys again; the cache slots past a row's end stay masked.
        tokens = torch.cat([F.pad(x, (0, longest - x.shape[1]), value=int(x[0, 0])) for x in rows])
        positions = torch.cat([F.pad(torch.arange(x.shape[1], device=self.device), (0, longest - x.shape[1]))
                               .expand(len(x), -1) for x in rows])
        key_mask = torch.cat([(torch.arange(longest, device=self.device) < x.shape[1]).expand(len(x), -1)
                              for x in rows]) if padded else None
        cache = self.model.new_cache(tokens.shape[0], longest)
        columns = [r.denoiser.columns_to_predict() for r in batch]
        wanted, picks = _union([r.denoiser.start - self.shift + c for r, c in zip(batch, columns)])
        # A causal model's keys after the positions it predicts from are never read before those
        # positions are decoded (and fed then): its masks are not fed here.
        fed = int(wanted.max()) + 1 if self.causal else longest
        hidden = self.model(tokens[:, :fed], positions[:, :fed], cache, rows=wanted,
                            attn_mask=key_mask[:, None, None] if padded else None,
                            **self._attention([r.denoiser.start for r in batch], [len(x) for x in rows]))
        results, offset = [], 0
        for request, x, own_columns, pick in zip(batch, rows, columns, picks):
            count = len(x)
            logits = self.model.logits(hidden[offset:offset + count, pick])
            if request.denoiser.options.use_cache:
                own_cache = cache.rows(offset, offset + count)
                own_mask = key_mask[offset:offset + count] if padded else None
                if count < request.n:
                    own_cache = own_cache.expand(request.n)
                    own_mask = own_mask.expand(request.n, -1) if padded else None
                tokens = x[0, :request.denoiser.start] if self.causal or self.context_causal else None
                self.contexts[request.id] = Context(own_cache, own_mask, context_tokens=tokens)
            results.append((request, logits.expand(request.n, -1, -1), own_columns))
            offset += count
        return results

    @torch.inference_mode()
    def score(self, request: Request, middles: list[list[int]], suffix: list[int]) -> list[float]:
        """A causal model's log-likelihood of each of `middles` and then `suffix` after `request`'s
        context, from its cached keys (so before `forget`): one forward of the distinct ones."""
        den, context = request.denoiser, self.contexts[request.id]
        last = den.start - 1  # the context's last token, which predicts the middle's first
        # Sampled candidates often repeat; every row's context is the same.
        targets = list(dict.fromkeys(tuple(middle + suffix) for middle in middles))
        rows, width = len(targets), max(map(len, targets))
        if not width:
            return [0.0] * len(middles)  # nothing to predict: certain
        cache = self.model.new_cache(rows, last + width)
        for dst, src in zip(cache.k + cache.v, context.cache.k + context.cache.v):
            dst[:, :, :last] = src[:1, :, :last]
        # Shorter rows are padded at the end (-1: not scored), where no real token looks.
        padded = torch.tensor([row + (-1,) * (width - len(row)) for row in targets], device=self.device)
        fed = torch.cat((den.x[:1, last:last + 1].expand(rows, 1), padded[:, :-1].clamp_min(0)), dim=1)
        positions = torch.arange(last, last + width, device=self.device).expand(rows, -1)
        logits = self.model.logits(self.model(fed, positions, cache, causal=True))
        losses = F.cross_entropy(logits.transpose(1, 2), padded, ignore_index=-1, reduction="none")
        by_target = dict(zip(targets, (-losses.sum(-1)).tolist()))
        return [by_target[tuple(middle + suffix)] for middle in middles]

    def _attention(self, starts: list[int], rows: list[int]) -> dict:
        """The model's attention arguments for rows of requests whose middles start at `starts`."""
        if not self.context_causal:
            return {"causal": self.causal}
        block = torch.tensor(starts, device=self.device).repeat_interleave(torch.tensor(rows, device=self.device))
        return {"causal": True, "block_start": block}

    def _reusable(self, request: Request) -> tuple[Context | None, int]:
        """The kept context whose keys `request` can reuse, and for how many leading context
        tokens: none for a bidirectional model, or without a cache."""
        den = request.denoiser
        if not (self.causal or self.context_causal) or not den.options.use_cache or den.steps:
            return None, 0  # (a re-encode feeds every candidate)
        # The last context token is always fed: it predicts the first masked one.
        return self.store.longest(den.x[0, :den.start - 1])

    def _encode_after(self, request: Request, kept: Context, reused: int) -> tuple[Request, Tensor, Tensor]:
        """`_encode_step` for a request whose first `reused` context tokens have their keys in
        the `kept` context: only the rest is fed."""
        den = request.denoiser
        cache = self.model.new_cache(1, den.x.shape[1])
        for dst, src in zip(cache.k + cache.v, kept.cache.k + kept.cache.v):
            dst[:, :, :reused] = src[:1, :, :reused]
        columns = den.columns_to_predict()
        # A causal model's up to the middle only: keys of masks are never read (each is fed once
        # decoded). A context-causal model's middle is fed too: it attends to itself.
        fed = den.start if self.causal else den.end
        positions = torch.arange(reused, fed, device=self.device)[None]
        hidden = self.model(den.x[:1, reused:fed], positions, cache, rows=den.start - self.shift + columns - reused,
                            **self._attention([den.start], [1]))
        own = cache if request.n == 1 else cache.expand(request.n)
        self.contexts[request.id] = Context(own, None, context_tokens=den.x[0, :den.start])
        return request, self.model.logits(hidden).expand(request.n, -1, -1), columns

    def _window_step(self, batch: list[Request]) -> list[tuple[Request, Tensor, Tensor]]:
        """A forward of only the masked (and just decoded) positions against the cached context."""
        windows = [r.denoiser.window(self.shift, full=self.full_windows) for r in batch]
        if len(batch) == 1:
            context = self.contexts[batch[0].id]
            cache, key_mask = context.cache, context.key_mask
        else:
            cache, key_mask = self._merge_caches(batch)
        width = max(len(pos) for pos, _, _ in windows)
        positions = torch.cat([_pad_window(pos, width).expand(r.n, -1) for r, (pos, _, _) in zip(batch, windows)])
        tokens = torch.cat([r.denoiser.x.gather(1, pos) for r, pos in
                            zip(batch, positions.split([r.n for r in batch]))])
        mask = key_mask[:, None, None] if key_mask is not None else None
        wanted, picks = _union([rows for _, rows, _ in windows])
        hidden = self.model(tokens, positions, cache, rows=wanted, attn_mask=mask,
                            **self._attention([r.denoiser.start for r in batch], [r.n for r in batch]))
        results, offset = [], 0
        for request, (_, _, columns), pick in zip(batch, windows, picks):
            logits = self.model.logits(hidden[offset:offset + request.n, pick])
            results.append((request, logits, columns))
            offset += request.n
        return results

    def _graph_for(self, request: Request) -> StepGraph | None:
        """The graph that steps a lone greedy request of a diffusion model; None without graphs, or
        while another live request's keys are in the graph it needs. A causal model's columns
        change every step: it is never graphed."""
        den, context = request.denoiser, self.contexts[request.id]
        if not self.cuda_graphs or self.causal or den.options.temperature > 0:
            return None
        chunk = GRAPH_CHUNK
        if den.options.refresh_every:
            chunk = min(chunk, den.options.refresh_every - context.since_encode)
        counts = tuple(den.step_count(den.steps + i) for i in range(chunk))
        key = (request.n, den.end - den.start + self.shift, cache_slots(context.cache.slots),
               step_options(den.options), counts, constraint_shape(den))
        graph = self.graphs.pop(key, None)
        if graph is None:
            if len(self.graphs) >= MAX_GRAPHS:
                self.graphs.pop(next(iter(self.graphs)))  # the least recently used
            graph = StepGraph(self.model, *key[:3], self.shift, key[3], counts, self.special, key[5],
                              context_causal=self.context_causal)
        self.graphs[key] = graph
        return None if graph.owner not in (None, request.id) and graph.owner in self.contexts else graph

    def _graph_step(self, request: Request, graph: StepGraph) -> list[tuple[Request, EngineError]]:
        """Advance a request by a chunk of graphed steps, its cache moved into the graph first."""
        den, context = request.denoiser, self.contexts[request.id]
        if context.cache is not graph.cache:
            context.cache, context.key_mask = graph.take(request.id, context.cache, context.key_mask, den)
            self._merged = None
        before = den.steps
        try:
            graph.run(den)
        except EngineError as err:
            return [(request, err)]
        context.since_encode += den.steps - before
        return []

    def _merge_caches(self, batch: list[Request]) -> tuple[KVCache, Tensor]:
        """One padded cache for several requests, kept while the same requests step together."""
        key = tuple(r.id for r in batch)
        if self._merged is not None and self._merged[0] == key:
            return self._merged[1], self._merged[2]
        contexts = [self.contexts[r.id] for r in batch]
        slots = max(c.cache.slots for c in contexts)
        rows = sum(r.n for r in batch)
        merged = self.model.new_cache(rows, slots)
        key_mask = torch.zeros(rows, slots, dtype=torch.bool, device=self.device)
        offset = 0
        for request, context in zip(batch, contexts):
            own, end = context.cache.slots, offset + request.n
            for dst, src in zip(merged.k + merged.v, context.cache.k + context.cache.v):
                dst[offset:end, :, :own] = src
            key_mask[offset:end, :own] = context.key_mask if context.key_mask is not None else True
            context.cache, context.key_mask = merged.rows(offset, end), key_mask[offset:end]
            offset = end
        self._merged = (key, merged, key_mask)
        return merged, key_mask


class ContextStore:
    """The keys of finished contexts of a causal or context-causal model, by their token ids,
    within `max_bytes`, the least recently used dropped first (llama.cpp's prompt cache, SGLang's
    radix cache in a flat list): a request reuses those of the longest context its own starts
    with, and encodes only the rest. Exact: such keys depend on nothing after them."""

    def __init__(self, max_bytes: int = CONTEXT_STORE_BYTES):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, Context] = OrderedDict()
        self._ids = itertools.count()

    @property
    def bytes(self) -> int:
        return sum(_cache_bytes(c.cache) for c in self.entries.values())

    def add(self, context: Context) -> None:
        """Keep `context`'s keys of its context tokens (one row, a copy); a kept context that
        starts it whole is dropped, as this one covers it."""
        tokens = context.context_tokens.clone()  # not a view that holds a request's rows
        n = len(tokens)
        for key, kept in list(self.entries.items()):
            m = len(kept.context_tokens)
            if m <= n and torch.equal(kept.context_tokens, tokens[:m]):
                del self.entries[key]
        cache = KVCache.of(*([t[:1, :, :n].clone() for t in ts] for ts in (context.cache.k, context.cache.v)))
        if _cache_bytes(cache) > self.max_bytes:
            return
        self.entries[next(self._ids)] = Context(cache, None, context_tokens=tokens)
        while self.bytes > self.max_bytes:
            self.entries.popitem(last=False)

    def longest(self, tokens: Tensor) -> tuple[Context | None, int]:
        """The kept context sharing the most leading tokens with `tokens` (at least MIN_REUSE),
        and how many."""
        best, best_key, most = None, None, 0
        for key, kept in self.entries.items():
            n = min(len(kept.context_tokens), len(tokens))
            same = int((kept.context_tokens[:n] == tokens[:n]).int().cumprod(0).sum())
            if same > max(most, MIN_REUSE - 1):
                best, best_key, most = kept, key, same
        if best_key is not None:
            self.entries.move_to_end(best_key)
        return best, most

    def clear(self) -> None:
        self.entries.clear()


def _cache_bytes(cache: KVCache) -> int:
    return sum(t.numel() * t.element_size() for t in cache.k + cache.v)


def _pad_window(positions: Tensor, width: int) -> Tensor:
    """Pad a window to `width` by repeating its first position: the repeated write stores the
    same keys again, and the extra rows are never read."""
    return torch.cat((positions, positions[:1].expand(width - len(positions))))


def _union(indices: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """The sorted union of index sets, and where each set's members sit in it."""
    if len(indices) == 1:
        return indices[0], [torch.arange(len(indices[0]), device=indices[0].device)]
    union = torch.cat(indices).unique()
    return union, [torch.searchsorted(union, i) for i in indices]
