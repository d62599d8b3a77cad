"""The command line: `lacuna complete`, `bench`, `eval`, `demo` and `train`'s errors. The demo runs as the
installed command; the others call its `main` in this process (a new process costs seconds of
imports)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lsp.cli import main

DEMO = Path(__file__).parent / "data" / "demo.py"


def lacuna(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "lsp.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parents[1])


class Run:
    """What one `lacuna` command left: its exit code and output."""

    def __init__(self, capsys, *args):
        try:
            self.returncode = main([str(a) for a in args])
        except SystemExit as exit:  # argparse's errors
            self.returncode = exit.code
        self.stdout, self.stderr = capsys.readouterr()


def test_complete_prints_json(capsys, checkpoints):
    line = DEMO.read_text().split("\n").index("    return ")
    run = Run(capsys, "complete", DEMO, "--line", line, "--character", 11, "--json", "--tokens", 8,
              "--model", checkpoints["lacuna"])
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert {"text", "steps", "latency_ms"} <= set(out)
    assert out["steps"] >= 1 and out["latency_ms"] > 0


def test_complete_without_a_model_uses_the_bundled_one(capsys):
    run = Run(capsys, "complete", DEMO, "--line", 7, "--character", 11, "--tokens", 8, "--json")
    assert run.returncode == 0, run.stderr
    assert "random-weight" not in run.stderr
    assert json.loads(run.stdout)["model"] == "bundled"


@pytest.mark.parametrize("args, message", [
    (["--line", 999, "--character", 0], "outside the file"),
    (["--line", 0, "--character", 0, "--tokens", 0], "n_tokens"),
    (["--line", 0, "--character", 0, "--model", "/nonexistent"], "does not exist"),
])
def test_complete_bad_input(capsys, args, message):
    run = Run(capsys, "complete", DEMO, *args)
    assert run.returncode == 2
    assert message in run.stderr


def test_eval_runs_with_the_time_budget_asked_for(capsys, constant_checkpoint):
    run = Run(capsys, "eval", "humaneval-infill", "--limit", 1, "--json", "--time-budget-ms", 400,
              "--model", constant_checkpoint)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["time_budget_ms"] == 400 and result["tasks"] == 1


@pytest.mark.parametrize("budget", [0, 49, 60001])
def test_eval_refuses_a_time_budget_out_of_bounds(capsys, budget):
    run = Run(capsys, "eval", "humaneval-infill", "--time-budget-ms", budget)
    assert run.returncode == 2 and "--time-budget-ms must be between 50 and 60000" in run.stderr


@pytest.mark.slow  # the reference sampler at a 2048-token context: minutes on 2 CPU cores
def test_bench_quick_rows():
    run = lacuna("bench", "--quick", "--json")
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert {r["sampler"] for r in rows} >= {"reference", "cached+threshold", "autoregressive"}
    for row in rows:
        assert (row["context"], row["middle"]) == (2048, 64)
        assert {"shape", "p50_ms", "p95_ms", "tokens_per_s"} <= set(row)
        assert row["p95_ms"] >= row["p50_ms"] > 0


def test_bench_code_compares_prompt_lookup_and_4_bit_steps_with_one_token_a_step(capsys):
    run = Run(capsys, "bench", "--code", "--requests", 2, "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["model"] == "bundled" and out["identical_infills"]["prompt_lookup"] == 2  # lookup is exact
    assert 0 <= out["identical_infills"]["prompt_lookup_int4"] <= 2
    assert 0 < out["prompt_lookup"]["steps"] <= out["one_token_a_step"]["steps"]
    assert set(out["speedup"]) == {"prompt_lookup", "prompt_lookup_int4"}
    assert set(out["speedup"]["prompt_lookup_int4"]) == {"fresh_p50", "fresh_mean", "typed_p50", "typed_mean"}


def test_bench_refuses_a_shape_too_big_for_this_machine(capsys):
    run = Run(capsys, "bench", "--shape", "7b", "--device", "cpu")
    assert run.returncode == 2
    assert "use a GPU" in run.stderr


def test_demo_asks_a_real_server(constant_checkpoint):
    run = lacuna("demo", DEMO, "--line", 7, "--character", 11, "--json", "--model", constant_checkpoint)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)[0].strip("x") == ""
    assert "lacuna demo: model" in run.stderr


def test_train_reports_a_bad_corpus_clearly(capsys, tmp_path):
    run = Run(capsys, "train", "model", tmp_path / "no-corpus", tmp_path / "tokenizer.json", tmp_path / "out",
              "--steps", 1)
    assert run.returncode == 2
    assert "lacuna train model:" in run.stderr and "Traceback" not in run.stderr
