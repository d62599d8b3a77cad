"""The VS Code extension's own checks in editors/vscode: `npm ci`, the type check, eslint and the
unit tests of its pure logic (node's test runner). The end-to-end run in real VS Code is
editors/vscode/e2e/run.sh, too heavy for the suite (code-server, Chromium)."""

import pathlib
import subprocess

import pytest
from conftest import require_program

pytestmark = pytest.mark.slow
EXTENSION = pathlib.Path(__file__).resolve().parents[1] / "editors" / "vscode"


def npm(*args: str) -> str:
    result = subprocess.run(["npm", *args], cwd=EXTENSION, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"npm {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed():
    for program in ("node", "npm"):
        require_program(program, "apt-get install nodejs npm")
    npm("ci", "--no-audit", "--no-fund", "--prefer-offline")


def test_typecheck(installed):
    npm("run", "typecheck")


def test_lint(installed):
    npm("run", "lint")


def test_unit_tests(installed):
    assert "# fail 0" in npm("test")
