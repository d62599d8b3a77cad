"""Masked-diffusion infilling: the request layout and the unmasking policies.

A request is `[BOS] prefix MASK*N suffix [EOS]`. Each denoising step the model predicts every
masked position; a policy picks which predictions to keep:
- "steps": LLaDA's low-confidence remasking, N tokens spread over a fixed step count as the
  family's decoder spreads them (Family.schedule: evenly, as LLaDA, or by Dream's schedule);
- "threshold": Fast-dLLM's parallel decoding, every position at or above the confidence
  threshold, at least one per step;
- "fixed": a fixed number of tokens per step (for random-weight benchmarks, which have no
  meaningful confidence).
The ordering ("confidence", "margin", "entropy") ranks positions; "left_to_right" keeps the
leftmost masked position and the confident run right after it (a small model reads best when the
middle grows from the prefix, as it was trained); equal scores go to the leftmost position.
Temperature and top-p shape the token draw.
Once a position decodes to EOS or pad, the infill ends there; a single-line infill ends after
its first line break. A causal model (Family.causal) predicts only the leftmost masked position,
from the one before it: it decodes left to right, one token a step, or, greedy, a few: the tokens
that followed the latest earlier occurrence of its last ones are drafted into the next masks and
kept as far as the model predicts the same from them (prompt lookup decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .api import DecodeOptions, EngineError
from .loader import SpecialIds

LOOKUP_NGRAM = 3  # the longest run of last tokens prompt lookup matches


@dataclass
class Layout:
    tokens: list[int]
    start: int  # first masked position
    end: int  # one past the last masked position


def build_layout(prefix: list[int], suffix: list[int], n: int, *, mask: int, bos: int | None,
                 eos: int, eos_after_suffix: bool, shifted: bool, max_len: int,
                 separator: int | None = None, fim: tuple[int, ...] | None = None) -> Layout:
    """`[BOS] prefix MASK*n suffix [EOS]`, or with a `separator`, `suffix SEP prefix MASK*n`
    (suffix-prefix-middle), or with `fim` sentinels (PRE, SUF, MID), a fill-in-the-middle prompt
    `PRE prefix SUF suffix MID MASK*n`; the far ends of the context (the prefix's start, the
    suffix's end) are trimmed to fit `max_len`, never a sentinel."""
    if separator is not None or fim is not None:
        lead, tail = [], []
    else:  # a shifted model predicts the first masked token from the position before it
        lead = [bos] if bos is not None else ([eos] if shifted and not prefix else [])
        tail = [eos] if eos_after_suffix else []
    budget = max_len - n - len(lead) - len(tail) - (separator is not None) - (len(fim) if fim is not None else 0)
    if budget < 0:
        raise ValueError(f"{n} masked tokens do not fit the model's {max_len} positions")
    if len(prefix) + len(suffix) > budget:
        keep_suffix = min(len(suffix), max(budget - len(prefix), budget // 4))
        suffix = suffix[:keep_suffix]
        prefix = prefix[len(prefix) - (budget - keep_suffix):] if budget > keep_suffix else []
    if fim is not None:  # MID predicts the first masked token
        context = [fim[0], *prefix, fim[1], *suffix, fim[2]]
        return Layout(context + [mask] * n, len(context), len(context) + n)
    if separator is not None:
        start = len(suffix) + 1 + len(prefix)
        return Layout(suffix + [separator] + prefix + [mask] * n, start, start + n)
    start = len(lead) + len(prefix)
    return Layout(lead + prefix + [mask] * n + suffix + tail, start, start + n)


SCHEDULES = ("even", "dream")  # Family.schedule


def transfer_schedule(n: int, steps: int, kind: str = "even") -> list[int]:
    """Tokens each of `steps` steps unmasks of `n` masks, as the family's decoder spreads them
    (Family.schedule): "even" is LLaDA's split, the remainder going to the first steps; "dream"
    is Dream's (dream_schedule)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, not {kind!r}")
    if kind == "dream":
        return dream_schedule(n, steps)
    steps = min(steps, n)
    return [n // steps + (1 if i < n % steps else 0) for i in range(steps)]


DREAM_EPS = 1e-3  # the last time of Dream's schedule (its generation config's `eps`)


def dream_schedule(n: int, steps: int, eps: float = DREAM_EPS) -> list[int]:
    """Dream's schedule (`_sample` in its generation_utils.py, maskgit_plus/topk_margin/entropy):
    times fall linearly from 1 to `eps` over `steps` steps, and the step from t to s unmasks
    int(m * (1 - s / t)) of the m masks still left, the last one all that are left (so a step may
    unmask none). Dream counts the masks left in its state; a greedy step unmasks exactly its
    count, so the same counts follow from (n, steps) alone. In float32, as Dream computes them."""
    times = torch.linspace(1, eps, steps + 1)
    fractions = 1 - times[1:] / times[:-1]  # float32 tensors, as Dream's
    counts, left = [], n
    for fraction in fractions[:-1]:
        count = int(left * fraction)  # a float32 product, truncated
        counts.append(count)
        left -= count
    return counts + [left]


class Denoiser:
    """The state of one request's `rows` candidates while their middles are unmasked."""

    def __init__(self, layout: Layout, rows: int, options: DecodeOptions, special: SpecialIds, *, device,
                 generator: torch.Generator | None = None, first_tokens: Tensor | None = None,
                 split_healing: tuple[Tensor, Tensor] | None = None,
                 line_breaks: tuple[Tensor, Tensor] | None = None, causal: bool = False,
                 schedule: str = "even"):
        self.options, self.stop_ids, self.pad, self.mask = options, special.stop_ids, special.pad, special.mask
        self.causal = causal
        self.drafted = 0  # masked columns after the leftmost that hold drafted tokens
        # Made here: a CUDA graph cannot copy them in.
        self.stop = torch.tensor(self.stop_ids, device=device)
        self.banned = torch.tensor((special.mask, *special.banned), device=device)
        # Token healing: the ids the first middle token may be (a bool per vocabulary id), or None.
        self.first_bias = None if first_tokens is None else torch.where(first_tokens, 0.0, -torch.inf)
        # A causal model's healing in two tokens: the first ids that take only part of the text given
        # back, and for each, the ids the second token may be (k, vocabulary bools).
        self.split_healing = None if split_healing is None else (
            split_healing[0], torch.where(split_healing[1], 0.0, -torch.inf))
        # For a single-line infill, a bool per vocabulary id: whether its answer text holds a line
        # break, in the first column (after text a healed token gives back) and in the others.
        self.line_breaks = line_breaks
        self.start, self.end = layout.start, layout.end
        self.x = torch.tensor(layout.tokens, device=device).repeat(rows, 1)
        n = self.end - self.start
        self.masked = torch.ones(rows, n, dtype=torch.bool, device=device)
        self.fresh = torch.zeros_like(self.masked)  # decoded last step: their keys are stale
        self.confidence = torch.zeros(rows, n, device=device)
        # A step that would unmask nothing leaves the state as it was: it is not run.
        self.schedule = [count for count in transfer_schedule(n, options.steps or n, schedule) if count] \
            if options.policy == "steps" else None
        self.steps = 0
        self.generator = generator

    @property
    def middle(self) -> Tensor:
        return self.x[:, self.start:self.end]

    @property
    def done(self) -> bool:
        return not bool(self.masked.any())

    def columns_to_predict(self) -> Tensor:
        """Middle columns still masked in some row: the only ones whose logits are needed (for a
        causal model the leftmost and the drafted ones after it)."""
        columns = self.masked.any(dim=0).nonzero()[:, 0]
        return columns[:1 + self.drafted] if self.causal else columns

    def window(self, shift: int, full: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """What a cached step must feed: (positions, rows of them to predict from, columns).

        Masked positions and those decoded last step are fed, so their keys in the cache are
        refreshed (decoded tokens are then frozen, as in dKV-Cache); a shifted model also needs
        the position before each masked one. `full` feeds the whole middle, as Fast-dLLM does. A
        causal model feeds only the positions its next tokens are predicted from: the token
        decoded last and the drafted ones (keys to their right are never read).
        """
        columns = self.columns_to_predict()
        if self.causal:
            fed = columns - shift
        elif full:
            fed = torch.arange(-shift, self.end - self.start, device=self.x.device)
        else:
            fed = torch.cat(((self.masked | self.fresh).any(dim=0).nonzero()[:, 0], columns - shift)).unique()
        rows = torch.searchsorted(fed, columns - shift)
        return fed + self.start, rows, columns

    def update(self, logits: Tensor, columns: Tensor | None = None) -> None:
        """One step: unmask positions from `logits` (rows, len(columns), vocab) of middle
        `columns` (all columns when None)."""
        if not bool(torch.isfinite(logits).all()):
            raise EngineError("the model produced NaN or infinite logits")
        self.unmask(logits, columns, self.step_count(self.steps))
        self.steps += 1
        if self.causal and self.options.lookup and self.options.temperature == 0 and len(self.x) == 1:
            self._draft()

    def _draft(self) -> None:
        """Write into the masks after the leftmost the tokens that followed the latest earlier
        occurrence of the last 3 (else 2, else 1) decoded or context tokens."""
        self.middle.masked_fill_(self.masked, self.mask)
        self.drafted = 0
        masked = self.masked[0].nonzero()[:, 0]
        room = min(self.options.lookup, len(masked) - 1)
        if room <= 0:
            return
        seen = self.x[0, :self.start + int(masked[0])]
        for n in range(min(LOOKUP_NGRAM, len(seen) - 1), 0, -1):
            hits = (seen[:-1].unfold(0, n, 1) == seen[-n:]).all(dim=1).nonzero()
            if len(hits):
                after = int(hits[-1]) + n
                draft = seen[after:after + room].clone()  # seen is a view of x, which it is written into
                self.middle[0, masked[:len(draft)]] = draft
                self.drafted = len(draft)
                return

    def load_window(self, shift: int, tokens: Tensor, masked: Tensor, confidence: Tensor, fresh: Tensor,
                    steps: int = 0) -> None:
        """Take over a state advanced elsewhere (a CUDA graph's): `tokens` for the window from the
        position that predicts the first masked one, the masks, confidences and the positions
        decoded last, `steps` more steps."""
        self.x[:, self.start - shift:self.end].copy_(tokens)
        self.masked.copy_(masked)
        self.confidence.copy_(confidence)
        self.fresh.copy_(fresh)
        self.steps += steps

    def step_count(self, step: int) -> int | None:
        """Tokens to unmask at `step` (None: as many as reach the threshold; for a causal model,
        as many drafted ones as the model agrees with)."""
        if self.causal:
            return None
        if self.options.policy == "steps":
            return self.schedule[min(step, len(self.schedule) - 1)]
        return self.options.tokens_per_step if self.options.policy == "fixed" else None

    def unmask(self, logits: Tensor, columns: Tensor | None, count: int | None) -> None:
        """The body of a step, in place and without host syncs, so a CUDA graph can hold it."""
        logits = self._constrain(logits, columns)
        drawn, confidence, score = self._draw(logits)
        masked, middle = self.masked, self.middle
        if self.causal:  # the runner always names a causal model's columns
            # The leftmost prediction is kept, and each one after it while the drafted token it
            # was predicted from is the one predicted there.
            agreed = drawn[:, :-1] == middle[:, columns[:-1]]
            run = torch.cat((agreed.new_ones(len(agreed), 1), agreed), dim=1).cumprod(dim=1).bool()
        if columns is not None:
            drawn = torch.zeros_like(middle).index_copy_(1, columns, drawn)
            confidence = torch.zeros_like(self.confidence).index_copy_(1, columns, confidence)
            score = torch.full_like(self.confidence, -torch.inf).index_copy_(1, columns, score)
        score = torch.where(masked, score, -torch.inf)
        if self.causal:
            keep = torch.zeros_like(masked).index_copy_(1, columns, run)
        elif count is None:
            keep = confidence >= self.options.threshold
            keep.scatter_(1, score.argmax(dim=1, keepdim=True), True)  # at least one per step
            if self.options.ordering == "left_to_right":  # only a run that continues what is decoded
                keep = (keep | ~masked).cumprod(dim=1).bool()
        else:
            # The best `count`, ties going to the leftmost (a stable sort; topk's order is undefined).
            best = score.sort(dim=1, descending=True, stable=True).indices[:, :count]
            keep = torch.zeros_like(masked).scatter_(1, best, True)
        keep &= masked
        middle.copy_(torch.where(keep, drawn, middle))
        self.confidence.copy_(torch.where(keep, confidence, self.confidence))
        masked &= ~keep
        # Everything after the first decoded EOS or pad is pad: the infill ends there (a single
        # line ends after its line break).
        ended = ~masked & torch.isin(middle, self.stop)
        after_end = (ended.cumsum(dim=1) > 0) & masked
        if self.line_breaks is not None:
            first, rest = self.line_breaks
            broken = torch.cat((first[middle[:, :1]], rest[middle[:, 1:]]), dim=1) & ~masked
            after_end |= broken.cumsum(dim=1) - broken.long() > 0
        middle.copy_(torch.where(after_end, self.pad, middle))
        masked &= ~after_end
        self.fresh.copy_(keep | after_end)  # in place: a CUDA graph's state is static

    def _constrain(self, logits: Tensor, columns: Tensor | None) -> Tensor:
        """No stop (nor, in a single line, a line break) among the first `min_tokens`; with token
        healing, a first token that starts with the text the prefix gave back (or, split, a first
        token that is the start of it and a second that starts with the rest)."""
        if columns is None:
            columns = torch.arange(logits.shape[1], device=logits.device)
        if self.options.min_tokens:
            # A healed first token gives back text of the prefix: the answer starts after it.
            early = (columns < self.options.min_tokens + (self.first_bias is not None))[None, :, None]
            logits = torch.where(early, logits.index_fill(-1, self.stop, -torch.inf), logits)
            if self.line_breaks is not None:
                first, rest = self.line_breaks
                logits = logits.masked_fill(early & torch.where((columns == 0)[:, None], first, rest), -torch.inf)
        if self.first_bias is not None:
            logits = torch.where((columns == 0)[None, :, None], logits + self.first_bias, logits)
        if self.split_healing is not None:
            ids, biases = self.split_healing
            split = self.middle[:, :1] == ids  # (rows, k): the first token took part of the text
            bias = torch.where(split.any(dim=1, keepdim=True), biases[split.int().argmax(dim=1)], 0.0)
            logits = torch.where((columns == 1)[None, :, None], logits + bias[:, None], logits)
        return logits

    def _draw(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Token choice, its probability, and the ordering score for every position."""
        opts = self.options
        logits = logits.float().clone()
        logits[..., self.banned] = -torch.inf  # a mask (or an id the tokenizer lacks) is never a prediction
        if opts.temperature > 0:
            probs = torch.softmax(logits / opts.temperature, dim=-1)
            if opts.top_p < 1:
                probs = top_p_filter(probs, opts.top_p)
            flat = probs.reshape(-1, probs.shape[-1])
            tokens = torch.multinomial(flat, 1, generator=self.generator).view(probs.shape[:-1])
        else:
            probs = torch.softmax(logits, dim=-1)
            tokens = probs.argmax(dim=-1)
        confidence = probs.gather(-1, tokens[..., None]).squeeze(-1)
        if opts.ordering == "margin":
            top2 = probs.topk(2, dim=-1).values
            score = top2[..., 0] - top2[..., 1]
        elif opts.ordering == "entropy":
            score = (probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
        elif opts.ordering == "left_to_right":
            score = -torch.arange(probs.shape[-2], device=probs.device, dtype=probs.dtype).expand(probs.shape[:-1])
        else:
            score = confidence
        return tokens, confidence, score

    def end_row(self, row: int) -> None:
        """End a row's infill where it stands: its masked positions become pad."""
        self.middle[row].masked_fill_(self.masked[row], self.pad)
        self.masked[row] = False

    def result_rows(self, partial: bool = False) -> list[tuple[list[int], list[float]]]:
        """Each row's decoded tokens up to the first EOS/pad (or first mask, if `partial`)."""
        rows = []
        for middle, masked, conf in zip(self.middle.tolist(), self.masked.tolist(), self.confidence.tolist()):
            end = len(middle)
            for i, token in enumerate(middle):
                if token in self.stop_ids or (partial and masked[i]):
                    end = i
                    break
            rows.append((middle[:end], conf[:end]))
        return rows


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Zero the tail outside the smallest set whose mass reaches top_p, and renormalise."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum(-1, keepdim=True)
