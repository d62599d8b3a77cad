"""The bundled model's adaptation to masked-diffusion infilling (engine/training/adapt.py) and the
engine's context-causal family it releases (`llama_spm`), on a tiny random model with the bundled
model's tokenizer."""

import json
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.api import DecodeOptions
from engine.engine import Engine
from engine.loader import LoadedModel, load_checkpoint
from engine.sampler import build_layout
from engine.training.adapt import RowSampler, adapt, adapt_loss, attention_mask, heldout_accuracy, start_from
from engine.training.corpus import TrainingError, read_corpus

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus")
    with open(path / "corpus-00000.jsonl", "w") as f:
        for module in ("textwrap", "heapq", "fnmatch", "shlex", "string", "glob", "copy", "queue"):
            f.write(json.dumps({"text": (STDLIB / f"{module}.py").read_text()}) + "\n")
    return path


@pytest.fixture(scope="module")
def release(tiny_causal_release):
    return tiny_causal_release


def loaded_spm(release) -> LoadedModel:
    return start_from(release, "context_causal")


def test_rows_are_the_engine_layout_and_a_function_of_the_step(corpus, release):
    loaded = loaded_spm(release)
    texts, _ = read_corpus(corpus)
    sampler = RowSampler(texts, loaded.tokenizer, loaded, "context_causal", 256)
    rows = sampler.batch(3, 8)
    again = sampler.batch(3, 8)
    assert torch.equal(rows.tokens, again.tokens) and torch.equal(rows.masked, again.masked)
    separator = loaded.tokenizer.token_to_id("<file_sep>")
    for b in range(8):
        start, end, length = int(rows.start[b]), int(rows.end[b]), int(rows.length[b])
        assert end == length  # the middle is last
        assert int((rows.tokens[b, :start] == separator).sum()) == 1  # suffix SEP prefix
        assert rows.masked[b, start:end].any() and not rows.masked[b, :start].any()
        assert not rows.context[b, start:].any() and not rows.context[b, 0]
        # With its middle masked, the row is the engine's own layout of the same context.
        sep = int((rows.tokens[b, :start] == separator).nonzero()[0, 0])
        layout = build_layout(rows.tokens[b, sep + 1:start].tolist(), rows.tokens[b, :sep].tolist(), end - start,
                              mask=16, bos=None, eos=0, eos_after_suffix=False, shifted=True, max_len=256,
                              separator=separator)
        assert layout.tokens[:start] == rows.tokens[b, :start].tolist() and (layout.start, layout.end) == (start, end)
    assert {"hole", "span", "end"} & set(rows.kinds)


def test_the_context_attends_causally_and_the_middle_both_ways(corpus, release):
    loaded = loaded_spm(release)
    rows = RowSampler(read_corpus(corpus)[0], loaded.tokenizer, loaded, "context_causal", 128).batch(0, 2)
    model = loaded.model.eval()
    positions = torch.arange(128).expand(2, -1)

    def hidden(tokens):
        with torch.no_grad():
            return model(tokens, positions, None, **attention_mask(rows, "context_causal"))

    changed = rows.tokens.clone()
    start, end = int(rows.start[0]), int(rows.end[0])
    changed[0, end - 1] = 42  # the middle's last token
    before, after = hidden(rows.tokens), hidden(changed)
    assert torch.equal(before[0, :start], after[0, :start])  # the context never sees the middle
    assert not torch.allclose(before[0, start], after[0, start])  # the middle's first token does
    assert torch.equal(before[1], after[1])


def test_the_loss_is_the_masked_middle_plus_the_context_autoregressive_loss(corpus, release):
    loaded = loaded_spm(release)
    rows = RowSampler(read_corpus(corpus)[0], loaded.tokenizer, loaded, "context_causal", 128).batch(1, 4)
    with torch.no_grad():
        only_middle, parts = adapt_loss(loaded.model, rows, 16, "context_causal", 0.0)
        both, parts_both = adapt_loss(loaded.model, rows, 16, "context_causal", 0.5)
    assert "ar_ce" not in parts and float(only_middle) == pytest.approx(parts["masked_ce"])
    assert float(both) == pytest.approx(parts_both["masked_ce"] + 0.5 * parts_both["ar_ce"], rel=1e-5)
    # A random model over 17,696 tokens: about log(17,696) = 9.8 nats.
    assert 8 < parts_both["masked_ce"] < 12


def test_a_resumed_run_continues_exactly(corpus, release, tmp_path):
    common = dict(init=release, batch_size=2, seq_len=128, heldout_rows=8, warmup_steps=2, lr=1e-3)
    reference = adapt(corpus, tmp_path / "reference", steps=4, **common)
    adapt(corpus, tmp_path / "run", steps=2, **common)
    resumed = adapt(corpus, tmp_path / "run", steps=4, **common)
    assert resumed["step"] == reference["step"] == 4 and resumed["tokens_seen"] == reference["tokens_seen"]
    losses = [(tmp_path / name / "loss.csv").read_text().splitlines() for name in ("reference", "run")]
    assert [line.split(",")[:3] for line in losses[0]] == [line.split(",")[:3] for line in losses[1]]
    final = load_file(tmp_path / "run" / "train-state" / "step-00000004.safetensors")
    again = load_file(tmp_path / "reference" / "train-state" / "step-00000004.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final if k.startswith(("model/", "optim/")))
    assert set(reference["heldout"]) == {"0.15", "0.5", "1", "next"}


def test_a_corrupt_state_is_named_and_training_restarts_from_the_last_release(corpus, release, tmp_path, caplog):
    common = dict(init=release, batch_size=2, seq_len=128, heldout_rows=8, warmup_steps=2)
    adapt(corpus, tmp_path, steps=2, **common)
    tensors = tmp_path / "train-state" / "step-00000002.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:1000])
    stats = adapt(corpus, tmp_path, steps=3, **common)
    assert "step-00000002.safetensors" in caplog.text and stats["step"] == 3
    (tmp_path / "train-state" / "state.json").write_text("{not json")
    (tmp_path / "model" / "training.json").unlink()
    with pytest.raises(TrainingError, match="state.json"):  # and no release to restart from
        adapt(corpus, tmp_path, steps=4, **common)


def test_the_release_serves_as_a_context_causal_diffusion_model(corpus, release, tmp_path):
    adapt(corpus, tmp_path, steps=1, init=release, batch_size=2, seq_len=128, heldout_rows=8)
    directory = tmp_path / "model"
    assert json.loads((directory / "config.json").read_text())["model_type"] == "llama_spm"
    assert all(p.stat().st_size <= 16 * 2**20 for p in directory.iterdir())
    weights = {name for p in directory.glob("*.safetensors") for name in load_file(p)}
    assert "model.layers.0.mlp.up_proj.weight.q4" in weights  # 4-bit, as the bundled release
    engine = Engine.load(directory, warmup=False)
    exact = Engine(load_checkpoint(directory), warmup=False, full_windows=True)
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    greedy = DecodeOptions(policy="steps", steps=4)
    # Full windows reuse the context's keys exactly: the same tokens as a full forward each step.
    cached = exact.complete(prefix, suffix, 8, options=greedy)[0]
    uncached = exact.complete(prefix, suffix, 8, options=DecodeOptions(policy="steps", steps=4, use_cache=False))[0]
    assert cached.text == uncached.text and cached.steps == 4
    assert engine.complete(prefix, suffix, 8, options=greedy)[0].steps == 4
    # Typing on at the cursor reuses the context's keys and gives what a fresh engine gives.
    exact.complete(prefix + "a", suffix, 8, options=greedy)
    fresh = Engine(load_checkpoint(directory), warmup=False, full_windows=True)
    typed = prefix + "a +"
    assert exact.complete(typed, suffix, 8, options=greedy)[0].text == fresh.complete(typed, suffix, 8,
                                                                                     options=greedy)[0].text
    exact.close(), fresh.close(), engine.close()


def test_held_out_accuracy_reads_the_suffix_where_the_model_can(corpus, release):
    loaded = loaded_spm(release)
    report = heldout_accuracy(loaded.model, read_corpus(corpus)[0], loaded.tokenizer, loaded, "context_causal", 128,
                              rows=8)
    assert all(0 <= entry["accuracy"] <= 1 and entry["tokens"] > 0 for entry in report.values())
    assert report["next"]["tokens"] == 8


def test_sigterm_saves_the_state_and_a_resumed_run_goes_on(corpus, release, tmp_path):
    """A run in the background ignores Ctrl-C; `kill PID` (SIGTERM) stops it as Ctrl-C would."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "lsp.cli", "train", "adapt", str(corpus), str(out), "--init", str(release),
               "--steps", "1000", "--batch-size", "2", "--seq-len", "128", "--threads", "1"]
    job = subprocess.Popen(command, cwd=Path(__file__).parent.parent, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_steps(out)) < 2:
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 130 and "interrupted; run it again to resume" in stderr
    saved = json.loads((out / "train-state" / "state.json").read_text())["step"]
    assert saved == len(read_steps(out)) >= 2  # every step run is in the saved state
    stats = adapt(corpus, out, steps=saved + 1, init=release, batch_size=2, seq_len=128, heldout_rows=8)
    assert stats["step"] == saved + 1


def read_steps(out: Path) -> list[str]:
    path = out / "loss.csv"
    return path.read_text().splitlines()[1:] if path.exists() else []
