"""`lacuna bench --code`: infills at cursors in real code, one token a step against prompt lookup,
and prompt lookup with float weights against decode steps on 4-bit weights as stored.

Cursors sit mid-line in this project's own Python files. At each, an engine per setting (the
same model, loaded once each) fills the rest of the line from a fresh context, then again after
the next character is typed, as an editor asks (a causal model then reuses the context's keys).
The engines take turns cursor by cursor, so all see the same machine load. Each later setting
is compared with the first: the speedup, and how many of its fresh infills are the same.
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
# name: (4-bit weights multiplied as stored on a CPU, options). With --int8 the last two are alike.
SETTINGS = {"one_token_a_step": (False, DecodeOptions(lookup=0)), "prompt_lookup": (False, DecodeOptions()),
            "prompt_lookup_int4": (True, DecodeOptions())}


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
    engines = {name: Engine.load(model_dir, device=device, int8=int8, int4=int4)
               for name, (int4, _) in SETTINGS.items()}
    times = {name: {"fresh": [], "typed": []} for name in SETTINGS}
    steps = {name: 0 for name in SETTINGS}
    base, *others = SETTINGS
    same = {name: 0 for name in others}
    try:
        for i, (text, offset) in enumerate(cursors(count)):
            texts, first = {}, max(0, offset - CONTEXT_CHARS)
            for name in (list(SETTINGS) if i % 2 else list(SETTINGS)[::-1]):
                options = dataclasses.replace(SETTINGS[name][1], min_tokens=1, single_line=True)
                for case, at in (("fresh", offset), ("typed", offset + 1)):
                    prefix, suffix = text[first:at], text[at:at + CONTEXT_CHARS // 3]
                    start = time.perf_counter()
                    completion, = engines[name].complete(prefix, suffix, 32, options=options)
                    times[name][case].append((time.perf_counter() - start) * 1000)
                    steps[name] += completion.steps
                    if case == "fresh":
                        texts[name] = completion.text
            for name in others:
                same[name] += texts[name] == texts[base]
    finally:
        for engine in engines.values():
            engine.close()
    result = {"model": engines[base].name, "cursors": count, "identical_infills": same}
    for name in SETTINGS:
        result[name] = {f"{case}_{stat}_ms": round(fn(values), 1) for case, values in times[name].items()
                        for stat, fn in (("p50", statistics.median), ("mean", statistics.fmean))}
        result[name]["steps"] = steps[name]
    result["speedup"] = {name: {key.removesuffix("_ms"): round(result[base][key] / result[name][key], 2)
                                for key in result[base] if key.endswith("_ms")} for name in others}
    return result
