"""The bundled model's GPU training job (`lacuna train gpu-job`): its adaptation to masked-diffusion
infilling (adapt.py), everything on one GPU machine with no network, in one command that ends
inside a fixed wall-clock budget.

It starts from a release directory (`init`: the bundled weights, staged on the machine by an
earlier call, as they alone fill the 64 MiB a call carries), trains on corpus shards that travelled
with the repository (`pack_shards`) plus, if asked, the machine's own installed distributions not
among them; evaluates the release on HumanEval-Infilling single-line tasks; and writes into
`out_dir` only what must come back: the release's weights, index, config and tokenizer and
`report.json`. The release there is rewritten at every save, so a run killed by its time limit
still leaves its last one.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .adapt import adapt
from .corpus import _canonical, build_corpus

log = logging.getLogger(__name__)

# 8 files at most come back from the GPU machine: with report.json, these (4 shards for the bundled
# model); generation_config.json and tokenizer_config.json follow from config.json.
RELEASE_FILES = ("config.json", "tokenizer.json", "model.safetensors.index.json", "model.safetensors",
                 "model-*.safetensors")


def _copy_release(model_dir: Path, out_dir: Path) -> None:
    """Copy first, then rename into place: a kill leaves the previous release or this one (but for
    the instant of the renames), never a half-written file."""
    staging = out_dir / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    names = {path.name for pattern in RELEASE_FILES for path in model_dir.glob(pattern)}
    for name in names:
        shutil.copyfile(model_dir / name, staging / name)
    for name in names:
        (staging / name).replace(out_dir / name)
    for stale in out_dir.glob("model*.safetensors*"):
        if stale.name not in names:
            stale.unlink()
    staging.rmdir()


def _installed_not_in(corpus_dirs: Sequence[Path]) -> list[str]:
    """Installed distributions whose sources the carried shards do not already hold."""
    import importlib.metadata

    carried = set()
    for directory in corpus_dirs:
        with_sources = Path(directory) / "sources.json"
        if with_sources.exists():
            carried |= {_canonical(s["name"]) for s in json.loads(with_sources.read_text())}
    names = {_canonical(d.metadata.get("Name") or "") for d in importlib.metadata.distributions()}
    return sorted(n for n in names if n and n not in carried)


def run(out_dir: str | Path, corpus_dirs: Sequence[str | Path], *, init: str | Path | None = None,
        minutes: float = 6.0, eval_tasks: int = 300, site_packages: bool = False, device: str | None = None,
        batch_size: int = 32, seq_len: int = 1024, lr: float = 2e-4, save_every_minutes: float = 1.0,
        work_dir: str | Path | None = None) -> dict:
    """The whole job; returns the report it writes to `out_dir/report.json`. The training state and
    the full loss log stay in `work_dir` (a temporary directory by default)."""
    started = time.time()
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="lacuna-gpu-job-"))
    corpora = [Path(c) for c in corpus_dirs]
    if site_packages:
        names = _installed_not_in(corpora)
        log.info("adding %d installed distributions not in the carried shards", len(names))
        if names:
            build_corpus(work / "site-packages", site_packages=True, include_stdlib=False, packages=names)
            corpora.append(work / "site-packages")
    stats = adapt(corpora, work / "run", init=init, minutes=minutes, batch_size=batch_size, seq_len=seq_len, lr=lr,
                  device=device, save_every_minutes=save_every_minutes, state_dir=work / "train-state",
                  on_release=lambda model_dir: _copy_release(model_dir, out_dir))
    report = {"train": stats, "seconds_to_release": round(time.time() - started, 1)}
    if eval_tasks:
        from lsp.eval import humaneval

        report["humaneval_single_line"] = humaneval.evaluate("single-line", limit=eval_tasks,
                                                             model_dir=str(work / "run" / "model"), device=device)
    report["loss_curve"] = _loss_curve(work / "run" / "loss.csv")
    report["wall_seconds"] = round(time.time() - started, 1)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def _loss_curve(path: Path, points: int = 20) -> list[dict]:
    """Mean loss and masked cross-entropy over `points` equal stretches of steps (the full
    loss.csv stays on the machine: the output folder holds at most 8 files)."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    size = max(1, len(rows) // points)
    curve = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        curve.append({"steps": f"{chunk[0]['step']}-{chunk[-1]['step']}", "tokens": int(chunk[-1]["tokens"]),
                      **{key: round(sum(float(r.get(key) or 0) for r in chunk) / len(chunk), 4)
                         for key in ("loss", "masked_ce", "ar_ce")}})
    return curve
