"""The resident engine: one model on one device, serving infill requests from any thread.

A single worker thread owns the model. Each loop it takes the requests that have arrived,
drops cancelled and expired ones, and runs one denoising step for all the rest together:
requests whose context must be (re-)encoded share one padded full forward, the others share
one forward of their masked windows against their cached context. A request's candidates
are rows of one batch that share one context encoding.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .graphs import GRAPH_CHUNK, StepGraph, cache_slots
from .loader import BUNDLED_DIR, LoadedModel, load_checkpoint, random_model
from .model import KVCache
from .sampler import DecodeOptions, Denoiser, EngineError, build_layout


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    confidences: list[float]
    steps: int
    finish_reason: str  # "stop": the model ended it; "length": all N tokens; "budget": time ran out
    context_tokens: int = 0  # prefix and suffix tokens the model saw (after trimming), with BOS/EOS


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str) -> torch.dtype:
    # bf16 is fast on GPUs and several times slower than fp32 on CPUs without AVX512-BF16.
    return torch.bfloat16 if device in ("cuda", "mps") else torch.float32


log = logging.getLogger(__name__)
MAX_GRAPHS = 8  # captured step graphs kept, the least recently used dropped first


class Request:
    """A submitted infill: `future` resolves to a list of n Completions."""

    def __init__(self, request_id: int, denoiser: Denoiser, n: int, deadline: float | None):
        self.id = request_id
        self.denoiser = denoiser
        self.n = n
        self.deadline = deadline
        self.future: Future[list[Completion]] = Future()
        self.cancelled = threading.Event()
        self.cache: KVCache | None = None
        self.key_mask: Tensor | None = None  # (rows, slots) valid keys when the cache is padded
        self.since_encode = 0

    def result(self, timeout: float | None = None) -> list[Completion]:
        return self.future.result(timeout)

    def cancel(self) -> bool:
        """Ask the engine to stop this request within one step; False if it already finished."""
        if self.future.done():
            return False
        self.cancelled.set()
        return True


class Engine:
    def __init__(self, loaded: LoadedModel, *, max_tokens: int = 256, max_batch_rows: int = 64,
                 cuda_graphs: bool | None = None, full_windows: bool | None = None, warmup: bool = True):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.special = loaded.special
        self.family = self.model.config.family
        self.device = self.model.lm_head.weight.device
        self.max_tokens = max_tokens
        self.max_batch_rows = max_batch_rows
        # A greedy request stepping alone replays its steps as CUDA graphs (see graphs.py);
        # graphs need static shapes, so each step then feeds the whole middle (full windows)
        # rather than only the masked positions.
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.full_windows = self.cuda_graphs if full_windows is None else full_windows
        self._graphs: dict[tuple, StepGraph] = {}
        self._ids = itertools.count(1)
        self._requests: dict[int, Request] = {}
        self._incoming: queue.Queue[Request | None] = queue.Queue()
        self._merged = None  # (request ids, merged cache, key mask) of the last window batch
        # For monitoring: scheduler steps run (each a denoising step of every request in it),
        # and the most requests one step served.
        self.stats = {"steps": 0, "max_batch_requests": 0}
        self.on_step: Callable[[int], None] | None = None  # called with each step's request count
        self._worker = threading.Thread(target=self._serve, name="lacuna-engine", daemon=True)
        self._worker.start()
        atexit.register(self.close)  # the worker must not be running torch code at interpreter exit
        if warmup:
            self.complete("def f(", "):\n    pass\n", min(4, max_tokens))

    @classmethod
    def load(cls, model_dir: str | Path | None = None, device: str | None = None,
             dtype: torch.dtype | None = None, **kwargs) -> "Engine":
        """Load `model_dir`, or with none the bundled model; without that (a source tree without
        its weights), a tiny random-weight model whose output is noise."""
        device = device or default_device()
        dtype = dtype or default_dtype(device)
        if model_dir is None and not (BUNDLED_DIR / "config.json").exists():
            log.warning("no model given and the bundled model is missing (%s): using a tiny random-weight model, "
                        "whose completions are noise (give a checkpoint directory)", BUNDLED_DIR)
            return cls(random_model("tiny", device=device, dtype=dtype), **kwargs)
        return cls(load_checkpoint(model_dir or BUNDLED_DIR, device=device, dtype=dtype), **kwargs)

    # -- the API callers use, from any thread -------------------------------------------

    def submit(self, prefix: str, suffix: str, n_tokens: int, **kwargs) -> Request:
        """Queue an infill of `n_tokens` masks between `prefix` and `suffix` (see submit_ids)."""
        return self.submit_ids(self.encode(prefix), self.encode(suffix), n_tokens, **kwargs)

    def submit_ids(self, prefix: list[int], suffix: list[int], n_tokens: int, *,
                   options: DecodeOptions = DecodeOptions(), n: int = 1,
                   time_budget: float | None = None) -> Request:
        """Queue an infill between token ids, `n` candidates, answered within `time_budget` s."""
        if not 1 <= n_tokens <= self.max_tokens:
            raise ValueError(f"n_tokens must be between 1 and {self.max_tokens}, not {n_tokens}")
        if not 1 <= n <= self.max_batch_rows:
            raise ValueError(f"n must be between 1 and {self.max_batch_rows}, not {n}")
        if not self._worker.is_alive():
            raise EngineError("the engine is closed")
        layout = build_layout(
            prefix, suffix, n_tokens,
            mask=self.special.mask, bos=self.special.bos, eos=self.special.eos,
            eos_after_suffix=self.family.eos_after_suffix, shifted=self.family.logit_shift == 1,
            max_len=self.model.config.max_position_embeddings,
        )
        generator = None
        if options.temperature > 0:
            generator = torch.Generator(self.device)
            generator.manual_seed(options.seed if options.seed is not None else torch.seed())
        denoiser = Denoiser(layout, n, options, stop_ids=(self.special.eos, self.special.pad),
                            pad=self.special.pad, mask=self.special.mask, device=self.device, generator=generator)
        deadline = time.monotonic() + time_budget if time_budget is not None else None
        request = Request(next(self._ids), denoiser, n, deadline)
        self._requests[request.id] = request
        self._incoming.put(request)
        return request

    def complete(self, prefix: str, suffix: str, n_tokens: int, **kwargs) -> list[Completion]:
        return self.submit(prefix, suffix, n_tokens, **kwargs).result()

    async def infill(self, prefix: str, suffix: str, n_tokens: int, **kwargs) -> list[Completion]:
        """`submit` for asyncio callers: cancelling the awaiting task cancels the engine's work."""
        # Tokenizing a long context takes a millisecond or more: not on the event loop.
        submitted = asyncio.ensure_future(asyncio.to_thread(self.submit, prefix, suffix, n_tokens, **kwargs))
        try:
            request = await asyncio.shield(submitted)
        except asyncio.CancelledError:  # cancelled while submitting: stop the work all the same
            submitted.add_done_callback(lambda done: done.exception() or done.result().cancel())
            raise
        try:
            return await asyncio.wrap_future(request.future)
        except asyncio.CancelledError:
            request.cancel()
            raise

    @property
    def max_context(self) -> int:
        """Positions the model has for prefix, middle and suffix together."""
        return self.model.config.max_position_embeddings

    @property
    def pending(self) -> int:
        """Requests queued or being denoised."""
        return len(self._requests)

    def cancel(self, request_id: int) -> bool:
        """Cancel by id; False for an unknown or finished request."""
        request = self._requests.get(request_id)
        return request.cancel() if request else False

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        except TypeError:  # lone surrogates (undecodable bytes a client passed on): U+FFFD instead
            text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            return self.tokenizer.encode(text, add_special_tokens=False).ids

    def close(self) -> None:
        """Stop the worker; requests still queued or running fail with EngineError."""
        if self._worker.is_alive():
            self._incoming.put(None)
            self._worker.join(timeout=30)
        atexit.unregister(self.close)

    # -- the worker thread --------------------------------------------------------------

    def _serve(self) -> None:
        active: list[Request] = []
        while True:
            try:
                incoming = [self._incoming.get()] if not active else []
                while True:
                    incoming.append(self._incoming.get_nowait())
            except queue.Empty:
                pass
            if None in incoming:
                for request in active + [r for r in incoming if r]:
                    self._finish(request, error=EngineError("the engine is closed"))
                return
            active += incoming
            active = [r for r in active if not self._retire_if_over(r)]
            if active:
                batch = self._admit(active)
                try:
                    self._step(batch)
                except Exception as err:  # e.g. out of memory: fail this batch, keep serving
                    self._merged = None
                    for request in batch:
                        self._finish(request, error=EngineError(f"infill failed: {err}"))
                active = [r for r in active if not self._retire_if_over(r)]

    def _admit(self, active: list[Request]) -> list[Request]:
        """The oldest requests whose rows fit one batch."""
        batch, rows = [], 0
        for request in active:
            if rows + request.n > self.max_batch_rows and batch:
                break
            batch.append(request)
            rows += request.n
        return batch

    def _retire_if_over(self, request: Request) -> bool:
        """Resolve a request that is done, cancelled or past its deadline; True if resolved."""
        if request.future.done():  # resolved, or cancelled through an asyncio wrapper of its future
            self._forget(request)
            return True
        if request.cancelled.is_set():
            request.future.cancel()
            self._forget(request)
            return True
        if request.denoiser.done:
            self._finish(request)
            return True
        if request.deadline is not None and time.monotonic() >= request.deadline:
            self._finish(request, partial=True)
            return True
        return False

    def _finish(self, request: Request, partial: bool = False, error: Exception | None = None) -> None:
        if error is not None:
            request.future.set_exception(error)
        else:
            den = request.denoiser
            completions = []
            for ids, conf in den.result_rows(partial=partial):
                if partial:
                    reason = "budget"
                else:
                    reason = "length" if len(ids) == den.end - den.start else "stop"
                text = self.tokenizer.decode(ids, skip_special_tokens=False)
                context = den.x.shape[1] - (den.end - den.start)
                completions.append(Completion(text, ids, conf, den.steps, reason, context))
            request.future.set_result(completions)
        self._forget(request)

    def _forget(self, request: Request) -> None:
        request.cache = request.key_mask = None
        self._requests.pop(request.id, None)

    @torch.inference_mode()
    def _step(self, batch: list[Request]) -> None:
        self.stats["steps"] += 1
        self.stats["max_batch_requests"] = max(self.stats["max_batch_requests"], len(batch))
        if self.on_step is not None:
            self.on_step(len(batch))
        encode, window = [], []
        for request in batch:
            opts = request.denoiser.options
            stale = request.cache is None or not opts.use_cache or (
                opts.refresh_every and request.since_encode >= opts.refresh_every)
            (encode if stale else window).append(request)
        results = []
        if encode:
            results += self._encode_step(encode)
            self._merged = None
        if len(window) == 1 and self._run_graph(window[0]):
            window = []
        if window:
            results += self._window_step(window)
        for request, logits, columns in results:
            try:
                request.denoiser.update(logits, columns)
                request.since_encode += 1
            except EngineError as err:
                self._finish(request, error=err)

    def _encode_step(self, batch: list[Request]) -> list[tuple[Request, Tensor, Tensor]]:
        """A full forward over each request's whole sequence, filling its context cache."""
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
        shift = self.family.logit_shift
        columns = [r.denoiser.columns_to_predict() for r in batch]
        wanted, picks = _union([r.denoiser.start - shift + c for r, c in zip(batch, columns)])
        hidden = self.model(tokens, positions, cache, rows=wanted,
                            attn_mask=key_mask[:, None, None] if padded else None)
        results, offset = [], 0
        for request, x, own_columns, pick in zip(batch, rows, columns, picks):
            den, count = request.denoiser, len(x)
            logits = self.model.logits(hidden[offset:offset + count, pick])
            if den.options.use_cache:
                request.cache = cache.rows(offset, offset + count)
                request.key_mask = key_mask[offset:offset + count] if padded else None
                if count < request.n:
                    request.cache = request.cache.expand(request.n)
                    request.key_mask = request.key_mask.expand(request.n, -1) if padded else None
            request.since_encode = 0
            results.append((request, logits.expand(request.n, -1, -1), own_columns))
            offset += count
        return results

    def _window_step(self, batch: list[Request]) -> list[tuple[Request, Tensor, Tensor]]:
        """A forward of only the masked (and just decoded) positions against the cached context."""
        windows = [r.denoiser.window(self.family.logit_shift, full=self.full_windows) for r in batch]
        if len(batch) == 1:
            cache, key_mask = batch[0].cache, batch[0].key_mask
        else:
            cache, key_mask = self._merge_caches(batch)
        width = max(len(pos) for pos, _, _ in windows)
        positions = torch.cat([_pad_window(pos, width).expand(r.n, -1) for r, (pos, _, _) in zip(batch, windows)])
        tokens = torch.cat([r.denoiser.x.gather(1, pos) for r, pos in
                            zip(batch, positions.split([r.n for r in batch]))])
        mask = key_mask[:, None, None] if key_mask is not None else None
        wanted, picks = _union([rows for _, rows, _ in windows])
        hidden = self.model(tokens, positions, cache, rows=wanted, attn_mask=mask)
        results, offset = [], 0
        for request, (_, _, columns), pick in zip(batch, windows, picks):
            logits = self.model.logits(hidden[offset:offset + request.n, pick])
            results.append((request, logits, columns))
            offset += request.n
        return results

    def _run_graph(self, request: Request) -> bool:
        """Advance a lone greedy request by a chunk of graphed steps; False if it cannot be."""
        den = request.denoiser
        if not self.cuda_graphs or den.options.temperature > 0:
            return False
        chunk = GRAPH_CHUNK
        if den.options.refresh_every:
            chunk = min(chunk, den.options.refresh_every - request.since_encode)
        counts = tuple(den.step_count(den.steps + i) for i in range(chunk))
        shift = self.family.logit_shift
        key = (request.n, den.end - den.start + shift, cache_slots(request.cache.slots), den.options, counts)
        graph = self._graphs.pop(key, None)
        if graph is None:
            if len(self._graphs) >= MAX_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))  # the least recently used
            graph = StepGraph(self.model, *key[:3], shift, den.options, counts, self.special)
        self._graphs[key] = graph
        if graph.owner not in (None, request) and not graph.owner.future.done():
            return False  # another live request's keys are in it
        if request.cache is not graph.cache:
            graph.take(request)
            self._merged = None
        before = den.steps
        try:
            graph.run(den)
        except EngineError as err:
            self._finish(request, error=err)
        request.since_encode += den.steps - before
        return True

    def _merge_caches(self, batch: list[Request]) -> tuple[KVCache, Tensor]:
        """One padded cache for several requests, kept while the same requests step together."""
        key = tuple(r.id for r in batch)
        if self._merged is not None and self._merged[0] == key:
            return self._merged[1], self._merged[2]
        slots = max(r.cache.slots for r in batch)
        rows = sum(r.n for r in batch)
        merged = self.model.new_cache(rows, slots)
        key_mask = torch.zeros(rows, slots, dtype=torch.bool, device=self.device)
        offset = 0
        for request in batch:
            own, end = request.cache.slots, offset + request.n
            for dst, src in zip(merged.k + merged.v, request.cache.k + request.cache.v):
                dst[offset:end, :, :own] = src
            key_mask[offset:end, :own] = request.key_mask if request.key_mask is not None else True
            request.cache = merged.rows(offset, end)
            request.key_mask = key_mask[offset:end]
            offset = end
        self._merged = (key, merged, key_mask)
        return merged, key_mask


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
