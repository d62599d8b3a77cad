"""`lacuna pull`, `lacuna models` and `--model NAME`, end to end against a hub stand-in
(tests/hub.py) serving tiny checkpoints in each family's published layout."""

import dataclasses
import os
import subprocess
import sys

import pytest
from hub import COMMIT, Hub
from published import SUPPORTED

from engine.config import PRESETS
from engine.loader import random_model, save_checkpoint

# Catalogue name -> the hub repository it names (engine/catalog.py) and the layout served there.
SERVED = {"llada-8b-instruct": "GSAI-ML/LLaDA-8B-Instruct", "dream-coder-7b-instruct":
          "Dream-org/Dream-Coder-v0-Instruct-7B", "open-dcoder-0.5b": "fredzzp/open-dcoder-0.5B"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    repos = {}
    for name, repo in SERVED.items():
        directory = SUPPORTED[name][0](tmp_path_factory.mktemp(name))
        # What the hub repositories also hold, and `lacuna pull` never fetches: code and pickles.
        (directory / "modeling_dream.py").write_text("raise SystemExit('checkpoint code ran')\n")
        (directory / "pytorch_model.bin").write_bytes(b"not a pickle")
        repos[repo] = directory
    pickles = tmp_path_factory.mktemp("pickles")
    for file in ("config.json", "tokenizer.json"):
        (pickles / file).write_bytes((repos[SERVED["open-dcoder-0.5b"]] / file).read_bytes())
    (pickles / "pytorch_model.bin").write_bytes(b"pickle")
    repos["someone/pickled-coder"] = pickles
    # Weights over the hub client's 10 MiB download chunk, so a cut-off download has a part to keep.
    big = tmp_path_factory.mktemp("big")
    save_checkpoint(random_model(dataclasses.replace(PRESETS["tiny"], intermediate_size=5632)), big)
    repos["someone/big-coder"] = big
    served = Hub(repos)
    yield served
    served.close()


def lacuna(hub, home, *args, offline=False):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "lsp.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow  # a dozen processes
def test_pull_fetches_weights_and_json_only_and_the_name_then_works_offline(hub, tmp_path):
    home = tmp_path / "hf"
    for name, repo in SERVED.items():
        pulled = lacuna(hub, home, "pull", name)
        assert pulled.returncode == 0, pulled.stderr
        snapshot = home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT
        assert sorted(p.name for p in snapshot.iterdir()) == [
            "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
        assert str(snapshot) in pulled.stdout
    source = tmp_path / "f.py"
    source.write_text("def add(a, b):\n    return \n")
    for name in SERVED:
        done = lacuna(hub, home, "complete", str(source), "--line", "1", "--character", "11", "--tokens", "4",
                      "--model", name, offline=True)
        assert done.returncode == 0, done.stderr
    listed = lacuna(hub, home, "models", offline=True)
    assert listed.returncode == 0
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert all("downloaded" in rows[name] for name in SERVED)
    assert "lacuna pull llada-8b " in rows["llada-8b"] + " "


@pytest.mark.slow
def test_a_download_cut_off_midway_resumes(hub, tmp_path):
    hub.drop["model.safetensors"] = 11 << 20
    home = tmp_path / "hf"
    pulled = lacuna(hub, home, "pull", "someone/big-coder")
    assert pulled.returncode == 0, pulled.stderr
    assert "model.safetensors" not in hub.drop  # the cut happened
    # The retry asked for the rest only: the first 10 MiB chunk was kept.
    assert any(line.endswith(f"model.safetensors bytes={10 << 20}-") for line in hub.requests)
    done = lacuna(hub, home, "complete", os.devnull, "--line", "0", "--character", "0", "--tokens", "2",
                  "--model", "someone/big-coder", offline=True)
    assert done.returncode == 0, done.stderr


def test_pickled_weights_only_are_refused_before_any_download(hub, tmp_path):
    home = tmp_path / "hf"
    pulled = lacuna(hub, home, "pull", "someone/pickled-coder")
    assert pulled.returncode == 2
    assert "no safetensors weights" in pulled.stderr and "pytorch_model.bin" in pulled.stderr
    assert "Traceback" not in pulled.stderr
    assert not (home / "hub" / "models--someone--pickled-coder" / "snapshots").exists()


def test_a_model_not_downloaded_gets_the_command_that_fetches_it(hub, tmp_path):
    done = lacuna(hub, tmp_path / "hf", "complete", os.devnull, "--line", "0", "--character", "0",
                  "--model", "llada-8b")
    assert done.returncode == 2
    assert "run `lacuna pull llada-8b`" in done.stderr and "Traceback" not in done.stderr
    unknown = lacuna(hub, tmp_path / "hf", "pull", "no-such-coder")
    assert unknown.returncode == 2 and "known model" in unknown.stderr
    missing = lacuna(hub, tmp_path / "hf", "pull", "someone/missing")
    assert missing.returncode == 2 and "someone/missing" in missing.stderr and "Traceback" not in missing.stderr
    revision = lacuna(hub, tmp_path / "hf", "pull", "open-dcoder-0.5b@no-such-branch")
    assert revision.returncode == 2 and "no-such-branch" in revision.stderr and "Traceback" not in revision.stderr
