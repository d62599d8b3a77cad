"""HumanEval-Infilling: task construction, the sandbox that runs filled programs, and one end-to-end run."""

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import pytest

from lsp.eval import humaneval, sandbox
from lsp.eval.humaneval import build_tasks, evaluate, format_report
from lsp.eval.sandbox import run_program, run_programs

PROBLEMS = {p["task_id"]: p for p in humaneval.load_problems()}
ISOLATED = sandbox.isolation()[0]
needs_isolation = pytest.mark.skipif(not ISOLATED, reason=sandbox.isolation()[1])


def problem_of(task):
    return PROBLEMS["/".join(task.task_id.split("/")[1:3])]


def with_tests(task, text):
    return f"{task.program(text)}\n\n{task.test}\n\ncheck({task.entry_point})\n"


def live_sandbox_processes():
    """Processes still running a sandboxed program (zombies waiting for init to reap them don't count)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
            if b"program.py" in (proc / "cmdline").read_bytes() and state != "Z":
                found.append(proc.name)
        except OSError:
            continue
    return found


# -- tasks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, count", [("single-line", 1033), ("multi-line", 5815), ("random-span", 1640)])
def test_task_counts_match_the_paper(mode, count):
    tasks = build_tasks(mode)
    assert len(tasks) == count
    assert len({t.task_id for t in tasks}) == count


@pytest.mark.parametrize("mode", humaneval.MODES)
def test_every_task_cuts_a_nonempty_middle_out_of_prompt_and_solution(mode):
    for task in build_tasks(mode):
        problem = problem_of(task)
        assert task.prefix + task.middle + task.suffix == problem["prompt"] + problem["canonical_solution"]
        assert task.prefix.startswith(problem["prompt"]) and task.middle
        assert (task.test, task.entry_point) == (problem["test"], problem["entry_point"])
        # The answer put in the editor's hole restores the file exactly.
        assert task.program(task.answer) == task.prefix + task.middle + task.suffix
        if mode != "random-span":  # whole lines, starting and ending on code
            lines = task.middle.splitlines()
            assert task.middle.endswith("\n") and lines[0].strip() and lines[-1].strip()
            assert task.prefix.endswith("\n")
        if mode == "single-line":
            assert len(lines) == 1


def test_multi_line_spans_are_all_code_line_ranges():
    ids = {t.task_id for t in build_tasks("multi-line")}
    # HumanEval/0's solution: lines 0-7, line 6 blank.
    code = (0, 1, 2, 3, 4, 5, 7)
    assert {i for i in ids if i.startswith("MultiLineInfilling/HumanEval/0/")} == {
        f"MultiLineInfilling/HumanEval/0/L{a}_L{b}" for a in code for b in code if b >= a}
    assert sum(1 for i in ids if i.split("/")[-1].split("_")[0] != i.split("/")[-1].split("_")[1]) == 4782


@pytest.mark.parametrize("mode, fingerprint", [
    ("single-line", "ee30535ea5db5acb"), ("multi-line", "a74179ab1060e963"), ("random-span", "d1e5df6b472e48be")])
def test_tasks_are_deterministic_and_interleaved(mode, fingerprint):
    first, second = build_tasks(mode), build_tasks(mode)
    assert first == second
    # The same spans, in the same order, on every machine and run (seeded shuffles and random spans).
    spans = repr([(t.task_id, len(t.prefix), len(t.middle)) for t in first]).encode()
    assert hashlib.sha256(spans).hexdigest()[:16] == fingerprint
    # The first 164 are one task of each problem, in problem order.
    assert [problem_of(t)["task_id"] for t in first[:164]] == list(PROBLEMS)


# -- the sandbox -----------------------------------------------------------------------------------

@pytest.mark.slow  # 164 sandboxed programs
def test_every_canonical_solution_passes_with_the_true_middle():
    tasks = build_tasks("single-line")[:164]  # one per problem
    results = run_programs([with_tests(t, t.answer) for t in tasks])
    assert [(t.task_id, reason) for t, (passed, reason) in zip(tasks, results) if not passed] == []


def test_wrong_code_fails():
    task = next(t for t in build_tasks("single-line") if t.task_id == "SingleLineInfilling/HumanEval/0/L7")
    assert task.answer == "    return False"
    passed, reason = run_program(with_tests(task, "    return True"))
    assert not passed and "AssertionError" in reason
    passed, reason = run_program(with_tests(task, "    return False)"))
    assert not passed and "SyntaxError" in reason


def test_an_infinite_loop_times_out():
    start = time.monotonic()
    passed, reason = run_program("while True:\n    pass\n", timeout=1)
    assert not passed and reason.startswith("timed out after 1 s")
    assert time.monotonic() - start < 4


@pytest.mark.skipif(not ISOLATED and os.geteuid() == 0, reason="root ignores RLIMIT_NPROC: only isolated runs bound it")
def test_a_fork_bomb_is_contained_and_cleaned_up():
    bomb = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)\n"
    start = time.monotonic()
    passed, reason = run_program(bomb, timeout=2)
    assert not passed and reason.startswith("timed out")
    assert time.monotonic() - start < 6
    assert live_sandbox_processes() == []


@needs_isolation
def test_a_process_that_leaves_the_session_is_killed():
    # The program passes, but the child it detached (setsid) must not outlive the run.
    daemon = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\n"
    assert run_program(daemon, timeout=2) == (True, "passed")
    assert live_sandbox_processes() == []


def test_a_huge_allocation_fails():
    passed, reason = run_program("data = bytearray(8 << 30)\n")
    assert not passed and "MemoryError" in reason


def test_output_is_captured_and_truncated():
    passed, reason = run_program("while True:\n    print('spam' * 1000)\n", timeout=2)
    assert not passed and "spam" in reason and len(reason) < 2 * sandbox.OUTPUT_CHARS


def test_the_program_may_write_in_its_directory():
    program = "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n"
    assert run_program(program)[0]


@needs_isolation
def test_writes_outside_the_directory_are_contained():
    name = f"lacuna-escape-{uuid.uuid4().hex}"
    targets = [f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", f"../../{name}"]
    try:
        for target in targets:
            passed, reason = run_program(f"open({target!r}, 'w').write('escaped')\n")
            assert not passed and "Read-only file system" in reason, target
        assert not any(os.path.exists(p) for p in (f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}"))
    finally:
        for path in (f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}"):
            if os.path.exists(path):
                os.remove(path)


@needs_isolation
def test_no_network_and_no_privileges():
    program = ("import os, socket\n"
               "assert [name for _, name in socket.if_nameindex()] == ['lo']\n"  # a fresh network namespace
               "assert os.getuid() != 0 and os.getgroups() == []\n"
               "assert 'NoNewPrivs:\\t1' in open('/proc/self/status').read()\n")
    assert run_program(program) == (True, "passed")


# -- end to end ------------------------------------------------------------------------------------

def test_evaluate_end_to_end(constant_checkpoint):
    result = evaluate("single-line", limit=3, model_dir=str(constant_checkpoint))
    json.dumps(result)  # JSON-ready
    assert result["mode"] == "single-line" and result["tasks"] == 3
    assert {"pass@1", "exact_match", "empty", "latency_ms", "length", "model", "device", "sandbox",
            "samples"} <= result.keys()
    assert set(result["latency_ms"]) == {"mean", "p50"} and result["latency_ms"]["mean"] > 0
    assert {"lines_predicted_mean", "lines_true_mean", "lines_equal", "chars_predicted_mean",
            "chars_true_mean", "lines_predicted", "lines_true"} <= result["length"].keys()
    # The constant model's "xxx…" is never right.
    assert result["pass@1"] == 0.0 and result["exact_match"] == 0.0
    assert [s["task_id"] for s in result["samples"]] == [t.task_id for t in build_tasks("single-line")[:3]]
    assert all(set(s["completion"]) <= {"x"} for s in result["samples"])
    assert "pass@1" in format_report(result)
