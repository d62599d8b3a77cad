"""The bundled model adapted to masked-diffusion infilling (`lacuna train adapt`), as Dream,
DiffuCoder and Open-dCoder were made from autoregressive models: the logits stay shifted (position
i-1 predicts token i, so the pretrained head is right from the first step) and training goes on
over rows with masked middles.

Two attentions, chosen by `attention`:
- "context_causal" (family `llama_spm`; NBDiff, Fast-dLLM v2): a row is `suffix SEP prefix
  middle`; the context attends causally, as the model was pretrained, so it also takes the
  autoregressive loss (NBDiff's auxiliary loss, free: every context token is scored), and only the
  middle, last, attends both ways.
- "bidirectional" (Dream): a row is `prefix middle suffix` and every token attends to every other.

Rows are laid out by the engine's own `build_layout`. Holes are cut where the language server
would ask and sized by its span rules (`objective._hole`, `plan_span`): the middle is the true
text followed by pad up to the masked length, so the model learns where an infill ends; the prefix
gives back its last token to the middle, as the engine's token healing does. Other rows fill a
random span of 1 to 64 tokens, or the end of a file with no suffix. A middle is masked either at a
uniform rate t ~ U(0, 1) or from a random point to its end (left-to-right decoding's state).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import random
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor

from lsp.document import Document
from lsp.span import plan_span

from ..config import ModelConfig
from ..loader import BUNDLED_DIR, CheckpointError, LoadedModel, load_checkpoint, save_config, save_weights
from ..model import Transformer
from ..packed import pack
from ..sampler import build_layout
from .corpus import TrainingError
from .objective import SERVER_OPTIONS, _hole
from .train import (
    LOSS_FIELDS,
    STATE_JSON,
    _rewrite_loss_log,
    batch_builders,
    cpu_has_bf16,
    hardware,
    load_train_state,
    read_texts,
    save_train_state,
)

log = logging.getLogger(__name__)

ATTENTIONS = ("context_causal", "bidirectional")
MAX_SHARD_BYTES = 16 * 2**20
ROW_KINDS = ("hole", "span", "end")


@dataclass
class Rows:
    tokens: Tensor  # (B, L) the clean rows, pad after each row's end
    length: Tensor  # (B,) real tokens in each row
    start: Tensor  # (B,) first middle position
    end: Tensor  # (B,) one past the middle
    masked: Tensor  # (B, L) middle positions masked (the diffusion loss scores them)
    context: Tensor  # (B, L) context positions the autoregressive loss scores (context-causal only)
    kinds: list[str]

    @property
    def tokens_seen(self) -> int:
        return int(self.length.sum())

    def to(self, device) -> Rows:
        return Rows(*(t.to(device) for t in (self.tokens, self.length, self.start, self.end, self.masked,
                                              self.context)), self.kinds)


class RowSampler:
    """Training rows for step `step`: a pure function of (seed, step), so a resumed run sees the
    batches an uninterrupted one would."""

    def __init__(self, texts: list[str], tokenizer: Tokenizer, loaded: LoadedModel, attention: str, seq_len: int,
                 seed: int = 0, shares: tuple[float, float, float] = (0.7, 0.2, 0.1)):
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, not {attention!r}")
        if seq_len < 2 * SERVER_OPTIONS.max_tokens:  # room for a block's middle and its context
            raise ValueError(f"seq_len must be at least {2 * SERVER_OPTIONS.max_tokens}, not {seq_len}")
        self.texts, self.tokenizer, self.special = texts, tokenizer, loaded.special
        self.separator = tokenizer.token_to_id("<file_sep>") if attention == "context_causal" else None
        self.attention, self.seq_len, self.seed, self.shares = attention, seq_len, seed, shares
        self.cumulative = np.cumsum([len(t) for t in texts])

    def batch(self, step: int, batch_size: int) -> Rows:
        rng = random.Random(f"{self.seed}:{step}")
        rows = [self.row(rng) for _ in range(batch_size)]
        pad = self.special.pad
        tokens = torch.full((batch_size, self.seq_len), pad, dtype=torch.long)
        flags = torch.zeros(2, batch_size, self.seq_len, dtype=torch.bool)
        for i, (ids, start, end, masked, _) in enumerate(rows):
            tokens[i, :len(ids)] = torch.tensor(ids)
            flags[0, i, start:end] = torch.tensor(masked)
            if self.separator is not None:  # every context token after the first, but the separator
                flags[1, i, 1:start] = tokens[i, 1:start] != self.separator
        return Rows(tokens, torch.tensor([len(r[0]) for r in rows]), torch.tensor([r[1] for r in rows]),
                    torch.tensor([r[2] for r in rows]), flags[0], flags[1], [r[4] for r in rows])

    def _doc(self, rng: random.Random) -> str:
        i = int(np.searchsorted(self.cumulative, rng.random() * self.cumulative[-1], side="right"))
        return self.texts[min(i, len(self.texts) - 1)]

    def row(self, rng: random.Random) -> tuple[list[int], int, int, list[bool], str]:
        kind = rng.choices(ROW_KINDS, weights=self.shares)[0]
        for _ in range(20):
            cut = self._cut(kind, rng)
            if cut is not None:
                break
        else:
            kind, cut = "end", self._cut("end", rng)
        prefix, middle, suffix, n = cut
        pre = self.tokenizer.encode(prefix, add_special_tokens=False).ids if prefix else []
        healed = self.tokenizer.decode(pre[-1:], skip_special_tokens=False) if pre else ""
        if healed and prefix.endswith(healed):  # the engine's token healing
            pre, middle = pre[:-1], healed + middle
        mid = self.tokenizer.encode(middle, add_special_tokens=False).ids if middle else []
        suf = self.tokenizer.encode(suffix, add_special_tokens=False).ids if suffix else []
        if len(mid) > n:  # the server's span would cut it: the first n tokens, an unfinished infill
            mid = mid[:n]
        layout = build_layout(pre, suf, n, mask=self.special.mask, bos=None, eos=self.special.eos,
                              eos_after_suffix=False, shifted=True, max_len=self.seq_len, separator=self.separator)
        ids = layout.tokens
        ids[layout.start:layout.end] = mid + [self.special.pad] * (n - len(mid))
        if rng.random() < 0.5:  # uniform
            t = rng.random()
            masked = [rng.random() < t for _ in range(n)]
        else:  # left to right, from a random point
            at = rng.randrange(n)
            masked = [i >= at for i in range(n)]
        if not any(masked):
            masked[rng.randrange(n)] = True
        return ids, layout.start, layout.end, masked, kind

    def _cut(self, kind: str, rng: random.Random) -> tuple[str, str, str, int] | None:
        """(prefix, middle, suffix, masked length) from a window of one document, or None."""
        text = self._doc(rng)
        at = text.rfind("\n", 0, rng.randrange(max(1, len(text)))) + 1
        window = text[at:at + self.seq_len * 3]
        if len(window) < 64:
            return None
        if kind == "end":
            e = rng.randrange(len(window) // 3, len(window) + 1)
            window, s = window[:e], rng.randrange(len(window[:e]) // 2, e)
            return window[:s], window[s:], "", rng.randint(8, 64)
        if kind == "span":
            s = rng.randrange(len(window) // 4, len(window) - 8)
            e = min(len(window), s + rng.randint(1, 200))
            return window[:s], window[s:e], window[e:], rng.randint(min(64, (e - s) // 3 + 1), 64)
        hole = _hole(window, rng)
        if hole is None:
            return None
        s, e = hole
        view = Document("file:///train.py", window[:s] + window[e:], "python")
        span = plan_span(view, s, SERVER_OPTIONS)
        return None if span is None else (window[:s], window[s:e], window[e:], span.tokens)


def attention_mask(rows: Rows, attention: str) -> dict:
    """The model's attention arguments: real keys only, and for context-causal rows a causal
    context with the middle attending both ways."""
    valid = torch.arange(rows.tokens.shape[1], device=rows.tokens.device) < rows.length[:, None]
    if attention == "context_causal":
        return {"attn_mask": valid[:, None, None, :], "causal": True, "block_start": rows.start}
    return {"attn_mask": valid[:, None, None, :], "causal": False}


def noisy(rows: Rows, mask_id: int) -> Tensor:
    return torch.where(rows.masked, mask_id, rows.tokens)


def adapt_loss(model: Transformer, rows: Rows, mask_id: int, attention: str, ar_weight: float) -> tuple[Tensor, dict]:
    """The mean cross-entropy of the masked middle tokens (shifted: position j-1 predicts token j),
    plus `ar_weight` times the context's autoregressive loss (context-causal only)."""
    tokens = noisy(rows, mask_id)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    hidden = model(tokens, positions, None, **attention_mask(rows, attention))
    r, c = rows.masked.nonzero(as_tuple=True)
    diffusion = F.cross_entropy(model.logits(hidden[r, c - 1]), rows.tokens[r, c])
    parts = {"masked_ce": float(diffusion.detach())}
    loss = diffusion
    if attention == "context_causal" and ar_weight > 0:
        r, c = rows.context.nonzero(as_tuple=True)
        ar = F.cross_entropy(model.logits(hidden[r, c - 1]), rows.tokens[r, c])
        parts["ar_ce"] = float(ar.detach())
        loss = loss + ar_weight * ar
    return loss, parts


@torch.no_grad()
def heldout_accuracy(model: Transformer, texts: list[str], tokenizer: Tokenizer, loaded: LoadedModel,
                     attention: str, seq_len: int, rows: int = 64) -> dict:
    """Accuracy of middle tokens on held-out rows: every masked one with the middle masked at
    15%, 50% and 100%, and `next`, the first masked one when the middle is masked from a point on
    (the token left-to-right decoding takes); overall and by row kind (hole, span, end)."""
    was = model.training
    model.eval()
    sampler = RowSampler(texts, tokenizer, loaded, attention, seq_len, seed=12345)
    batches = [sampler.batch(i, 8) for i in range(0, rows, 8)]
    report = {}
    for name in ("0.15", "0.5", "1", "next"):
        right, count = Counter(), Counter()
        for i, batch in enumerate(batches):
            gen = torch.Generator().manual_seed(i)  # ar_baseline draws the same `next` cuts
            columns = torch.arange(batch.tokens.shape[1])
            middle = (columns >= batch.start[:, None]) & (columns < batch.end[:, None])
            if name == "next":
                cut = batch.start + (torch.rand(len(batch.kinds), generator=gen) * (batch.end - batch.start)).long()
                masked, score = middle & (columns >= cut[:, None]), columns == cut[:, None]
            else:
                masked = middle & (torch.rand(middle.shape, generator=gen) < float(name))
                score = masked
            probe = Rows(batch.tokens, batch.length, batch.start, batch.end, masked, batch.context, batch.kinds)
            probe = probe.to(model.device)
            positions = torch.arange(probe.tokens.shape[1], device=model.device).expand_as(probe.tokens)
            hidden = model(noisy(probe, loaded.special.mask), positions, None, **attention_mask(probe, attention))
            r, c = score.nonzero(as_tuple=True)
            hits = (model.logits(hidden[r.to(model.device), c.to(model.device) - 1]).argmax(-1).cpu()
                    == batch.tokens[r, c])
            for row, hit in zip(r.tolist(), hits.tolist()):
                right[batch.kinds[row]] += hit
                count[batch.kinds[row]] += 1
        report[name] = {"accuracy": round(sum(right.values()) / max(sum(count.values()), 1), 4),
                        "tokens": sum(count.values()),
                        "by_kind": {k: round(right[k] / count[k], 4) for k in sorted(count)}}
    model.train(was)
    return report


def release(model: Transformer, loaded: LoadedModel, directory: Path, meta: dict) -> None:
    """The release in the bundled layout: matrices 4-bit (packed.py), norms fp16, shards of at
    most 16 MiB, the tokenizer, and training.json (where the run stood)."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in list(directory.glob("model*.safetensors")) + [directory / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        tensor = tensor.detach().float().cpu()
        if tensor.dim() == 2:
            state.update({name + suffix: part for suffix, part in pack(tensor).items()})
        else:
            state[name] = tensor.half()
    save_weights(state, directory, MAX_SHARD_BYTES)
    save_config(directory, model.config, loaded.special, loaded.tokenizer)
    (directory / "training.json").write_text(json.dumps(meta, indent=1))
    for path in directory.iterdir():
        path.chmod(0o644)


def start_from(init: Path, attention: str) -> LoadedModel:
    """The starting release as a float model of the adapted family."""
    try:
        loaded = load_checkpoint(init)
    except CheckpointError as err:
        raise TrainingError(f"cannot start from {init}: {err}") from None
    config = loaded.model.config
    if config.family.style != "llama" or config.family.logit_shift != 1:
        raise TrainingError(f"{init} is not the bundled model or an adaptation of it ({config.model_type})")
    adapted = ModelConfig(**{**config.__dict__, "model_type": "llama_spm"})
    model = Transformer(adapted)
    model.load_state_dict(loaded.model.state_dict())
    special = loaded.special
    special.separator = loaded.tokenizer.token_to_id("<file_sep>")
    return LoadedModel(model.float(), loaded.tokenizer, special, name="lacuna-adapted")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def adapt(corpus_dir: str | Path | Sequence[str | Path], out_dir: str | Path, *, init: str | Path | None = None,
          attention: str = "context_causal", minutes: float | None = None, steps: int | None = None,
          batch_size: int = 8, seq_len: int = 512, lr: float = 2e-4, warmup_steps: int = 20,
          ar_weight: float = 0.5, weight_decay: float = 0.0, grad_clip: float = 1.0, seed: int = 0,
          save_every_minutes: float = 5.0, heldout_rows: int = 64, state_dir: str | Path | None = None,
          threads: int | None = None, device: str | None = None,
          on_release: Callable[[Path], None] | None = None) -> dict:
    """Train the adaptation for `minutes` (this stretch) or up to `steps` in all, resuming from
    `out_dir/train-state`; write the release to `out_dir/model` at every save (every
    `save_every_minutes`, and on Ctrl-C or SIGTERM, which then end the run), the loss log to
    `out_dir/loss.csv` and the held-out accuracies to `out_dir/stats.json`. The learning rate
    warms up then stays constant, so that a run can go on across stretches of work. `threads`:
    torch's CPU threads (one leaves a core to other work: with two threads on two busy cores every
    parallel region waits for the descheduled one, and a step took 2-3x one thread's time).
    `on_release` gets the release directory each time it is written."""
    if minutes is None and steps is None:
        raise ValueError("give minutes or steps")
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir = Path(state_dir) if state_dir else out_dir / "train-state"
    texts, heldout, corpus_stats = read_texts(corpus_dir)
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = start_from(Path(init or BUNDLED_DIR), attention)
    model = loaded.model.to(device_).train()
    config, tokenizer = model.config, loaded.tokenizer
    def new_optimizer() -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                                 fused=device_.type == "cuda")

    optimizer = new_optimizer()
    step, elapsed, tokens_seen = 0, 0.0, 0
    if (state_dir / STATE_JSON).exists():
        try:
            meta = load_train_state(state_dir, model, optimizer, config)
            step, elapsed, tokens_seen = meta["step"], meta["elapsed_seconds"], meta["tokens_seen"]
            log.info("resuming from step %d (%s)", step, state_dir)
        except TrainingError as err:  # the last good release, with a fresh optimizer
            log.error("%s", err)
            restart = out_dir / "model"
            if not (restart / "training.json").exists():
                raise
            model.load_state_dict(start_from(restart, attention).model.state_dict())
            meta = json.loads((restart / "training.json").read_text())
            step, elapsed, tokens_seen = meta["step"], meta["elapsed_seconds"], meta["tokens_seen"]
            optimizer = new_optimizer()
            log.info("restarting from the release at step %d (%s)", step, restart)
    fields = LOSS_FIELDS + ["ar_ce"]
    _rewrite_loss_log(out_dir / "loss.csv", step, fields)
    sampler = RowSampler(texts, tokenizer, loaded, attention, seq_len, seed)
    bf16 = device_.type == "cuda" or cpu_has_bf16()
    workers, build, ahead = batch_builders(sampler, device_)
    pending = deque(workers.submit(build, s, batch_size) for s in range(step, step + ahead))

    def meta_now() -> dict:
        return {"step": step, "elapsed_seconds": elapsed, "tokens_seen": tokens_seen, "config": config.to_hf(),
                "attention": attention, "seed": seed, "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
                "ar_weight": ar_weight, "saved_at": time.time()}

    def save() -> None:
        save_train_state(state_dir, model, optimizer, meta_now())
        release(model, loaded, out_dir / "model", meta_now())
        if on_release is not None:
            on_release(out_dir / "model")

    log.info("adapting %s parameters (%s attention) on %s: %d documents", f"{config.parameters:,}", attention,
             hardware(device_), corpus_stats["documents"])
    # A run in the background ignores Ctrl-C (SIGINT): SIGTERM (`kill PID`) stops it as Ctrl-C
    # does, saving its state first.
    on_term = None
    if threading.current_thread() is threading.main_thread():
        on_term = signal.signal(signal.SIGTERM, _interrupt)
    stretch_start, last_save = time.perf_counter(), time.perf_counter()
    with open(out_dir / "loss.csv", "a", newline="") as log_file:
        writer = csv.DictWriter(log_file, fields, extrasaction="ignore")
        try:
            while (steps is None or step < steps) and (
                    minutes is None or time.perf_counter() - stretch_start < minutes * 60):
                started = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = lr * min(1.0, (step + 1) / warmup_steps)
                rows = pending.popleft().result().to(device_)
                pending.append(workers.submit(build, step + len(pending) + 1, batch_size))
                with torch.autocast(device_.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                    loss, parts = adapt_loss(model, rows, loaded.special.mask, attention, ar_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise TrainingError(f"the loss became {loss_value} at step {step + 1}; the state in {state_dir} "
                                        "is intact (lower lr to go on)")
                optimizer.step()
                step += 1
                tokens_seen += rows.tokens_seen
                elapsed += time.perf_counter() - started
                writer.writerow({"step": step, "tokens": tokens_seen, "loss": round(loss_value, 5),
                                 "lr": f"{optimizer.param_groups[0]['lr']:.3g}", "grad_norm": round(grad_norm, 3),
                                 "seconds": round(elapsed, 1), **{k: round(v, 5) for k, v in parts.items()}})
                log_file.flush()
                if step % 10 == 0 or step == 1:
                    log.info("step %d loss %.4f %s %.0f tok/s", step, loss_value,
                             " ".join(f"{k} {v:.3f}" for k, v in parts.items()), tokens_seen / max(elapsed, 1e-9))
                if time.perf_counter() - last_save >= save_every_minutes * 60:
                    save()
                    last_save = time.perf_counter()
        except KeyboardInterrupt:
            save()
            raise
        finally:
            for future in pending:
                future.cancel()
            workers.shutdown(wait=True)
            if on_term is not None:
                signal.signal(signal.SIGTERM, on_term)
    save()
    stats = {**meta_now(), "parameters": config.parameters,
             "tokens_per_second": round(tokens_seen / max(elapsed, 1e-9)), "hardware": hardware(device_),
             "precision": "bf16 autocast" if bf16 else "fp32", "corpus": corpus_stats,
             "heldout": heldout_accuracy(model, heldout, tokenizer, loaded, attention, seq_len, heldout_rows)}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def ar_baseline(corpus_dir: str | Path, init: str | Path = BUNDLED_DIR, seq_len: int = 512, rows: int = 64) -> dict:
    """The autoregressive model's accuracy on the tokens that `heldout_accuracy` scores as `next`,
    each from the prefix and the middle before it (it reads no suffix)."""
    _, heldout, _ = read_texts(corpus_dir)
    loaded = start_from(Path(init), "context_causal")
    model = loaded.model.eval()
    sampler = RowSampler(heldout, loaded.tokenizer, loaded, "context_causal", seq_len, seed=12345)
    right = count = 0
    with torch.no_grad():
        for i in range(0, rows, 8):
            batch = sampler.batch(i, 8)
            # The held-out `next` cut of each row (the same generator draw as heldout_accuracy's).
            cut = batch.start + (torch.rand(8, generator=torch.Generator().manual_seed(i // 8))
                                 * (batch.end - batch.start)).long()
            for b in range(8):
                start, at = int(batch.start[b]), int(cut[b])
                sep = int((batch.tokens[b, :start] == loaded.special.separator).nonzero()[-1, 0])
                ids = batch.tokens[b, sep + 1:at][None]  # the prefix and the middle before the cut
                if not ids.shape[1]:
                    continue
                hidden = model(ids, torch.arange(ids.shape[1])[None], None, causal=True)
                right += int(model.logits(hidden[0, -1]).argmax() == batch.tokens[b, at])
                count += 1
    return {"next": {"accuracy": round(right / max(count, 1), 4), "tokens": count}}
