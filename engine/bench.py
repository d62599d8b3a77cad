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

import random
import statistics
import time

import torch

from .runner import Engine, GraphedForward
from .sampler import DecodeOptions

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

    On CUDA each step replays a CUDA graph over a masked, fixed-size cache, as gpt-fast does,
    so the baseline is held to the same launch overhead as the diffusion engine.
    """

    def __init__(self, model):
        self.model = model
        self.graphs: dict[int, GraphedForward] = {}

    @torch.inference_mode()
    def __call__(self, context: list[int], n: int) -> list[int]:
        model, device = self.model, self.model.lm_head.weight.device
        slots = len(context) + n
        graph = None
        if device.type == "cuda":
            graph = self.graphs.get(slots)
            if graph is None:
                zeros = torch.zeros(1, 1, dtype=torch.long, device=device)
                graph = self.graphs[slots] = GraphedForward(
                    model, model.new_cache(1, slots), zeros, zeros.clone(),
                    torch.zeros(1, 1, 1, slots, dtype=torch.bool, device=device))
            graph.attn_mask.zero_()
            graph.attn_mask[..., :len(context)] = True
        cache = graph.cache if graph else model.new_cache(1, slots)
        last = torch.tensor([len(context) - 1], device=device)
        hidden = model(torch.tensor([context], device=device), torch.arange(len(context), device=device)[None],
                       cache, rows=last, kv_len=len(context), causal=True)
        token = model.logits(hidden[:, -1]).argmax(-1, keepdim=True)
        out = [token]
        for position in range(len(context), slots - 1):
            pos = torch.full((1, 1), position, device=device)
            if graph:
                graph.attn_mask[..., position] = True
                hidden = graph(token, pos)
            else:
                hidden = model(token, pos, cache, kv_len=position + 1)
            token = model.logits(hidden[:, -1]).argmax(-1, keepdim=True)
            out.append(token)
        return torch.cat(out, dim=1)[0].tolist()  # one host sync, at the end


def _timed(fn, reps: int, sync) -> list[float]:
    fn()  # warm-up: kernels, allocator, autotuning
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return times


def _bandwidth_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in HBM_GBPS.items() if key in name), None)


def run(engine: Engine, *, shape: str, contexts=(512, 2048), middles=(16, 32, 64, 128),
        samplers=SAMPLERS, reps: int = 5, tokens_per_step: int = 4, progress=None) -> list[dict]:
    model = engine.model
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
                steps = [middle]
                if sampler == "autoregressive":
                    fn = lambda: autoregressive(suffix + prefix, middle)  # noqa: E731
                else:
                    opts = decode_options(sampler, engine.loaded.random_weights, tokens_per_step)

                    def fn(opts=opts):
                        steps[0] = engine.submit_ids(prefix, suffix, middle, options=opts).result()[0].steps
                times = _timed(fn, reps, sync)
                p50 = statistics.median(times)
                row = {
                    "sampler": sampler, "shape": shape, "device": str(device),
                    "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
                    "context": context, "middle": middle, "steps": steps[0],
                    "p50_ms": round(p50, 3),
                    "p95_ms": round(sorted(times)[min(len(times) - 1, round(0.95 * (len(times) - 1)))], 3),
                    "tokens_per_s": round(middle / p50 * 1000, 1),
                    "step_ms": round(p50 / steps[0], 4),
                }
                if bandwidth:
                    row["bandwidth_bound_step_ms"] = round(weight_bytes / (bandwidth * 1e9) * 1000, 4)
                rows.append(row)
                if progress:
                    progress(row)
    return rows


def format_row(row: dict) -> str:
    bound = f"  bound {row['bandwidth_bound_step_ms']:.3f} ms/step" if "bandwidth_bound_step_ms" in row else ""
    return (f"{row['sampler']:<17} {row['shape']:<6} ctx {row['context']:>5} mid {row['middle']:>4}  "
            f"steps {row['steps']:>4}  p50 {row['p50_ms']:>9.2f} ms  p95 {row['p95_ms']:>9.2f} ms  "
            f"{row['tokens_per_s']:>9.1f} tok/s  {row['step_ms']:.3f} ms/step{bound}")
