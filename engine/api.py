"""The engine's interface, free of torch: what a caller sends, what it gets back, and the
Protocol that both the in-process `Engine` (engine.py) and the HTTP client `RemoteEngine`
(lsp/remote.py) satisfy. The language server codes against this module only, so a server that
talks to `lacuna engine` over HTTP never imports torch.
"""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol

try:
    VERSION = importlib.metadata.version("lacuna-lsp")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    VERSION = "0+unknown"

API_KEY_ENV = "LACUNA_API_KEY"  # the engine service's key: `lacuna engine` requires it, its clients send it
POLICIES = ("steps", "threshold", "fixed")
ORDERINGS = ("confidence", "margin", "entropy", "left_to_right")
BLOCK_OPENERS = (":", "{")  # a line ending in one opens a block: an indented body follows
# A line ending in one carries on below: a block opened or carried on (`else:`), or a bracket's items.
OPENERS = (*BLOCK_OPENERS, "(", "[")
MAX_TIME_BUDGET = 60.0  # seconds: a longer budget is refused (an editor's lies within 0.05-60 s)
TIME_BUDGET_FIELD = "time_budget_ms"  # the time budget in a request's JSON, in milliseconds
# A DecodeOptions field's annotation -> the JSON values it takes (an int is a float too; a bool is
# never a number).
WIRE_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


class EngineError(RuntimeError):
    """A request the engine could not serve; the engine itself keeps serving."""


@dataclass(frozen=True)
class DecodeOptions:
    policy: str = "threshold"
    steps: int | None = None  # "steps": denoising steps, at most the masked tokens (default: as many)
    threshold: float = 0.9  # "threshold": confidence at which a position is kept
    tokens_per_step: int = 4  # "fixed"
    ordering: str | None = None  # None: the order the model's authors decode with (Family.ordering)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    use_cache: bool = True  # dual context cache; False runs a full forward every step
    refresh_every: int = 0  # re-encode the context every k steps (0: never)
    min_tokens: int = 0  # the infill's first k tokens are never EOS or pad (an editor wants something)
    # The infill ends after its first line break, and none of its first `min_tokens` is one: no
    # steps are spent past a line the editor shows alone.
    single_line: bool = False
    # A causal model's greedy infill drafts up to this many tokens a step by prompt lookup (what
    # followed the latest earlier occurrence of its last tokens) and keeps those the model agrees
    # with: the same infill in fewer steps (0: one token a step).
    lookup: int = 2
    # A causal model's completions carry `score`, the log-likelihood of the infill and of this many
    # suffix tokens after it: how well each fits the code after the cursor, which such a model
    # never reads while decoding (0: no score).
    score_suffix: int = 0
    # A multi-line infill ends after its first whole line, past the first, that is indented less
    # than this many columns and does not end with an opener (`else:` and `} else {` carry a block
    # on): the block at the cursor has closed, and no steps are spent past it (llama.cpp's
    # n_indent). None: no such end.
    block_indent: int | None = None

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {self.policy!r}")
        if self.ordering is not None and self.ordering not in ORDERINGS:
            raise ValueError(f"ordering must be one of {ORDERINGS}, not {self.ordering!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError("steps must be at least 1")
        if not 0.0 < self.threshold <= 1.0:  # 0 would keep every prediction of the first step
            raise ValueError(f"threshold must be within (0, 1], not {self.threshold}")
        if self.tokens_per_step < 1:
            raise ValueError("tokens_per_step must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p within (0, 1]")
        if self.refresh_every < 0:
            raise ValueError("refresh_every must be >= 0")
        if self.min_tokens < 0:
            raise ValueError("min_tokens must be >= 0")
        if self.lookup < 0:
            raise ValueError("lookup must be >= 0")
        if self.score_suffix < 0:
            raise ValueError("score_suffix must be >= 0")
        if self.block_indent is not None and self.block_indent < 0:
            raise ValueError("block_indent must be >= 0")

    def to_wire(self) -> dict[str, Any]:
        """Every field by its name, as a request's JSON carries it (`from_wire` reads it back)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> DecodeOptions:
        """The options a request's JSON names (keys that are no field are the request's own); each
        value is checked against its field's annotation, then as in process (ValueError)."""
        values = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value, types = data[f.name], f.type.split(" | ")  # the annotation as written: "int | None"
            if value is None and "None" in types:
                values[f.name] = None
                continue
            if not any(isinstance(value, WIRE_TYPES[t]) and (t == "bool" or not isinstance(value, bool))
                       for t in types if t != "None"):
                raise ValueError(f"{f.name} must be {' or '.join(types)}, not {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, not {value!r}")
            values[f.name] = float(value) if "float" in types else value
        return cls(**values)


def check_infill(n_tokens: int, options: DecodeOptions, time_budget: float | None = None) -> None:
    """What an infill request may not ask, in process and over HTTP alike (ValueError): more steps
    than masked tokens (a step unmasks at least one), or a time budget not within (0, 60] seconds."""
    if options.steps is not None and options.steps > n_tokens:
        raise ValueError(f"steps ({options.steps}) must not be more than the {n_tokens} masked tokens")
    if time_budget is not None and not 0 < time_budget <= MAX_TIME_BUDGET:
        raise ValueError(f"time_budget must be within (0, {MAX_TIME_BUDGET:g}] seconds, not {time_budget}")


def time_budget_to_wire(seconds: float | None) -> dict[str, Any]:
    """A request's JSON field for a time budget (none without one)."""
    return {} if seconds is None else {TIME_BUDGET_FIELD: seconds * 1000}


def time_budget_from_wire(data: Mapping[str, Any]) -> float | None:
    """The time budget a request's JSON gives, in seconds (ValueError where it is not a number of
    milliseconds within (0, 60000])."""
    ms = data.get(TIME_BUDGET_FIELD)
    if ms is None:
        return None
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 < ms <= MAX_TIME_BUDGET * 1000:
        raise ValueError(f"{TIME_BUDGET_FIELD} must be a number within (0, {MAX_TIME_BUDGET * 1000:g}], not {ms!r}")
    return ms / 1000


def indentation(line: str) -> int:
    """Columns of leading spaces and tabs (a tab is one)."""
    return len(line) - len(line.lstrip(" \t"))


def leaves_block(text: str, indent: int) -> bool:
    """Whether a whole line of an infill's `text`, past its first, is indented less than `indent`
    columns and opens nothing (DecodeOptions.block_indent)."""
    for line in text.split("\n")[1:-1]:  # the last is not whole yet
        code = line.strip()
        if code and indentation(line) < indent and not code.endswith(OPENERS):
            return True
    return False


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    confidences: list[float]
    steps: int
    finish_reason: str  # "stop": the model ended it; "length": all N tokens; "budget": time ran out
    context_tokens: int = 0  # prefix and suffix tokens the model saw (after trimming), with BOS/EOS
    score: float | None = None  # with DecodeOptions.score_suffix: log p(infill, suffix | prefix)


@dataclass(frozen=True)
class Capacity:
    """What one request may ask of an engine."""

    max_tokens: int  # masked tokens per request
    max_context: int | None  # positions for prefix, middle and suffix together; None: unknown
    reserved_tokens: int  # positions the layout adds around prefix and suffix (BOS, EOS)
    # Context tokens one infill gets through per second, measured at start-up; None: unmeasured.
    context_per_second: float | None = None


@dataclass(frozen=True)
class Limits:
    """What `lacuna engine` accepts of a request (its command-line defaults)."""

    max_body_bytes: int = 4 << 20
    max_tokens: int = 256  # never above the engine's own
    max_n: int = 8
    max_context_chars: int = 1_000_000  # prompt and suffix together; the engine trims to its window


class InfillEngine(Protocol):
    """An engine the language server can ask for infills: in-process or over HTTP."""

    name: str  # the model, as `lacuna.status` reports it
    url: str | None  # the endpoint, or None in-process

    @property
    def device(self) -> str | None: ...  # where the model runs, when known

    @property
    def up(self) -> bool: ...  # False while an endpoint cannot be reached

    @property
    def capacity(self) -> Capacity: ...

    async def infill(self, prefix: str, suffix: str, n_tokens: int, *, n: int = 1,
                     options: DecodeOptions = DecodeOptions(), time_budget: float | None = None) -> list[Completion]:
        """`n` infills of `n_tokens` masks between `prefix` and `suffix`; cancelling the awaiting
        task stops the engine's work for it."""
        ...
