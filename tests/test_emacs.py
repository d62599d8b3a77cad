"""The Emacs client (editors/emacs/lacuna.el) in real Emacs, batch mode, with Eglot, against a
real `lacuna serve`. Needs Debian's emacs-nox and elpa-eglot (Emacs 28 has no Eglot of its own);
`-q` rather than `-Q`, because Debian's site start-up is what puts its elpa packages on the path."""

import pathlib
import shutil
import subprocess
import sys

import pytest
from conftest import REQUIRE_EDITORS, require_program

from engine.api import VERSION

pytestmark = pytest.mark.slow
LACUNA_EL = pathlib.Path(__file__).parent.parent / "editors" / "emacs" / "lacuna.el"
APT = "apt-get install emacs-nox elpa-eglot"


def emacs(*args, timeout=120):
    require_program("emacs", APT)
    done = subprocess.run(["emacs", "--batch", "-q", *args], capture_output=True, text=True, timeout=timeout)
    if "Cannot open load file" in done.stderr and "eglot" in done.stderr:
        missing = f"Eglot is not installed: {APT}"
        pytest.fail(missing) if REQUIRE_EDITORS else pytest.skip(missing)
    return done


def test_byte_compiles_without_warnings(tmp_path):
    source = tmp_path / "lacuna.el"
    shutil.copy(LACUNA_EL, source)
    done = emacs("--eval", "(setq byte-compile-error-on-warn t)", "-f", "batch-byte-compile", str(source))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "lacuna.elc").exists()


def test_eglot_completes_at_point_and_shows_status(constant_checkpoint, tmp_path):
    source = tmp_path / "area.py"
    source.write_text("def area(width, height):\n    result = w\n    return result\n")
    server = [sys.executable, "-m", "lsp.cli", "serve", "--model", str(constant_checkpoint)]
    script = f"""
        (setq eglot-sync-connect 60 eglot-connect-timeout 60 jsonrpc-default-request-timeout 60)
        (setq lacuna-server-command '({" ".join(f'"{arg}"' for arg in server)})
              lacuna-settings '(:timeBudgetMs 20000))
        (find-file "{source}")
        (call-interactively #'eglot)
        (goto-char (point-min))
        (forward-line 1)
        (end-of-line)
        (completion-at-point)  ; one candidate: inserted
        (princ (format "LINE %s\\n" (buffer-substring (line-beginning-position) (line-end-position))))
        (lacuna-status)
    """
    done = emacs("-l", str(LACUNA_EL), "--eval", f"(progn {script})")
    assert done.returncode == 0, done.stderr
    line = next(out for out in done.stdout.splitlines() if out.startswith("LINE "))
    assert line.startswith("LINE     result = wxxx")
    assert f"Lacuna: lacuna {VERSION}, model constant" in done.stderr and "device cpu" in done.stderr
