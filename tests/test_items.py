"""The server's helpers without a server: protocol items from candidates, and the completer asking
an `InfillEngine` within the capacity it reports."""

from engine.api import Capacity, Completion, DecodeOptions
from lsp.completer import SCORED_SUFFIX_TOKENS, Completer
from lsp.config import Options
from lsp.document import Document
from lsp.items import ACCEPTED, LABEL_CHARS, completion_items, inline_items, word_start
from lsp.postprocess import Candidate


def test_word_start():
    assert word_start("x = foo_bar", 11) == 4
    assert word_start("x = (", 5) == 5
    assert word_start("émile", 5) == 0


def test_inline_items_replace_the_auto_closed_suffix():
    doc = Document("file:///a.py", "print(\n", "python")
    found = [Candidate("'hi')", replace_suffix=0), Candidate("x", replace_suffix=0)]
    items = inline_items(doc, 6, found, "utf-16").items
    assert [i.insert_text for i in items] == ["'hi')", "x"]
    assert items[0].range.start.character == items[0].range.end.character == 6
    assert items[0].command.command == ACCEPTED and items[0].command.arguments == ["file:///a.py"]
    doc = Document("file:///b.py", "print()\n", "python")
    item = inline_items(doc, 6, [Candidate("'hi')", replace_suffix=1)], "utf-16").items[0]
    assert (item.range.start.character, item.range.end.character) == (6, 7)


def test_completion_items_start_at_the_word_and_label_the_first_line():
    doc = Document("file:///a.py", "value = compu\n", "python")
    long = "te_" + "x" * 60 + "()\nmore"
    items = completion_items(doc, 13, [Candidate("te()"), Candidate(long)], "utf-16").items
    assert items[0].label == "compute()" and items[0].text_edit.new_text == "compute()"
    assert items[0].text_edit.range.start.character == 8
    assert len(items[1].label) == LABEL_CHARS and items[1].label.endswith("…")


class Recorder:
    """An InfillEngine in memory: answers "pass" and records what it was asked."""

    name, url, device, up = "recorder", None, "cpu", True

    def __init__(self, capacity: Capacity):
        self.capacity = capacity
        self.asked = []

    async def infill(self, prefix, suffix, n_tokens, *, n=1, options=DecodeOptions(), time_budget=None):
        self.asked.append((prefix, suffix, n_tokens))
        return [Completion("pass", [], [], 1, "stop")] * n


async def test_completer_fits_the_context_to_the_engines_capacity():
    text = "".join(f"line_{i} = {i}\n" for i in range(2000)) + "def f():\n    \n" + "x = 1\n" * 500
    doc = Document("file:///big.py", text, "python")
    offset = text.index("def f():\n    ") + len("def f():\n    ")
    small = Recorder(Capacity(max_tokens=64, max_context=256, reserved_tokens=2))
    found = await Completer(Options(), small).complete(doc, offset, [doc])
    assert [c.text for c in found] == ["pass"]
    prefix, suffix, n_tokens = small.asked[0]
    room = 256 - n_tokens - 2
    assert len(prefix) <= room * 5 // 8 * 3 + room // 8 * 3 and len(suffix) <= room // 4 * 3
    unknown = Recorder(Capacity(max_tokens=64, max_context=None, reserved_tokens=0))
    await Completer(Options(), unknown).complete(doc, offset, [doc])
    assert len(unknown.asked[0][0]) > len(prefix)  # no model limit: the default windows


async def test_a_slow_engine_gets_the_context_it_reads_within_the_time_budget():
    text = "".join(f"line_{i} = {i}\n" for i in range(2000)) + "def f():\n    \n" + "x = 1\n" * 500
    doc = Document("file:///slow.py", text, "python")
    offset = text.index("def f():\n    ") + len("def f():\n    ")
    fast = Recorder(Capacity(max_tokens=64, max_context=32768, reserved_tokens=2, context_per_second=1e6))
    slow = Recorder(Capacity(max_tokens=64, max_context=32768, reserved_tokens=2, context_per_second=400))
    for engine in (fast, slow):
        await Completer(Options(time_budget_ms=1500), engine).complete(doc, offset, [doc])
    # 400 tokens a second for a quarter of 1.5 s: 150 tokens of context (at most about 3 characters each).
    slow_context = sum(map(len, slow.asked[0][:2]))
    assert slow_context <= 150 * 3 < sum(map(len, fast.asked[0][:2]))


class Scored(Recorder):
    """Answers the greedy request with one scored candidate and the sampled one with a likelier
    and an unscored one."""

    async def infill(self, prefix, suffix, n_tokens, *, n=1, options=DecodeOptions(), time_budget=None):
        self.asked.append(options)
        if options.temperature == 0:
            return [Completion("total", [], [], 1, "stop", score=-9.0)]
        return [Completion("total / len(xs)", [], [], 1, "stop", score=-4.0),
                Completion("None", [], [], 1, "budget")][:n]


async def test_candidates_come_most_likely_with_the_suffix_first():
    doc = Document("file:///mean.py", "def mean(xs):\n    return \n\nprint(mean([1, 2]))\n", "python")
    offset = doc.text.index("return ") + len("return ")
    engine = Scored(Capacity(max_tokens=64, max_context=None, reserved_tokens=0))
    found = await Completer(Options(candidates=3), engine).complete(doc, offset, [doc])
    assert [c.text for c in found] == ["total / len(xs)", "total", "None"]
    assert [options.score_suffix for options in engine.asked] == [SCORED_SUFFIX_TOKENS] * 2
    alone = Scored(engine.capacity)
    assert [c.text for c in await Completer(Options(), alone).complete(doc, offset, [doc])] == ["total"]
    assert alone.asked[0].score_suffix == 0  # one candidate: nothing to rank, no forwards spent on it
