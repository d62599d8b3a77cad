"""The editor side without torch: `lacuna serve --engine-url` answers from a real `lacuna engine`
and never imports torch (nor the engine's other run-time libraries) in its own process."""

import asyncio
import json
import subprocess
import sys

from test_server import inline, open_doc, start, stop
from test_service import engine_process, free_port, wait_healthy

# `lacuna serve` as the console script runs it, noting which heavy libraries it imported when it
# leaves (through os._exit, which skips atexit).
SERVER = """
import json, os, sys
from lsp.cli import main
heavy = ("torch", "numpy", "safetensors", "tokenizers", "fastapi")
leave = os._exit
def report_and_leave(code):
    with open(sys.argv[1], "w") as report:
        report.write(json.dumps(sorted({name.split(".")[0] for name in sys.modules if name.split(".")[0] in heavy})))
    leave(code)
os._exit = report_and_leave
sys.exit(main(["serve", *sys.argv[2:]]))
"""


async def test_thin_server_answers_from_an_engine_service_without_torch(constant_checkpoint, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine = engine_process(constant_checkpoint, port)
    report = tmp_path / "modules.json"
    try:
        wait_healthy(url)
        client, _, _ = await start([sys.executable, "-c", SERVER, str(report), "--engine-url", url])
        open_doc(client, "file:///work/thin.py", "def f():\n    return \n")
        items = (await asyncio.wait_for(inline(client, "file:///work/thin.py", 1, 11), 60)).items
        assert items and items[0].insert_text.startswith("x")
        await stop(client)
    finally:
        engine.kill()
        engine.wait()
    assert json.loads(report.read_text()) == []


def test_the_command_line_imports_no_torch():
    """Parsing any command imports nothing heavy: only running one that needs a model does."""
    check = ("import sys; from lsp import cli, server, completer, remote, demo; "
             "print(sorted(m for m in ('torch', 'numpy', 'safetensors', 'tokenizers') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
