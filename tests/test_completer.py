"""The completer without a server: asking an `InfillEngine` within the capacity it reports, and
ranking its candidates."""

from engine.api import Capacity, Completion, DecodeOptions
from lsp.completer import SCORED_SUFFIX_TOKENS, Completer
from lsp.config import Options
from lsp.document import Document


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
