"""A request's own state and its text: the token healing it starts from, the rows whose text has
left their block, and the Completions its rows become. `Vocabulary` holds the text tables every
request's constraints are cut from, built once per engine; `Request`, what one request alone needs.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import Future, InvalidStateError

import torch
from tokenizers import Tokenizer

from .api import Completion, leaves_block
from .sampler import Denoiser


class Vocabulary:
    """Each token id's text, and the tables on the device that constrain a request's tokens by it:
    token healing's and a single line's. Each table scans the vocabulary once, on first use."""

    def __init__(self, tokenizer: Tokenizer, size: int, device: torch.device):
        self.tokenizer, self.size, self.device = tokenizer, size, device

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def healed(self, prefix: str, prefix_ids: list[int]) -> str:
        """The text token healing gives back to the infill ("" for none), for families trained on
        whole documents: a cursor rarely sits on a token boundary such a model saw (after `return `,
        the space is a token of its own; mid-word, the word is split). The prefix's last token is
        given back, and the infill's first token must start with its text, which is then cut from
        the answer."""
        healed = self.decode(prefix_ids[-1:])
        return healed if healed and prefix.endswith(healed) and self.starting_with(healed) is not None else ""

    def constraints(self, healed: str, *, split: bool, single_line: bool) -> dict:
        """The Denoiser's token constraints for an infill after `healed`. With `split` (a causal
        model), the text may also be taken in two tokens where the rest is spaces or tabs: its tokens
        hold a line's indentation but its last space, which goes with the word (a line break and
        three spaces, then ` return`), so after four spaces no token starting with the four is
        natural, and the model indented deeper."""
        first = self.starting_with(healed) if healed else None
        pair = self.split_healing(healed) if healed and split else None
        if pair is not None:
            first = first.clone()
            first[pair[0]] = True
        breaks = None
        if single_line:  # a line break past the text a healed first token gives back ends the line
            breaks = (self.last_line_break >= len(healed), self.last_line_break >= 0)
        return {"first_tokens": first, "split_healing": pair, "line_breaks": breaks}

    @functools.lru_cache(maxsize=512)  # noqa: B019 (one engine per process; its tokens never change)
    def starting_with(self, text: str) -> torch.Tensor | None:
        """A bool per vocabulary id, on the device; None when no token starts with `text`."""
        allowed = [token.startswith(text) for token in self.texts]
        return torch.tensor(allowed, device=self.device) if any(allowed) else None

    @functools.lru_cache(maxsize=512)  # noqa: B019 (as above)
    def split_healing(self, text: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ids whose text starts `text` and leaves only spaces or tabs of it, and for each, a
        bool per vocabulary id: whether it starts with that rest; None when there are none."""
        if not text.endswith((" ", "\t")):  # no rest of spaces or tabs: spare the vocabulary scan
            return None
        ids, nexts = [], []
        for i, token in enumerate(self.texts):
            rest = text[len(token):]
            if token and rest and text.startswith(token) and not rest.strip(" \t"):
                following = self.starting_with(rest)
                if following is not None:
                    ids.append(i)
                    nexts.append(following)
        return (torch.tensor(ids, device=self.device), torch.stack(nexts)) if ids else None

    @functools.cached_property
    def last_line_break(self) -> torch.Tensor:
        """Per vocabulary id, where the last line break stands in its text (-1: none), on the device."""
        return torch.tensor([text.rfind("\n") for text in self.texts], device=self.device)

    @functools.cached_property
    def texts(self) -> list[str]:
        return self.tokenizer.decode_batch([[i] for i in range(self.size)], skip_special_tokens=False)


class Request:
    """A submitted infill: `future` resolves to a list of n Completions."""

    def __init__(self, request_id: int, denoiser: Denoiser, n: int, deadline: float | None, healed: str = "",
                 scored_suffix: list[int] | None = None):
        self.id = request_id
        self.healed = healed  # text the prefix gave back to the infill's first token (token healing)
        self.scored_suffix = scored_suffix  # suffix tokens each completion's score covers; None: no score
        self.denoiser = denoiser
        self.n = n
        self.deadline = deadline
        self.future: Future[list[Completion]] = Future()
        self.cancelled = threading.Event()

    def result(self, timeout: float | None = None) -> list[Completion]:
        return self.future.result(timeout)

    def cancel(self) -> bool:
        """Ask the engine to stop this request within one step; False if it already finished."""
        if self.future.done():
            return False
        self.cancelled.set()
        return True

    def text(self, ids: list[int], vocabulary: Vocabulary) -> str:
        """The text of an infill's tokens, less what its first token gives back to the prefix."""
        text = vocabulary.decode(ids)
        return text[len(self.healed):] if text.startswith(self.healed) else text

    def end_rows_past_block(self, vocabulary: Vocabulary) -> None:
        """End each row of a multi-line infill whose text has left the block (`block_indent`)."""
        den = self.denoiser
        indent = den.options.block_indent
        if indent is None or self.future.done():
            return
        for row, (ids, _) in enumerate(den.result_rows(partial=True)):
            if leaves_block(self.text(ids, vocabulary), indent):
                den.end_row(row)

    def completions(self, rows: list[tuple[list[int], list[float]]], scores: list[float | None], partial: bool,
                    vocabulary: Vocabulary) -> list[Completion]:
        """The denoiser's result `rows` as Completions; `partial`: the time budget ran out first."""
        den = self.denoiser
        n_masks = den.end - den.start
        completions = []
        for (ids, conf), score in zip(rows, scores):
            reason = "budget" if partial else "length" if len(ids) == n_masks else "stop"
            completions.append(Completion(self.text(ids, vocabulary), ids, conf, den.steps, reason,
                                          den.x.shape[1] - n_masks, score))
        return completions

    def answer(self, completions: list[Completion] | None = None, error: Exception | None = None) -> None:
        """Resolve the future with `completions`, or with `error`."""
        try:
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(completions)
        except InvalidStateError:  # cancelled from another thread since it was retired: nobody waits
            pass
