"""The resident engine: one model on one device, serving infill requests from any thread.

A single worker thread owns the model. Each loop schedules (scheduler.py: the arrivals taken, the
finished answered, a batch admitted), runs one denoising step of the batch (runner.py), and
postprocesses it: rows whose text has left their block end, and the requests that finished are
answered. A request's own state and text work, token healing included, are in request.py.
`Engine` is the API callers use; it satisfies the `InfillEngine` protocol of api.py, as the
language server's HTTP client does.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .api import Capacity, Completion, DecodeOptions, EngineError, check_infill
from .catalog import resolve
from .loader import BUNDLED_DIR, LoadedModel, load_checkpoint, random_model
from .packed import native_bfloat16, use_int4_kernels
from .quantize import quantize_int8
from .request import Request, Vocabulary
from .runner import StepRunner
from .sampler import Denoiser, Layout, build_layout
from .scheduler import Scheduler


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str) -> torch.dtype:
    # bf16 is fast on GPUs and several times slower than fp32 on CPUs without AVX512-BF16.
    return torch.bfloat16 if device in ("cuda", "mps") else torch.float32


def _on_own_thread(work: Callable, *args, **kwargs):
    """`work`'s result, computed on a thread that ends with it.

    torch's CPU builds keep an OpenMP team of threads for each thread that ran parallel work. A
    loading thread's team beside the worker's puts more threads than cores under libgomp, which
    then stops spinning between parallel regions, and each of a forward's thousand ops waits for
    its threads to wake: on 2 cores the worker's forwards took 1.5-5x as long as on the thread
    that loaded. A thread's team ends with the thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(work, *args, **kwargs).result()


log = logging.getLogger(__name__)
SPEED_CONTEXT = 256  # context tokens of the start-up infill that measures the engine's speed


def context_speed(tokens: float, long_runs: list[float], short_runs: list[float]) -> float:
    """Context tokens per second from the times of runs that read `tokens` more context than
    the short ones: the fastest of each, as a stall only ever adds time."""
    long_run = min(long_runs)
    # Stalled short runs can leave almost no difference, which would read as a context that
    # costs nothing and let every request read the whole window: it is taken to cost at least
    # a quarter of the long run (on a CPU it is more than half; on a GPU the bound still
    # affords thousands of tokens in the default budget's share).
    return tokens / max(long_run - min(short_runs), long_run / 4)


class Engine:
    url = None  # in-process
    up = True

    def __init__(self, loaded: LoadedModel, *, max_tokens: int = 256, max_batch_rows: int = 64,
                 cuda_graphs: bool | None = None, full_windows: bool | None = None, warmup: bool = True):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.special = loaded.special
        self.config = loaded.model.config
        self.device = loaded.model.device
        self.name = loaded.name + (" (random weights)" if loaded.random_weights else "")
        self.max_tokens = max_tokens
        self.max_batch_rows = max_batch_rows
        # A diffusion model's cached step feeds its whole middle (full windows): Fast-dLLM's dual
        # cache, whose quality its authors measured, and for a context-causal family exactly the
        # uncached step. `full_windows=False` feeds only the masked positions and those decoded
        # last step (partial windows, the keys of earlier decoded ones kept): less work a step,
        # but another infill than the uncached reference in about a third of greedy cases. A
        # causal model feeds only the positions it predicts from, either way.
        full_windows = True if full_windows is None else full_windows
        # A greedy request stepping alone replays its steps as CUDA graphs (see graphs.py), which
        # need static shapes: full windows.
        if cuda_graphs is None:  # a causal model's steps of one token gain little from graphs;
            family = self.config.family  # a context-causal one's are not yet measured on a GPU
            cuda_graphs = (self.device.type == "cuda" and full_windows
                           and not (family.causal or family.context_causal))
        self.runner = StepRunner(loaded, cuda_graphs=cuda_graphs, full_windows=full_windows)
        self.scheduler = Scheduler(max_batch_rows)
        self.vocabulary = Vocabulary(self.tokenizer, self.config.vocab_size, self.device)
        self._ids = itertools.count(1)
        # For monitoring: scheduler steps run (each a denoising step of every request in it),
        # and the most requests one step served.
        self.stats = {"steps": 0, "max_batch_requests": 0}
        self.on_step: Callable[[int], None] | None = None  # called with each step's request count
        self._worker = threading.Thread(target=self._serve, name="lacuna-engine", daemon=True)
        self._worker.start()
        atexit.register(self.close)  # the worker must not be running torch code at interpreter exit
        self.context_per_second: float | None = None  # measured by warm_up
        if warmup:
            self.warm_up()

    @classmethod
    def load(cls, model_dir: str | Path | None = None, device: str | None = None,
             dtype: torch.dtype | None = None, int8: bool = False, int4: bool = True, **kwargs) -> Engine:
        """Load `model_dir` (a directory or a pulled model's name), or with none the bundled model;
        without that (a source tree without its weights), a tiny random-weight model whose output
        is noise. `int8`: quantize the linear layers for a CPU (quantize.py). `int4`: on a CPU,
        decode steps multiply weights stored 4-bit as they are, and a context multiplies their
        float values in bfloat16 where the CPU does that in hardware (packed.py)."""
        device = device or default_device()
        dtype = dtype or default_dtype(device)
        if model_dir is None and not (BUNDLED_DIR / "config.json").exists():
            log.warning("no model given and the bundled model is missing (%s): using a tiny random-weight model, "
                        "whose completions are noise (give a checkpoint directory)", BUNDLED_DIR)
            return cls(_on_own_thread(random_model, "tiny", device=device, dtype=dtype), **kwargs)
        model_dir = BUNDLED_DIR if model_dir is None else resolve(str(model_dir))

        def prepare() -> LoadedModel:
            loaded = load_checkpoint(model_dir, device=device, dtype=dtype)
            if int8 and device == "cpu":
                quantize_int8(loaded)
            elif int8:
                log.warning("int8 is for CPUs: the model runs in %s on %s", dtype, device)
            elif int4 and device == "cpu":
                context_dtype = torch.bfloat16 if native_bfloat16() else dtype
                use_int4_kernels(loaded.model, loaded.packed, context_dtype)
            loaded.packed = {}  # the layers hold what they need: the parts need not live on (65 MB)
            return loaded

        return cls(_on_own_thread(prepare), **kwargs)

    # -- the API callers use, from any thread -------------------------------------------

    def submit(self, prefix: str, suffix: str, n_tokens: int, **kwargs) -> Request:
        """Queue an infill of `n_tokens` masks between `prefix` and `suffix` (see submit_ids); for
        families trained on whole documents, the prefix's last token is healed (Vocabulary.healed)."""
        prefix_ids = self.encode(prefix)
        healed = self.vocabulary.healed(prefix, prefix_ids) if self.config.family.token_healing else ""
        return self.submit_ids(prefix_ids[:-1] if healed else prefix_ids, self.encode(suffix), n_tokens,
                               healed=healed, **kwargs)

    def submit_ids(self, prefix: list[int], suffix: list[int], n_tokens: int, *,
                   options: DecodeOptions = DecodeOptions(), n: int = 1,
                   time_budget: float | None = None, healed: str = "") -> Request:
        """Queue an infill between token ids, `n` candidates, answered within `time_budget` s.
        With `healed`, the text the prefix gave back (see submit), the first mask holds a token
        that starts with it."""
        if not 1 <= n_tokens <= self.max_tokens:
            raise ValueError(f"n_tokens must be between 1 and {self.max_tokens}, not {n_tokens}")
        if not 1 <= n <= self.max_batch_rows:
            raise ValueError(f"n must be between 1 and {self.max_batch_rows}, not {n}")
        check_infill(n_tokens, options, time_budget)
        if not self._worker.is_alive():
            raise EngineError("the engine is closed")
        family = self.config.family
        layout = self.layout(prefix, suffix, n_tokens)
        if options.ordering is None:
            options = dataclasses.replace(options, ordering=family.ordering)
        generator = None
        if options.temperature > 0:
            generator = torch.Generator(self.device)
            generator.manual_seed(options.seed if options.seed is not None else torch.seed())
        constraints = self.vocabulary.constraints(healed, split=family.causal, single_line=options.single_line)
        denoiser = Denoiser(layout, n, options, self.special, device=self.device, generator=generator,
                            causal=family.causal, schedule=family.schedule, **constraints)
        deadline = time.monotonic() + time_budget if time_budget is not None else None
        scored_suffix = None
        # From the context's cached keys (none without the cache), within the model's positions.
        if options.score_suffix and family.causal and options.use_cache:
            room = self.config.max_position_embeddings - layout.end
            # A fill-in-the-middle model read the suffix in its prompt: a middle is scored as one
            # that ends there, followed by the end of its text.
            scored_suffix = [self.special.eos][:room] if family.fim else suffix[:min(options.score_suffix, room)]
        request = Request(next(self._ids), denoiser, n, deadline, healed, scored_suffix)
        self.scheduler.add(request)
        return request

    def layout(self, prefix: list[int], suffix: list[int], n_tokens: int) -> Layout:
        """The model's input for an infill, as its family was trained: `[BOS] prefix MASK*N suffix [EOS]`
        (a causal model never reads the suffix: it is left out), or a fill-in-the-middle family's
        prompt `PRE prefix SUF suffix MID MASK*N` (it reads the suffix before the middle)."""
        family = self.config.family
        return build_layout(prefix, [] if family.causal and not family.fim else suffix, n_tokens,
                            mask=self.special.mask, bos=self.special.bos, eos=self.special.eos,
                            eos_after_suffix=family.eos_after_suffix, shifted=family.logit_shift == 1,
                            max_len=self.config.max_position_embeddings, separator=self.special.separator,
                            fim=self.special.fim)

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
    def capacity(self) -> Capacity:
        family = self.config.family
        # The layout's lead is BOS (or, for a shifted model without one, EOS before an empty prefix);
        # a fill-in-the-middle prompt adds its sentinels instead.
        lead = 1 if self.special.bos is not None or family.logit_shift else 0
        lead = len(family.fim) if family.fim else lead
        return Capacity(self.max_tokens, self.config.max_position_embeddings,
                        lead + int(family.eos_after_suffix), self.context_per_second)

    def warm_up(self) -> None:
        """The start-up step (`Engine(warmup=True)`, the default, takes it): a first infill pays the
        one-time costs (kernels chosen, memory allocated), then the context's speed is measured for
        `capacity` to report."""
        self.complete("def f(", "):\n    pass\n", min(4, self.max_tokens))
        self.context_per_second = self._measure_context_speed()

    def _measure_context_speed(self) -> float:
        """Context tokens per second that a single-line infill's context costs: its time after a
        realistic context less its time after an eighth of it, per token of the difference. A
        server fits its context to this, so that a slow device (a CPU with a real checkpoint)
        answers within its time budget with less context rather than not at all; what the answer's
        own steps cost, whatever the context, is not counted against the context."""
        room = min(SPEED_CONTEXT, self.config.max_position_embeddings // 2)
        short = room // 8
        # Not drafted by prompt lookup, which would copy the repeated lines.
        options = DecodeOptions(policy="fixed", lookup=0)

        def seconds(run: int, length: int) -> float:
            # Each run's own first line: no context starts like another's, so no keys are reused.
            context = self.encode(f"# run {run}\n" + "total = total + 1\n" * 100)[:length]
            start = time.perf_counter()
            self.submit_ids(context, [], min(4, self.max_tokens), options=options).result()
            return time.perf_counter() - start

        # Three each, taking turns: these machines are shared and a run can stall.
        times = [seconds(run, room if run % 2 else short) for run in range(1, 7)]
        return context_speed(room - short, times[0::2], times[1::2])

    @property
    def pending(self) -> int:
        """Requests queued or being denoised."""
        return len(self.scheduler.requests)

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
            self.scheduler.close()
            self._worker.join(timeout=30)
        atexit.unregister(self.close)

    # -- the worker thread --------------------------------------------------------------

    def _serve(self) -> None:
        """The worker: each loop schedules a batch, runs its step and postprocesses it; once the
        engine closes, what is left fails."""
        while self.scheduler.receive():
            batch = self._schedule()
            if batch:
                self._postprocess(self._run(batch))
        for request in self.scheduler.drain():
            if not request.future.done():  # not cancelled through an asyncio wrapper meanwhile
                self._resolve(request, error=EngineError("the engine is closed"))

    def _schedule(self) -> list[Request]:
        """Answer the requests that have left since the last step; the batch to step next, counted."""
        self._retire()
        batch = self.scheduler.batch()
        if batch:
            self.stats["steps"] += 1
            self.stats["max_batch_requests"] = max(self.stats["max_batch_requests"], len(batch))
            if self.on_step is not None:
                self.on_step(len(batch))
        return batch

    def _run(self, batch: list[Request]) -> list[tuple[Request, EngineError]]:
        """One denoising step of `batch`, then each row whose text has left its block ended; the
        requests that failed."""
        try:
            failed = self.runner.step(batch)
            # Within the guard: reading the rows' tokens is where a failed GPU step surfaces.
            for request in batch:
                request.end_rows_past_block(self.vocabulary)
            return failed
        except Exception as err:  # e.g. out of memory: fail this batch, keep serving
            self.runner.reset()
            return [(request, EngineError(f"infill failed: {err}")) for request in batch]

    def _postprocess(self, failed: list[tuple[Request, EngineError]]) -> None:
        """Answer the requests that failed, then those the step finished."""
        for request, error in failed:
            self._resolve(request, error=error)
        self._retire()

    def _retire(self) -> None:
        for request, why in self.scheduler.retire():
            if why == "cancelled":
                request.future.cancel()
            elif why in ("done", "budget"):
                self._resolve(request, partial=why == "budget")
            self.runner.forget(request.id)

    def _resolve(self, request: Request, partial: bool = False, error: Exception | None = None) -> None:
        """Set the request's answer (its completions, or `error`) and drop its context cache."""
        completions = None
        if error is None:
            rows = request.denoiser.result_rows(partial=partial)
            scores = self._scores(request, rows) if not partial else [None] * len(rows)  # out of time: no forwards
            completions = request.completions(rows, scores, partial, self.vocabulary)
        self.runner.forget(request.id)
        request.answer(completions, error)

    def _scores(self, request: Request, rows: list[tuple[list[int], list[float]]]) -> list[float | None]:
        """Each row's score (DecodeOptions.score_suffix), from the request's context cache: before
        `forget`. None where the request asks none or scoring failed."""
        if request.scored_suffix is not None:
            try:
                return self.runner.score(request, [ids for ids, _ in rows], request.scored_suffix)
            except Exception as err:  # e.g. out of memory: the completions stand unscored
                log.warning("scoring the completions failed: %s", err)
        return [None] * len(rows)
