"""The training objective: rows shaped like the engine's requests, the noise, and the loss.

Masked diffusion (the mean cross-entropy of masked tokens) over rows of code with holes where the
language server's own span rules would ask for a completion, each laid out as the engine lays out
a request's middle (`[BOS] prefix MASK*N suffix [EOS]`: the middle, then a tail of pad tokens) and
masked from a random point on, as the engine's left-to-right decoding leaves it; and over plain
rows masked at low rates.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor

from lsp.config import Options
from lsp.document import Document, is_word, line_start
from lsp.span import plan_span

from ..api import BLOCK_OPENERS
from ..config import Family
from ..loader import SpecialIds
from ..model import Transformer


class Row(NamedTuple):
    tokens: list[int]
    maskable: list[bool]  # positions the noise may mask (plain rows)
    holes: list[bool]  # positions masked already: each hole's rest, from where decoding has reached
    unscored: list[bool]  # masked positions the loss skips: a hole's pad after its first
    kind: str


@dataclass
class Batch:
    clean: Tensor  # (B, L) long: the uncorrupted sequences (pad after a row's end)
    maskable: Tensor  # (B, L) bool: positions the noise may mask
    holes: Tensor  # (B, L) bool: positions masked whatever the noise
    unscored: Tensor  # (B, L) bool: masked positions the loss skips
    attn: Tensor | None  # (B, L) bool: real tokens; None when every row fills L
    max_rate: Tensor  # (B,) float: the highest masking rate the noise draws for each row
    kinds: list[str]

    @property
    def tokens(self) -> int:
        return int(self.attn.sum()) if self.attn is not None else self.clean.numel()

    def to(self, device) -> Batch:
        return Batch(self.clean.to(device), self.maskable.to(device), self.holes.to(device),
                     self.unscored.to(device), None if self.attn is None else self.attn.to(device),
                     self.max_rate.to(device), self.kinds)


def collate(rows: list[Row], seq_len: int, pad: int, max_rate: Tensor) -> Batch:
    clean = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    flags = torch.zeros(4, len(rows), seq_len, dtype=torch.bool)  # maskable, holes, unscored, attn
    for i, row in enumerate(rows):
        if len(row.tokens) > seq_len:
            raise ValueError(f"an example of {len(row.tokens)} tokens exceeds seq_len {seq_len}")
        clean[i, :len(row.tokens)] = torch.tensor(row.tokens)
        flags[:3, i, :len(row.tokens)] = torch.tensor([row.maskable, row.holes, row.unscored])
        flags[3, i, :len(row.tokens)] = True
    maskable, holes, unscored, attn = flags
    return Batch(clean, maskable, holes, unscored, None if bool(attn.all()) else attn, max_rate,
                 [row.kind for row in rows])


def add_noise(batch: Batch, generator: torch.Generator, mask_id: int, eps: float = 1e-3,
              t: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The forward process: each maskable token of row i is masked with probability
    eps + (max_rate_i - eps) t_i, t drawn stratified over the batch ((u + i/B) mod 1, as MDLM's
    low-discrepancy sampler) unless given; the holes' masks are added. Returns (noisy tokens,
    masked: the positions the loss scores)."""
    b, length = batch.clean.shape
    if t is None:
        u = torch.rand(1, generator=generator)
        t = (u + torch.arange(b) / b) % 1.0
    p = eps + (batch.max_rate.float() - eps) * t.float()
    masked = batch.maskable & (torch.rand(b, length, generator=generator) < p[:, None]) | batch.holes
    return torch.where(masked, mask_id, batch.clean), masked & ~batch.unscored


def hidden_states(model: Transformer, tokens: Tensor, attn: Tensor | None = None) -> Tensor:
    """The engine's forward over whole rows, without a context cache: every position attends to
    every real token, padded keys masked out by `attn` (B, L)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
    return model(tokens, positions, None, attn_mask=attn[:, None, None, :] if attn is not None else None)


def diffusion_loss(model: Transformer, noisy: Tensor, batch: Batch, masked: Tensor,
                   forward: Callable[[Tensor, Tensor | None], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The mean cross-entropy of the masked tokens, respecting the family's logit shift (with
    shift 1, qwen2, position j-1 predicts token j). Returns (loss, per-token CE).

    Not LLaDA's 1/t-weighted bound: with its weights, a few tokens masked at a low rate outweigh
    a row of them, the clipped gradient is mostly that noise, and our CPU runs stayed at the
    unigram level; a plain mean over the masked tokens learned (model card, "Training")."""
    shift = model.config.family.logit_shift
    hidden = (forward or partial(hidden_states, model))(noisy, batch.attn)
    rows, cols = masked.nonzero(as_tuple=True)
    if shift and bool((cols < shift).any()):
        raise ValueError("a masked token at position 0 has no position before it to predict it from")
    logits = model.logits(hidden[rows, cols - shift])
    ce = F.cross_entropy(logits, batch.clean[rows, cols], reduction="none")
    loss = ce.mean() if ce.numel() else hidden.sum() * 0.0  # nothing masked: a zero step
    return loss, ce.detach()


CLOSERS = ")]}\"'"
HOLE_SHAPES = ("rest", "line", "block", "empty")
# The language server's defaults decide every hole's masked length, as they decide its requests'.
SERVER_OPTIONS = Options()


class ExampleSampler:
    """Training rows for step `step`, a pure function of (seed, step), so a resumed run sees the
    batches an uninterrupted one would.

    A share `holes_share` of the rows are windows of code with up to `max_holes` holes shaped like
    the language server's requests, each laid out as the engine lays out a request's middle:
    - "rest": the rest of a line from a cursor within it (sometimes leaving its closing brackets);
    - "line": a whole line from its indentation, as after pressing Enter;
    - "block": the body after a line that opens one, from the end of that line or its first
      line's indentation;
    - "empty": nothing is missing.
    Whether the server would ask there, and for how many masked tokens (a single line or a block),
    is decided by the server's own `plan_span` on the text as the user would see it; the hole is
    the true middle followed by pad up to that count, so the model learns where an infill ends.
    Each hole is masked from a point drawn uniformly over its middle and the pad that ends it, as
    the engine's left-to-right decoding leaves it after some steps; the loss scores the masked
    middle and that first pad, not the pads after it (nothing decodes them: the infill has
    ended). The other rows are uniform masked diffusion over plain text, at rates up to
    `plain_max_rate` (completion never sees a mostly masked file).
    """

    def __init__(self, texts: list[str], tokenizer: Tokenizer, special: SpecialIds, family: Family, seq_len: int,
                 holes_share: float = 0.7, seed: int = 0, max_holes: int = 8, plain_max_rate: float = 0.5):
        if seq_len < 16:
            raise ValueError("seq_len must be at least 16")
        self.texts, self.tokenizer, self.special, self.family = texts, tokenizer, special, family
        self.seq_len, self.holes_share, self.seed = seq_len, holes_share, seed
        self.max_holes, self.plain_max_rate = max_holes, plain_max_rate
        self.cumulative = np.cumsum([len(t) for t in texts])

    def _doc(self, rng: random.Random) -> int:
        return int(np.searchsorted(self.cumulative, rng.random() * self.cumulative[-1], side="right").clip(
            0, len(self.texts) - 1))

    def batch(self, step: int, batch_size: int) -> Batch:
        rng = random.Random(f"{self.seed}:{step}")
        plans = [self._plan_holes(rng) if rng.random() < self.holes_share else self._plan_plain(rng)
                 for _ in range(batch_size)]
        pieces = [text for plan in plans for text in plan["texts"]]
        encoded = iter(e.ids for e in self.tokenizer.encode_batch(pieces, add_special_tokens=False))
        rows = []
        for plan in plans:
            ids = [next(encoded) for _ in plan["texts"]]
            rows.append(self._assemble_holes(plan, ids, rng) if plan["kind"] == "holes"
                        else self._assemble_plain(plan, ids))
        max_rate = torch.tensor([1.0 if row.kind == "holes" else self.plain_max_rate for row in rows])
        return collate(rows, self.seq_len, self.special.pad, max_rate)

    # plain rows

    def _plan_plain(self, rng: random.Random) -> dict:
        need = self.seq_len * 5
        doc = self._doc(rng)
        text = self.texts[doc]
        start = _line_start(text, rng.randrange(len(text))) if rng.random() < 0.9 else 0
        texts = [text[start:start + need]]
        ends = [start + need >= len(text)]
        got = len(texts[0])
        while got < need and len(texts) < 64:
            text = self.texts[self._doc(rng)]
            texts.append(text[:need - got])
            ends.append(need - got >= len(text))
            got += len(texts[-1])
        return {"kind": "plain", "texts": texts, "ends": ends}

    def _assemble_plain(self, plan: dict, ids: list[list[int]]) -> Row:
        lead = self.special.bos if self.special.bos is not None else self.special.eos
        tokens = [lead]
        for piece, ends in zip(ids, plan["ends"]):
            tokens += piece
            if ends:
                tokens.append(self.special.eos)
            if len(tokens) >= self.seq_len:
                break
        tokens = tokens[:self.seq_len]
        none = [False] * len(tokens)
        return Row(tokens, [False] + [True] * (len(tokens) - 1), none, none, "plain")

    # rows with holes

    def _plan_holes(self, rng: random.Random) -> dict:
        """A window of one document (about 4 characters a token) and its holes: `texts` alternates
        the text kept and each hole's middle; `masks` is each hole's masked length."""
        text = self.texts[self._doc(rng)]
        start = _line_start(text, rng.randrange(len(text)))
        window = text[start:start + self.seq_len * 4]
        holes: list[tuple[int, int, int]] = []
        view = Document("file:///train.py", window, "python")  # one parse; each hole is two quick edits
        for _ in range(self.max_holes * 3):
            if len(holes) == self.max_holes:
                break
            hole = _hole(window, rng)
            if hole is None or any(s < hole[1] and hole[0] < e or hole[0] == s for s, e, _ in holes):
                continue
            s, e = hole
            view.edit(s, e, "")  # the text as the user sees it, without the hole
            span = plan_span(view, s, SERVER_OPTIONS)
            view.edit(s, s, window[s:e])
            if span is not None:
                holes.append((s, e, span.tokens))
        holes.sort()
        texts, at = [], 0
        for s, e, _ in holes:
            texts += [window[at:s], window[s:e]]
            at = e
        texts.append(window[at:])
        return {"kind": "holes", "texts": texts, "masks": [n for _, _, n in holes]}

    def _assemble_holes(self, plan: dict, ids: list[list[int]], rng: random.Random | None = None) -> Row:
        """`[BOS] text MASK*n text MASK*n ... [EOS]`: with one hole, the engine's layout exactly
        (each hole masked from its start when `rng` is None, else from a random point in it).
        A hole whose middle does not fit its masked length (the server would cut it) becomes text;
        the window is cut to seq_len, never inside a hole."""
        tail = [self.special.eos] if self.family.eos_after_suffix else []
        room = self.seq_len - len(tail)
        tokens, holes, unscored = [self.special.bos], [False], [False]
        for i, piece in enumerate(ids):
            n = plan["masks"][i // 2] if i % 2 else 0
            if i % 2 and len(piece) <= n:
                if len(tokens) + n > room:
                    break
                decoded = rng.randint(0, min(len(piece), n - 1)) if rng is not None else 0
                tokens += piece + [self.special.pad] * (n - len(piece))
                holes += [False] * decoded + [True] * (n - decoded)
                ends = min(len(piece) + 1, n)  # the middle and the pad that ends it are scored
                unscored += [False] * ends + [True] * (n - ends)
                continue
            piece = piece[:room - len(tokens)]
            tokens += piece
            holes += [False] * len(piece)
            unscored += [False] * len(piece)
        end = [False] * len(tail)
        return Row(tokens + tail, [False] * (len(tokens) + len(tail)), holes + end, unscored + end, "holes")


def _line_start(text: str, offset: int) -> int:
    return line_start(text, offset, 0)


def _hole(text: str, rng: random.Random) -> tuple[int, int] | None:
    """A (start, end) cut of one of HOLE_SHAPES at a random line of `text`, or None."""
    line_start = _line_start(text, rng.randrange(max(1, len(text))))
    line_end = text.find("\n", line_start)
    if line_end == -1:
        return None
    line = text[line_start:line_end]
    code = line_start + len(line) - len(line.lstrip(" \t"))
    if code == line_end or line.lstrip().startswith("#"):
        return None
    shape = rng.choices(HOLE_SHAPES, weights=(0.45, 0.25, 0.2, 0.1))[0]
    if shape == "empty":
        return line_end, line_end
    if shape == "block":
        return _block_hole(text, line_start, line_end, rng)
    if shape == "line":
        return code, line_end
    cuts = [p for p in range(code + 1, line_end) if not (is_word(text[p - 1]) and is_word(text[p]))]
    if not cuts:
        return None
    s = rng.choice(cuts)
    run = len(text[s:line_end]) - len(text[s:line_end].rstrip(CLOSERS + ":,"))
    if 0 < run < line_end - s and rng.random() < 0.3:  # closing brackets typed already (auto-closed)
        return s, line_end - run
    return s, line_end


def _block_hole(text: str, line_start: int, line_end: int, rng: random.Random) -> tuple[int, int] | None:
    """The indented body after a line ending in ':' or '{', whole or its first lines."""
    if not text[line_start:line_end].rstrip().endswith(BLOCK_OPENERS):
        return None
    indent = len(text[line_start:line_end]) - len(text[line_start:line_end].lstrip(" \t"))
    body_end, at = None, line_end + 1
    while at < len(text):
        end = text.find("\n", at)
        end = len(text) if end == -1 else end
        line = text[at:end]
        if line.strip():
            if len(line) - len(line.lstrip(" \t")) <= indent:
                break
            body_end = end
            if rng.random() < 0.15:  # the first lines of a longer body
                break
        at = end + 1
    if body_end is None:
        return None
    if rng.random() < 0.5:  # after Enter: from the first body line's indentation
        first = text[line_end + 1:body_end]
        return line_end + 1 + len(first) - len(first.lstrip()), body_end
    return line_end, body_end
