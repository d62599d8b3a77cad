"""`lacuna bench --code`: infills at cursors in real code, one token a step against prompt lookup.

Cursors sit mid-line in this project's own Python files. At each, an engine per setting (the
same model, loaded twice) fills the rest of the line from a fresh context, then again after the
next character is typed, as an editor asks (a causal model then reuses the context's keys). The
engines take turns cursor by cursor, so both see the same machine load.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from pathlib import Path

from ..api import DecodeOptions
from ..engine import Engine

SOURCES = Path(__file__).resolve().parents[2]
CONTEXT_CHARS = 1500  # of prefix before the cursor; the suffix gets a third of it
SETTINGS = {"one_token_a_step": DecodeOptions(lookup=0), "prompt_lookup": DecodeOptions()}


def cursors(count: int, seed: int = 0) -> list[tuple[str, int]]:
    """(file text, offset): mid-line positions on code lines of the engine's and the server's modules."""
    texts = [path.read_text(encoding="utf-8") for folder in ("engine", "lsp")
             for path in sorted((SOURCES / folder).glob("*.py"))]
    rng, spots = random.Random(seed), []
    while len(spots) < count:
        text = rng.choice(texts)
        start = rng.choice([i + 1 for i, c in enumerate(text) if c == "\n"])
        line = text[start:text.find("\n", start)]
        if len(line.strip()) > 8:
            spots.append((text, start + len(line) - len(line.lstrip()) + len(line.strip()) // 2))
    return spots


def run(model_dir: str | None, device: str | None, count: int = 30, int8: bool = False) -> dict:
    engines = {name: Engine.load(model_dir, device=device, int8=int8) for name in SETTINGS}
    times = {name: {"fresh": [], "typed": []} for name in SETTINGS}
    steps = {name: 0 for name in SETTINGS}
    same = 0
    try:
        for i, (text, offset) in enumerate(cursors(count)):
            texts, first = set(), max(0, offset - CONTEXT_CHARS)
            for name in (list(SETTINGS) if i % 2 else list(SETTINGS)[::-1]):
                options = dataclasses.replace(SETTINGS[name], min_tokens=1, single_line=True)
                for case, at in (("fresh", offset), ("typed", offset + 1)):
                    prefix, suffix = text[first:at], text[at:at + CONTEXT_CHARS // 3]
                    start = time.perf_counter()
                    completion, = engines[name].complete(prefix, suffix, 32, options=options)
                    times[name][case].append((time.perf_counter() - start) * 1000)
                    steps[name] += completion.steps
                    if case == "fresh":
                        texts.add(completion.text)
            same += len(texts) == 1
    finally:
        for engine in engines.values():
            engine.close()
    result = {"model": engines["prompt_lookup"].name, "cursors": count, "identical_infills": same}
    for name in SETTINGS:
        result[name] = {f"{case}_{stat}_ms": round(fn(values), 1) for case, values in times[name].items()
                        for stat, fn in (("p50", statistics.median), ("mean", statistics.fmean))}
        result[name]["steps"] = steps[name]
    base, lookup = result["one_token_a_step"], result["prompt_lookup"]
    result["speedup"] = {key.removesuffix("_ms"): round(base[key] / lookup[key], 2)
                         for key in base if key.endswith("_ms")}
    return result
