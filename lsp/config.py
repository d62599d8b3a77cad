"""Server options: a typed dataclass filled from camelCase `initializationOptions` and
`workspace/didChangeConfiguration` settings. An invalid value keeps its default and is reported."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field

DEVICES = ("cpu", "cuda", "mps")
URL = re.compile(r"https?://[^/\s]+")  # engineUrl


@dataclass
class Options:
    model_dir: str | None = None  # checkpoint directory; None: the default model
    device: str | None = None  # "cpu", "cuda" or "mps"; None: the best one present
    int8: bool = False  # int8 linear layers: about twice as fast on a CPU (at start-up)
    engine_url: str | None = None  # a FIM endpoint (`lacuna engine`) instead of a model in-process
    engine_model: str | None = None  # the `model` field sent to it (hosted APIs need one)
    max_tokens: int = 64  # masked tokens for a block; a single line gets at most a third of it
    multiline: bool = True  # allow block completions
    enabled_languages: list[str] = field(default_factory=lambda: ["*"])  # languageIds, "*" for all
    candidates: int = 1  # completions per request
    debounce_ms: int = 0  # wait this long for more typing before asking the engine
    time_budget_ms: int = 1500  # the engine answers with what it has after this long
    complete_in_comments: bool = False
    complete_in_strings: bool = False

    def language_enabled(self, language_id: str | None) -> bool:
        return "*" in self.enabled_languages or language_id in self.enabled_languages


# Bounds for the numbers: (low, high).
LIMITS = {"max_tokens": (1, 256), "candidates": (1, 8), "debounce_ms": (0, 5000), "time_budget_ms": (50, 60000)}
TYPES = typing.get_type_hints(Options)


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _convert(name: str, value: object) -> object:
    """The value checked strictly against the option's type: no 1.5 for an int, no "yes" for a flag."""
    kind = TYPES[name]
    ok = {int: type(value) is int, bool: type(value) is bool, str | None: value is None or isinstance(value, str),
          list[str]: isinstance(value, list) and all(isinstance(v, str) for v in value)}[kind]
    if not ok:
        raise TypeError(f"expected {getattr(kind, '__name__', kind)}")
    low, high = LIMITS.get(name, (None, None))
    if low is not None and not low <= value <= high:
        raise ValueError(f"must be between {low} and {high}")
    if name == "device" and value not in (None, *DEVICES):
        raise ValueError(f"must be one of {', '.join(DEVICES)}")
    if name == "engine_url" and value is not None and not URL.match(value):
        raise ValueError("must be an http:// or https:// URL")
    return value


def update_options(options: Options, settings: object) -> tuple[Options, list[str]]:
    """`options` with the camelCase `settings` applied, and one message per rejected value."""
    if settings is None:
        return options, []
    if not isinstance(settings, dict):
        return options, [f"settings must be an object, not {type(settings).__name__}"]
    changes, errors = {}, []
    for key, value in settings.items():
        name = snake(key)
        if name not in TYPES:
            errors.append(f"unknown setting {key!r}")
            continue
        try:
            changes[name] = _convert(name, value)
        except (TypeError, ValueError) as err:
            errors.append(f"invalid {key}: {value!r} ({err}); keeping {getattr(options, name)!r}")
    return dataclasses.replace(options, **changes), errors
