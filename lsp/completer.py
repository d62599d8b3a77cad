"""From a cursor to candidates: span decision, context, the engine, post-processing, caches.

Typing through a shown suggestion is answered from it without the engine; recent answers sit
in a small LRU; a new request for a document cancels the one still in flight for it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

from engine.api import DecodeOptions, InfillEngine

from .config import Options
from .context import Outlines, build_context
from .document import Document
from .postprocess import Candidate, postprocess
from .span import Span, plan_span

CACHE_SIZE = 64
ALTERNATIVES_TEMPERATURE = 0.8
# Candidates are ranked by how likely the model finds each followed by this many suffix tokens (a
# causal model never reads the suffix otherwise): InCoder's left-to-right reranking.
SCORED_SUFFIX_TOKENS = 32
# How the model's positions left after the span are shared: the prefix window gets most, as the
# code before the cursor says most about what comes next; the syntax context gets the least.
PREFIX_SHARE, SUFFIX_SHARE, SYNTAX_SHARE = 5 / 8, 1 / 4, 1 / 8
PREFIX_PER_MASK = 8  # the prefix window is at most this many tokens per masked token the engine allows
SUFFIX_TOKENS = SYNTAX_TOKENS = 256  # the most the suffix window and the syntax context get
# The share of the time budget an infill's context may take: on 2 CPU cores a quarter gave 26.3%
# single-line pass@1 at a p50 of 459 ms, half 25.6% at 781 ms, an eighth 3 points less.
BUDGET_FOR_CONTEXT = 0.25
MIN_CONTEXT_TOKENS = 64  # however slow the engine, the context it gets


@dataclass
class Shown:
    """The last candidates answered for a document, and the text they were computed for."""
    before: str
    after: str
    candidates: list[Candidate]


class Completer:
    def __init__(self, options: Options, engine: InfillEngine | None = None):
        self.options = options
        self.engine = engine
        self.outlines = Outlines()
        self.cache: OrderedDict[tuple, list[Candidate]] = OrderedDict()
        self.shown: dict[str, Shown] = {}
        self.in_flight: dict[str, asyncio.Future] = {}  # uri -> the engine's work for it
        self.waiting: dict[str, object] = {}  # uri -> the newest request in its debounce
        self.last_latency_ms: float | None = None  # the engine's, for the last infill
        self.last_timing: dict[str, float] = {}  # the last request's: total and engine milliseconds
        self.accepted = 0
        self.cancelled = 0  # engine requests stopped early: by the client or by a newer request

    def use_engine(self, engine: InfillEngine) -> None:
        """The engine, once it is loaded or connected."""
        self.engine = engine

    def configure(self, options: Options) -> None:
        self.options = options

    def record_acceptance(self) -> int:
        """A suggestion was accepted; the count so far."""
        self.accepted += 1
        return self.accepted

    def warm_up(self, doc: Document) -> None:
        """Parse a document's latest edits and outline it, so the next completion finds both ready."""
        if doc.parser is not None:
            doc.reparse()
            self.outlines.of(doc)

    def forget(self, uri: str) -> None:
        self.shown.pop(uri, None)
        self.outlines.forget(uri)
        request = self.in_flight.pop(uri, None)
        if request is not None:
            request.cancel()

    def typed_through(self, doc: Document, offset: int) -> list[Candidate] | None:
        """The rest of the shown candidates when the user typed the start of them, else None."""
        shown = self.shown.get(doc.uri)
        if shown is None or offset < len(shown.before):
            return None
        text = doc.text
        if not (text.startswith(shown.before) and text.endswith(shown.after)
                and len(text) == offset + len(shown.after)):
            return None
        typed = text[len(shown.before):offset]
        rest = [Candidate(c.text[len(typed):], c.replace_suffix) for c in shown.candidates
                if c.text.startswith(typed) and len(c.text) > len(typed)]
        return rest or None

    async def complete(self, doc: Document, offset: int, documents: list[Document]) -> list[Candidate]:
        start = time.perf_counter()
        self.last_timing = {"engineMs": 0.0}
        try:
            return await self._complete(doc, offset, documents)
        finally:
            self.last_timing["totalMs"] = (time.perf_counter() - start) * 1000

    async def _complete(self, doc: Document, offset: int, documents: list[Document]) -> list[Candidate]:
        if not self.options.language_enabled(doc.language_id):
            return []
        rest = self.typed_through(doc, offset)
        if rest is not None:
            self.last_timing["typedThrough"] = 1.0
            return rest
        span = plan_span(doc, offset, self.options)
        if span is None or self.engine is None:
            return []
        # Fit the model's positions: the engine would trim the far ends, where the syntax context is.
        capacity = self.engine.capacity
        prefix_tokens = capacity.max_tokens * PREFIX_PER_MASK
        suffix_tokens, syntax_tokens = SUFFIX_TOKENS, SYNTAX_TOKENS
        room = capacity.max_context - span.tokens - capacity.reserved_tokens if capacity.max_context else None
        if capacity.context_per_second:
            # Only as much context as the engine gets through in its share of the time budget: a slow
            # device (a CPU with a real checkpoint) then suggests from less context, not nothing.
            seconds = self.options.time_budget_ms / 1000 * BUDGET_FOR_CONTEXT
            affordable = max(MIN_CONTEXT_TOKENS, int(capacity.context_per_second * seconds))
            room = affordable if room is None else min(room, affordable)
        if room is not None:
            prefix_tokens = min(prefix_tokens, int(room * PREFIX_SHARE))
            suffix_tokens = min(suffix_tokens, int(room * SUFFIX_SHARE))
            syntax_tokens = min(syntax_tokens, int(room * SYNTAX_SHARE))
        context = build_context(doc, offset, documents, self.outlines, prefix_tokens=prefix_tokens,
                                suffix_tokens=suffix_tokens, context_tokens=syntax_tokens)
        n = self.options.candidates
        key = (context.prefix, context.suffix, span, n)
        before, after = doc.text[:offset], doc.text[offset:]
        answers = self.cache.get(key)
        if answers is None:
            texts = await self._infill(doc.uri, context.prefix, context.suffix, span, n)
            if texts is None:
                return []
            answers = []
            for text in texts:
                candidate = postprocess(text, prefix=before, suffix=after, language=doc.language_id,
                                        multiline=span.multiline)
                if candidate is not None and candidate not in answers:
                    answers.append(candidate)
            self.cache[key] = answers
            while len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        self.shown[doc.uri] = Shown(before, after, answers)
        return answers

    async def _infill(self, uri: str, prefix: str, suffix: str, span: Span, n: int) -> list[str] | None:
        """The engine's texts, or None when a newer request for the document superseded this one."""
        if self.options.debounce_ms:
            self.waiting[uri] = mine = object()
            await asyncio.sleep(self.options.debounce_ms / 1000)
            if self.waiting.get(uri) is not mine:
                return None  # more typing came in: the newer request asks instead
        previous = self.in_flight.pop(uri, None)
        if previous is not None:
            previous.cancel()
        engine = self.engine
        start = time.perf_counter()
        # The first candidate is the greedy infill; alternatives to cycle through are sampled (in
        # the same denoising steps: the engine batches both requests).
        ask = dict(prefix=prefix, suffix=suffix, n_tokens=min(span.tokens, engine.capacity.max_tokens),
                   time_budget=self.options.time_budget_ms / 1000)
        # An empty infill is no suggestion: the span rules already decided one is wanted here.
        options = DecodeOptions(min_tokens=1, single_line=not span.multiline, block_indent=span.block_indent,
                                score_suffix=SCORED_SUFFIX_TOKENS if n > 1 else 0)
        parts = [engine.infill(**ask, n=1, options=options)]
        if n > 1:
            parts.append(engine.infill(**ask, n=n - 1, options=replace(
                options, temperature=ALTERNATIVES_TEMPERATURE)))
        work = asyncio.gather(*parts)
        self.in_flight[uri] = work
        try:
            completions = [c for part in await work for c in part]  # cancelling this request cancels `work` too
        except asyncio.CancelledError:
            self.cancelled += 1
            if asyncio.current_task().cancelling():
                raise  # the client cancelled this request
            return None  # a newer request cancelled it
        finally:
            if self.in_flight.get(uri) is work:
                del self.in_flight[uri]
        self.last_latency_ms = self.last_timing["engineMs"] = (time.perf_counter() - start) * 1000
        # The most likely first (the greedy one where none is scored: sorting is stable), unscored last.
        completions.sort(key=lambda c: -c.score if c.score is not None else math.inf)
        return [c.text for c in completions]
