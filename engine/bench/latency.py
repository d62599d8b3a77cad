"""Infill latency benchmark: the diffusion samplers against an autoregressive baseline.

Every sampler fills the same middle between the same context on the same network:
- reference: no cache, one full forward per step, one token per step;
- cached: the dual context cache, same steps;
- cached+threshold: the cache plus parallel decoding (confidence threshold; with random
  weights, which have no meaningful confidence, a fixed number of tokens per step);
- autoregressive: the network run causally, one token per step with a KV cache, the
  baseline users would otherwise pick.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time

import torch

from ..api import DecodeOptions
from ..catalog import resolve
from ..config import PRESETS
from ..engine import Engine, default_device, default_dtype
from ..graphs import GRAPH_CHUNK, Replay
from ..loader import load_checkpoint, random_model
from ..quantize import quantize_int8

SAMPLERS = ("reference", "cached", "cached+threshold", "autoregressive")
# Peak memory bandwidth, GB/s, for the per-step lower bound (weight bytes / bandwidth).
HBM_GBPS = {"H100": 3350, "H200": 4800, "A100": 2039}


def decode_options(sampler: str, random_weights: bool, tokens_per_step: int) -> DecodeOptions:
    if sampler == "reference":
        return DecodeOptions(policy="steps", use_cache=False)
    if sampler == "cached":
        return DecodeOptions(policy="steps")
    if random_weights:
        return DecodeOptions(policy="fixed", tokens_per_step=tokens_per_step)
    return DecodeOptions(policy="threshold")


class Autoregressive:
    """The baseline: the network run causally, greedy, one token per step with a KV cache.

    On CUDA it decodes in chunks of GRAPH_CHUNK steps replayed as one CUDA graph over a masked,
    fixed-size cache, exactly as the diffusion engine steps, so both pay the same launch costs.
    """

    def __init__(self, model, graphs: bool | None = None):
        self.model = model
        device = model.device
        self.graphed = device.type == "cuda" if graphs is None else graphs  # on CPUs: replayed eagerly
        self.graphs: dict[int, tuple[Replay, dict]] = {}

    @torch.inference_mode()
    def __call__(self, context: list[int], n: int) -> list[int]:
        model, device, graphed = self.model, self.model.device, self.graphed
        slots = len(context) + n + GRAPH_CHUNK  # room for a last chunk's extra steps
        if graphed:
            replay, state = self.graphs.get(slots) or self._graph(slots)
            cache = state["cache"]
        else:
            cache = model.new_cache(1, slots)
        last = torch.tensor([len(context) - 1], device=device)
        hidden = model(torch.tensor([context], device=device), torch.arange(len(context), device=device)[None],
                       cache, rows=last, kv_len=len(context), causal=True)
        token = model.logits(hidden[:, -1]).argmax(-1, keepdim=True)
        out = [token[0]]
        if graphed:
            state["token"].copy_(token)
            state["position"].fill_(len(context))
            state["mask"].zero_()
            state["mask"][..., :len(context)] = True
            for _ in range(0, n - 1, GRAPH_CHUNK):
                replay()
                out.append(state["chunk"].clone())
        else:
            for position in range(len(context), len(context) + n - 1):
                hidden = model(token, torch.full((1, 1), position, device=device), cache, kv_len=position + 1)
                token = model.logits(hidden[:, -1]).argmax(-1, keepdim=True)
                out.append(token[0])
        return torch.cat(out)[:n].tolist()  # one host sync, at the end

    def _graph(self, slots: int) -> tuple[Replay, dict]:
        model, device = self.model, self.model.device
        state = {
            "cache": model.new_cache(1, slots),
            "token": torch.zeros(1, 1, dtype=torch.long, device=device),
            "position": torch.zeros(1, 1, dtype=torch.long, device=device),
            "mask": torch.zeros(1, 1, 1, slots, dtype=torch.bool, device=device),
            "chunk": torch.zeros(GRAPH_CHUNK, dtype=torch.long, device=device),
        }

        def steps():
            for i in range(GRAPH_CHUNK):
                state["mask"].scatter_(3, state["position"].view(1, 1, 1, 1), True)
                hidden = model(state["token"], state["position"], state["cache"], attn_mask=state["mask"])
                state["token"].copy_(model.logits(hidden[:, -1]).argmax(-1, keepdim=True))
                state["chunk"][i] = state["token"][0, 0]
                state["position"] += 1

        self.graphs[slots] = Replay(steps, device), state
        return self.graphs[slots]


def _timed(fn, reps: int, sync) -> list[float]:
    return _timed_alternating([fn], reps, sync)[0]


def _timed_alternating(fns: list, reps: int, sync) -> list[list[float]]:
    """Each of `fns`' times in ms over `reps` runs, their runs alternating, so that a slow spell of
    a shared machine falls on each alike."""
    for fn in fns:
        fn()  # warm-up: kernels, allocator, autotuning
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, own in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            own.append((time.perf_counter() - start) * 1000)
    return times


def _bandwidth_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in HBM_GBPS.items() if key in name), None)


def run(engine: Engine, *, shape: str, contexts=(512, 2048), middles=(16, 32, 64, 128),
        samplers=SAMPLERS, reps: int = 5, tokens_per_step: int = 4, progress=None,
        partial: Engine | None = None) -> list[dict]:
    """The rows of every sampler at every context and middle size. With `partial`, an engine of
    the same model with partial windows (Engine(full_windows=False)), the cached samplers also
    run on it, their runs alternating with `engine`'s; its rows carry `windows` "partial" and
    `vs_full`, their median time over the full windows' (`engine`'s rows, `windows` "full")."""
    model = engine.loaded.model
    device = engine.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = _bandwidth_gbps(device)
    rng = random.Random(0)
    autoregressive = Autoregressive(model)
    rows = []
    for context in contexts:
        ids = [rng.randrange(256) for _ in range(context)]  # byte tokens exist in every vocabulary
        prefix, suffix = ids[: context * 3 // 4], ids[context * 3 // 4:]
        for middle in middles:
            for sampler in samplers:
                windows = ["full", "partial"] if partial is not None and sampler.startswith("cached") else [None]
                steps = [middle] * len(windows)
                if sampler == "autoregressive":
                    fns = [lambda: autoregressive(suffix + prefix, middle)]
                else:
                    opts = decode_options(sampler, engine.loaded.random_weights, tokens_per_step)

                    def infill(i, own, opts=opts):
                        steps[i] = own.submit_ids(prefix, suffix, middle, options=opts).result()[0].steps
                    engines = [engine, partial][:len(windows)]
                    fns = [lambda i=i, own=own: infill(i, own) for i, own in enumerate(engines)]
                medians = []
                for kind, times, own_steps in zip(windows, _timed_alternating(fns, reps, sync), steps):
                    p50 = statistics.median(times)
                    medians.append(p50)
                    row = {
                        "sampler": sampler, "shape": shape, "device": str(device),
                        "dtype": str(model.dtype).removeprefix("torch."),
                        "context": context, "middle": middle, "steps": own_steps,
                        "p50_ms": round(p50, 3),
                        "p95_ms": round(sorted(times)[min(len(times) - 1, round(0.95 * (len(times) - 1)))], 3),
                        "tokens_per_s": round(middle / p50 * 1000, 1),
                        "step_ms": round(p50 / own_steps, 4),
                    }
                    if kind is not None:
                        row["windows"] = kind
                    if kind == "partial":
                        row["vs_full"] = round(p50 / medians[0], 3)
                    if bandwidth:
                        row["bandwidth_bound_step_ms"] = round(weight_bytes / (bandwidth * 1e9) * 1000, 4)
                    rows.append(row)
                    if progress:
                        progress(row)
    return rows


def format_row(row: dict) -> str:
    bound = f"  bound {row['bandwidth_bound_step_ms']:.3f} ms/step" if "bandwidth_bound_step_ms" in row else ""
    windows = f" ({row['windows']})" if "windows" in row else ""
    ratio = f"  {row['vs_full']:.3f}x full windows' time" if "vs_full" in row else ""
    return (f"{row['sampler'] + windows:<27} {row['shape']:<6} ctx {row['context']:>5} mid {row['middle']:>4}  "
            f"steps {row['steps']:>4}  p50 {row['p50_ms']:>9.2f} ms  p95 {row['p95_ms']:>9.2f} ms  "
            f"{row['tokens_per_s']:>9.1f} tok/s  {row['step_ms']:.3f} ms/step{bound}{ratio}")


def main(*, model_dir: str | None, shape: str | None, device: str | None, dtype: str | None, quick: bool,
         reps: int, tokens_per_step: int, as_json: bool, int8: bool = False, windows: bool = False) -> int:
    """`lacuna bench`: the rows printed as they come (or as one JSON list); with `int8`, then the
    same rows with int8 linear layers; with `windows`, the cached samplers with partial windows
    too, beside the default full windows (see `run`)."""
    device = device or default_device()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype) \
        or default_dtype(device)
    if int8 and device != "cpu":
        print(f"lacuna bench: --int8 is for CPUs, not {device}", file=sys.stderr)
        return 2
    shape = shape or ("model" if model_dir else "tiny")
    if not model_dir and device == "cpu":
        needed = PRESETS[shape].parameters * torch_dtype.itemsize
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if needed > memory / 2:
            print(f"lacuna bench: the {shape} shape needs {needed / 1e9:.0f} GB of weights here and this "
                  f"machine has {memory / 1e9:.0f} GB: use a GPU (--device cuda)", file=sys.stderr)
            return 2
    loaded = (load_checkpoint(resolve(model_dir), device, torch_dtype) if model_dir
              else random_model(shape, device, torch_dtype))
    if quick:
        plan = dict(contexts=(2048,), middles=(64,), reps=3)
    else:
        plan = dict(contexts=(512, 2048), middles=(16, 32, 64, 128), reps=reps)
    progress = None if as_json else (lambda row: print(format_row(row), flush=True))
    name = shape if not model_dir else loaded.name
    rows = []
    for quantized in (False, True) if int8 else (False,):
        if quantized:
            quantize_int8(loaded)
        engine = Engine(loaded, max_tokens=128)
        partial = Engine(loaded, max_tokens=128, full_windows=False) if windows else None
        try:
            rows += run(engine, shape=name + ("+int8" if quantized else ""), tokens_per_step=tokens_per_step,
                        progress=progress, partial=partial, **plan)
        finally:
            engine.close()
            if partial is not None:
                partial.close()
    if as_json:
        print(json.dumps(rows, indent=1))
    return 0
