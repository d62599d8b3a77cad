"""Known open coders by short name (diffusion coders, and autoregressive fill-in-the-middle ones
to compare them with), fetched from the Hugging Face hub.

`lacuna pull NAME` downloads a model's safetensors and JSON files into the hub cache, never
pickled weights and never code; `--model NAME` then resolves to that cached directory. Every
setting a hub client honours applies: HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and
HF_TOKEN. Nothing here imports torch.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

from .config import FAMILIES, CheckpointError

# What a checkpoint directory needs (loader.py): weights, configs and the tokenizer. Pickled
# weights (.bin, .pt) and Python files (modeling_*.py) are never fetched.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "LICENSE*", "README.md"]
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    repo: str
    family: str  # as the loader names it (engine.config.FAMILIES)
    parameters: str
    licence: str
    max_tokens: int  # the masked length its authors evaluate infilling with (a FIM coder: the server's block)
    note: str = ""
    # A branch until the hub can be reached to read each repository's commit: `lacuna pull`
    # prints the commit it fetched, and `--model NAME@COMMIT` pins one.
    revision: str = "main"


RESEARCH = "research licence, not for commercial use"
CODA_NOTE = "non-commercial licence; no published infill evaluation"
# Qwen2.5-Coder's base models, Apache-2.0 (its 3B has a research licence and is left out).
FIM_NOTE = "autoregressive fill-in-the-middle: reads the suffix through its prompt"
CATALOG = {entry.name: entry for entry in [
    CatalogEntry("open-dcoder-0.5b", "fredzzp/open-dcoder-0.5B", "qwen2", "0.5B", "Apache-2.0", 32,
                 "the one that runs on a laptop CPU"),
    CatalogEntry("dream-coder-7b", "Dream-org/Dream-Coder-v0-Base-7B", "dream", "7B", "Apache-2.0", 64),
    CatalogEntry("dream-coder-7b-instruct", "Dream-org/Dream-Coder-v0-Instruct-7B", "dream", "7B", "Apache-2.0", 64),
    CatalogEntry("diffucoder-7b", "apple/DiffuCoder-7B-Base", "dream", "7B", "apple-amlr", 64, RESEARCH),
    CatalogEntry("diffucoder-7b-instruct", "apple/DiffuCoder-7B-Instruct", "dream", "7B", "apple-amlr", 64, RESEARCH),
    CatalogEntry("diffucoder-7b-cpgrpo", "apple/DiffuCoder-7B-cpGRPO", "dream", "7B", "apple-amlr", 64, RESEARCH),
    CatalogEntry("dream-7b", "Dream-org/Dream-v0-Base-7B", "dream", "7B", "Apache-2.0", 64),
    CatalogEntry("dream-7b-instruct", "Dream-org/Dream-v0-Instruct-7B", "dream", "7B", "Apache-2.0", 64),
    CatalogEntry("dreamon-7b", "Dream-org/DreamOn-v0-7B", "dream", "7B", "Apache-2.0", 64,
                 "expand/delete tokens (see the loader's message)"),
    CatalogEntry("coda-1.7b", "Salesforce/CoDA-v0-Base", "coda", "1.7B", "CC-BY-NC-4.0", 64, CODA_NOTE),
    CatalogEntry("coda-1.7b-instruct", "Salesforce/CoDA-v0-Instruct", "coda", "1.7B", "CC-BY-NC-4.0", 64, CODA_NOTE),
    CatalogEntry("llada-8b", "GSAI-ML/LLaDA-8B-Base", "llada", "8B", "MIT", 64),
    CatalogEntry("llada-8b-instruct", "GSAI-ML/LLaDA-8B-Instruct", "llada", "8B", "MIT", 64),
    CatalogEntry("llada-1.5", "GSAI-ML/LLaDA-1.5", "llada", "8B", "MIT", 64),
    CatalogEntry("qwen2.5-coder-0.5b", "Qwen/Qwen2.5-Coder-0.5B", "qwen2_fim", "0.5B", "Apache-2.0", 64, FIM_NOTE),
    CatalogEntry("qwen2.5-coder-1.5b", "Qwen/Qwen2.5-Coder-1.5B", "qwen2_fim", "1.5B", "Apache-2.0", 64, FIM_NOTE),
    CatalogEntry("qwen2.5-coder-7b", "Qwen/Qwen2.5-Coder-7B", "qwen2_fim", "7B", "Apache-2.0", 64, FIM_NOTE),
]}


def _split(name: str) -> tuple[str, str | None]:
    """NAME or NAME@REVISION."""
    name, _, revision = name.partition("@")
    return name, revision or None


def lookup(name: str) -> tuple[str, str]:
    """The hub repository and revision for a catalogue name or a repository id (`owner/name`),
    each optionally followed by `@revision`."""
    base, revision = _split(name)
    entry = CATALOG.get(base.lower())
    if entry is not None:
        return entry.repo, revision or entry.revision
    if REPO_ID.fullmatch(base):
        return base, revision or "main"
    known = ", ".join(CATALOG)
    raise CheckpointError(f"{name!r} is neither a checkpoint directory nor a known model ({known}) "
                          "nor a hub repository id (owner/name)")


def resolve(model: str) -> Path:
    """The local directory of `model`: a directory as given, or a catalogue name or repository id
    already fetched by `lacuna pull`."""
    path = Path(model).expanduser()
    base = _split(model)[0]
    if path.exists() or not (base.lower() in CATALOG or REPO_ID.fullmatch(base)):
        return path  # a directory (the loader names it if it is missing)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, revision = lookup(model)
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{model!r} is not a directory, and the model {repo}@{revision} is not downloaded: "
                              f"run `lacuna pull {model}`") from None


def _refuse_pickles(files: list[str], repo: str) -> None:
    if not any(fnmatch.fnmatch(f, "*.safetensors") for f in files):
        pickled = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        found = f": it has only {', '.join(pickled[:3])}" if pickled else ""
        raise CheckpointError(f"{repo} has no safetensors weights{found}. Lacuna never loads pickled weights; "
                              "convert them to safetensors in a trusted environment first")


def pull(model: str) -> Path:
    """Fetch `model` into the hub cache (resuming a partial download) and return its directory."""
    from huggingface_hub import HfApi, snapshot_download

    repo, revision = lookup(model)
    try:
        info = HfApi().model_info(repo, revision=revision)
        _refuse_pickles([s.rfilename for s in info.siblings or []], repo)
        # By the name asked (not info.sha), so the cache records which commit that name is now.
        return Path(snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except CheckpointError:
        raise
    except Exception as err:  # the hub's HTTP, offline and connection errors: one message, no traceback
        raise CheckpointError(f"cannot fetch {repo}@{revision}: {type(err).__name__}: {err}") from None


def listing() -> list[dict]:
    """`lacuna models`: each catalogue entry with the commits downloaded of it, then any other
    model repository in the cache."""
    held = cached()
    known = {entry.repo for entry in CATALOG.values()}
    rows = [{**vars(entry), "ordering": FAMILIES[entry.family].ordering, "downloaded": held.get(entry.repo, [])}
            for entry in CATALOG.values()]
    return rows + [{"name": repo, "repo": repo, "downloaded": commits} for repo, commits in held.items()
                   if repo not in known]


def cached() -> dict[str, list[str]]:
    """The cached model repositories and the commits held of each."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return {}
    return {repo.repo_id: sorted(r.commit_hash for r in repo.revisions)
            for repo in info.repos if repo.repo_type == "model"}
