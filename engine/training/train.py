"""Training the bundled infill model (`lacuna train model`; its data comes from corpus.py).

`train_model`: the masked-diffusion objective of LLaDA/MDLM plus an infilling curriculum laid out
exactly as the engine asks (`[BOS] prefix MASK*N suffix [EOS]`, the middle followed by a tail of
pad tokens), resumable from `train-state/`, released in the checkpoint layout the loader reads.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import logging
import math
import os
import platform
import random
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor

from .config import Family, ModelConfig
from .corpus import TrainingError, read_corpus, special_ids
from .loader import LoadedModel, SpecialIds, save_checkpoint
from .model import Transformer, rotate_half
from lsp.config import Options
from lsp.document import Document
from lsp.span import plan_span

log = logging.getLogger(__name__)

# -- model configurations ------------------------------------------------------------------

# The bundled model: ~29.9M parameters, 59.8 MB in fp16 with tied embeddings (under 64 MB with
# its tokenizer). Qwen2 style (shifted logits, QKV bias), as Dream and DiffuCoder; 1024 positions
# cover the server's default context (512 prefix tokens, the suffix, a 64-token block).
BUNDLED_CONFIG = ModelConfig(
    "qwen2", vocab_size=12288, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
    num_kv_heads=4, head_dim=64, max_position_embeddings=1024, rope_theta=10000.0, qkv_bias=True,
    tie_embeddings=True,
)
# The default trained on 2 CPU cores while no GPU is available: ~6.3M parameters (3.1M of them
# the embedding). Sized by throughput there: about 2,000 tokens/s to train, so a 100-minute run
# sees some 10M tokens, about the compute-optimal size's worth; 512 positions (the engine trims
# the context to fit).
CPU_CONFIG = ModelConfig(
    "qwen2", vocab_size=12288, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
    num_kv_heads=2, head_dim=64, max_position_embeddings=512, rope_theta=10000.0, qkv_bias=True,
    tie_embeddings=True,
)
# For tests: trains at a few milliseconds a step on a CPU.
TINY_CONFIG = ModelConfig(
    "qwen2", vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, max_position_embeddings=256, qkv_bias=True, tie_embeddings=True,
)
CONFIGS = {"bundled": BUNDLED_CONFIG, "cpu": CPU_CONFIG, "tiny": TINY_CONFIG}

# ==========================================================================================
# 3. The model
# ==========================================================================================

@dataclass
class Batch:
    clean: Tensor  # (B, L) long: the uncorrupted sequences (pad after a row's end)
    maskable: Tensor  # (B, L) bool: positions the noise may mask and the loss scores
    attn: Tensor | None  # (B, L) bool: real tokens; None when every row fills L
    max_rate: Tensor  # (B,) float: the highest masking rate the noise draws for each row
    kinds: list[str]

    @property
    def tokens(self) -> int:
        return int(self.attn.sum()) if self.attn is not None else self.clean.numel()

    def to(self, device) -> "Batch":
        return Batch(self.clean.to(device), self.maskable.to(device),
                     None if self.attn is None else self.attn.to(device), self.max_rate.to(device), self.kinds)


def collate(rows: list[tuple[list[int], list[bool], str]], seq_len: int, pad: int, max_rate: Tensor) -> Batch:
    clean = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    maskable = torch.zeros(len(rows), seq_len, dtype=torch.bool)
    attn = torch.zeros(len(rows), seq_len, dtype=torch.bool)
    for i, (tokens, can_mask, _) in enumerate(rows):
        if len(tokens) > seq_len:
            raise ValueError(f"an example of {len(tokens)} tokens exceeds seq_len {seq_len}")
        clean[i, :len(tokens)] = torch.tensor(tokens)
        maskable[i, :len(tokens)] = torch.tensor(can_mask)
        attn[i, :len(tokens)] = True
    return Batch(clean, maskable, None if bool(attn.all()) else attn, max_rate, [kind for _, _, kind in rows])


def add_noise(batch: Batch, generator: torch.Generator, mask_id: int, eps: float = 1e-3,
              t: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The forward process: each maskable token of row i is masked with probability
    eps + (max_rate_i - eps) t_i, t drawn stratified over the batch ((u + i/B) mod 1, as MDLM's
    low-discrepancy sampler) unless given. Returns (noisy tokens, masked)."""
    b, length = batch.clean.shape
    if t is None:
        u = torch.rand(1, generator=generator)
        t = (u + torch.arange(b) / b) % 1.0
    p = eps + (batch.max_rate.float() - eps) * t.float()
    masked = batch.maskable & (torch.rand(b, length, generator=generator) < p[:, None])
    return torch.where(masked, mask_id, batch.clean), masked


def train_hidden(model: Transformer, tokens: Tensor, attn: Tensor | None = None) -> Tensor:
    """The model's bidirectional forward without a KV cache, for training: the same modules and
    math as Transformer.forward (tests check they agree), with keys and values of all positions
    computed at once (K/V heads repeated for GQA) and padded keys masked by `attn` (B, L)."""
    b, length = tokens.shape
    x = model.model.embed_tokens(tokens)
    freqs = torch.arange(length, device=tokens.device)[:, None].float() * model.inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    mask = attn[:, None, None, :] if attn is not None else None
    for layer in model.model.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(b, length, a.heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(b, length, a.kv_heads, a.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(b, length, a.kv_heads, a.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if a.heads != a.kv_heads:
            k = k.repeat_interleave(a.heads // a.kv_heads, dim=1)
            v = v.repeat_interleave(a.heads // a.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v.to(q.dtype), attn_mask=mask)
        x = x + a.o_proj(out.transpose(1, 2).reshape(b, length, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.model.norm(x)


def diffusion_loss(model: Transformer, noisy: Tensor, batch: Batch, masked: Tensor,
                   forward: Callable[[Tensor, Tensor | None], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The mean cross-entropy of the masked tokens, respecting the family's logit shift (with
    shift 1, qwen2, position j-1 predicts token j). Returns (loss, per-token CE).

    Not LLaDA's 1/t-weighted bound: with its weights, a few tokens masked at a low rate outweigh
    a row of them, the clipped gradient is mostly that noise, and our CPU runs stayed at the
    unigram level; a plain mean over the masked tokens learned (model card, "Training")."""
    shift = model.config.family.logit_shift
    hidden = (forward or partial(train_hidden, model))(noisy, batch.attn)
    rows, cols = masked.nonzero(as_tuple=True)
    if shift and bool((cols < shift).any()):
        raise ValueError("a masked token at position 0 has no position before it to predict it from")
    logits = model.logits(hidden[rows, cols - shift])
    ce = F.cross_entropy(logits, batch.clean[rows, cols], reduction="none")
    loss = ce.mean() if ce.numel() else hidden.sum() * 0.0  # nothing masked: a zero step
    return loss, ce.detach()


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


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
    Each hole's tokens are masked at a rate t ~ U(0, 1) (the engine starts from all masked and
    unmasks step by step). The other rows are uniform masked diffusion over plain text, at rates
    up to `plain_max_rate` (completion never sees a mostly masked file).
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
            rows.append(self._assemble_holes(plan, ids) if plan["kind"] == "holes" else self._assemble_plain(plan, ids))
        max_rate = torch.tensor([1.0 if kind == "holes" else self.plain_max_rate for _, _, kind in rows])
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

    def _assemble_plain(self, plan: dict, ids: list[list[int]]) -> tuple[list[int], list[bool], str]:
        lead = self.special.bos if self.special.bos is not None else self.special.eos
        tokens = [lead]
        for piece, ends in zip(ids, plan["ends"]):
            tokens += piece
            if ends:
                tokens.append(self.special.eos)
            if len(tokens) >= self.seq_len:
                break
        tokens = tokens[:self.seq_len]
        return tokens, [False] + [True] * (len(tokens) - 1), "plain"

    # rows with holes

    def _plan_holes(self, rng: random.Random) -> dict:
        """A window of one document (about 4 characters a token) and its holes: `texts` alternates
        the text kept and each hole's middle; `masks` is each hole's masked length."""
        text = self.texts[self._doc(rng)]
        start = _line_start(text, rng.randrange(len(text)))
        window = text[start:start + self.seq_len * 4]
        holes: list[tuple[int, int, int]] = []
        for _ in range(self.max_holes * 3):
            if len(holes) == self.max_holes:
                break
            hole = _hole(window, rng)
            if hole is None or any(s < hole[1] and hole[0] < e or hole[0] == s for s, e, _ in holes):
                continue
            s, e = hole
            span = plan_span(Document("file:///train.py", window[:s] + window[e:], "python"), s, SERVER_OPTIONS)
            if span is not None:
                holes.append((s, e, span.tokens))
        holes.sort()
        texts, at = [], 0
        for s, e, _ in holes:
            texts += [window[at:s], window[s:e]]
            at = e
        texts.append(window[at:])
        return {"kind": "holes", "texts": texts, "masks": [n for _, _, n in holes]}

    def _assemble_holes(self, plan: dict, ids: list[list[int]]) -> tuple[list[int], list[bool], str]:
        """`[BOS] text MASK*n text MASK*n ... [EOS]`: with one hole, the engine's layout exactly.
        A hole whose middle does not fit its masked length (the server would cut it) becomes text;
        the window is cut to seq_len, never inside a hole."""
        tail = [self.special.eos] if self.family.eos_after_suffix else []
        room = self.seq_len - len(tail)
        tokens, maskable = [self.special.bos], [False]
        for i, piece in enumerate(ids):
            n = plan["masks"][i // 2] if i % 2 else 0
            if i % 2 and len(piece) <= n:
                if len(tokens) + n > room:
                    break
                tokens += piece + [self.special.pad] * (n - len(piece))
                maskable += [True] * n
                continue
            piece = piece[:room - len(tokens)]
            tokens += piece
            maskable += [False] * len(piece)
        return tokens + tail, maskable + [False] * len(tail), "holes"


def _line_start(text: str, offset: int) -> int:
    return text.rfind("\n", 0, offset) + 1


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
    cuts = [p for p in range(code + 1, line_end) if not (_is_word(text[p - 1]) and _is_word(text[p]))]
    if not cuts:
        return None
    s = rng.choice(cuts)
    run = len(text[s:line_end]) - len(text[s:line_end].rstrip(CLOSERS + ":,"))
    if 0 < run < line_end - s and rng.random() < 0.3:  # closing brackets typed already (auto-closed)
        return s, line_end - run
    return s, line_end


def _block_hole(text: str, line_start: int, line_end: int, rng: random.Random) -> tuple[int, int] | None:
    """The indented body after a line ending in ':' or '{', whole or its first lines."""
    if not text[line_start:line_end].rstrip().endswith((":", "{")):
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

# -- the training loop ------------------------------------------------------------------------

def init_weights(model: Transformer, seed: int) -> None:
    """GPT-2 style: normal(0, 0.02) weights, residual output projections scaled by 1/sqrt(2 layers),
    zero biases, unit norms."""
    generator = torch.Generator().manual_seed(seed)
    depth_scale = 1 / math.sqrt(2 * model.config.num_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif param.dim() < 2:
                param.zero_()
            else:
                std = 0.02 * (depth_scale if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0)
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


HELDOUT_EVERY = 100  # every 100th document stays out of training, for masked_accuracy


@torch.no_grad()
def masked_accuracy(model: Transformer, texts: list[str], tokenizer: Tokenizer, special: SpecialIds, seq_len: int,
                    rates: tuple[float, ...] = (0.15, 0.5), rows: int = 64) -> dict:
    """Masked-token accuracy and cross-entropy of plain text masked at each rate: the check that a
    model reads its context (a unigram model stays near 5% whatever the rate)."""
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    sampler = ExampleSampler(texts, tokenizer, special, model.config.family, seq_len, holes_share=0.0,
                             plain_max_rate=1.0)
    report = {}
    for rate in rates:
        right, ce_sum, count = 0, 0.0, 0
        for chunk in range(0, rows, 8):
            batch = sampler.batch(chunk, 8)
            noisy, masked = add_noise(batch, torch.Generator().manual_seed(chunk), special.mask, eps=rate,
                                      t=torch.zeros(8))
            batch = batch.to(device)
            hidden = train_hidden(model, noisy.to(device), batch.attn)
            r, c = masked.to(device).nonzero(as_tuple=True)
            logits = model.logits(hidden[r, c - model.config.family.logit_shift])
            target = batch.clean[r, c]
            right += int((logits.argmax(-1) == target).sum())
            ce_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            count += len(target)
        report[f"{rate:g}"] = {"accuracy": round(right / max(count, 1), 4), "cross_entropy": round(ce_sum / max(count, 1), 4),
                               "tokens": count}
    model.train(was_training)
    return report


def lr_at(progress: float, peak: float, warmup: float, min_ratio: float) -> float:
    """Linear warmup over the first `warmup` fraction, then cosine down to `min_ratio` * peak."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return peak * max(progress / warmup, 0.01)
    decay = (progress - warmup) / max(1.0 - warmup, 1e-9)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * decay)))


STATE_DIR = "train-state"
STATE_JSON = "state.json"
LOSS_FIELDS = ["step", "tokens", "loss", "masked_ce", "lr", "grad_norm", "seconds"]


def save_train_state(state_dir: Path, model: Transformer, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Tensors (parameters, AdamW moments, RNG) in one safetensors file named by step, everything
    else in state.json, written last and atomically: a crash leaves the previous pair intact."""
    state_dir.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model/{n}": p.detach().float().cpu().contiguous() for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, Tensor):
                    tensors[f"optim/{names[id(param)]}/{key}"] = value.detach().cpu().contiguous()
    tensors["rng/torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/torch_cuda"] = torch.cuda.get_rng_state()
    step = meta["step"]
    file = f"step-{step:08d}.safetensors"
    save_file(tensors, state_dir / f"{file}.tmp", metadata={"step": str(step)})
    os.replace(state_dir / f"{file}.tmp", state_dir / file)
    tmp = state_dir / f"{STATE_JSON}.tmp"
    tmp.write_text(json.dumps({"format": 1, **meta, "tensors": file}, indent=1))
    os.replace(tmp, state_dir / STATE_JSON)
    for old in state_dir.glob("step-*.safetensors"):
        if old.name != file:
            old.unlink()


def load_train_state(state_dir: Path, model: Transformer, optimizer: torch.optim.Optimizer,
                     config: ModelConfig) -> dict:
    """Restore what save_train_state wrote; TrainingError naming the file for anything wrong."""
    path = state_dir / STATE_JSON
    hint = f"delete {state_dir} to start over, or pass resume=False"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) \
                or not isinstance(meta.get("tensors"), str):
            raise ValueError("no step or tensors entry")
    except (OSError, ValueError) as err:
        raise TrainingError(f"train state {path} is corrupt ({err}); {hint}") from None
    if meta.get("config") != config.to_hf():
        raise TrainingError(f"train state {path} was saved for another model configuration; {hint}")
    file = state_dir / Path(meta["tensors"]).name
    try:
        tensors = load_file(file)
        if tensors.get("rng/torch_cpu") is None:
            raise ValueError("no RNG state")
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        raise TrainingError(f"train state tensors {file} are missing or corrupt ({err}); {hint}") from None
    named = dict(model.named_parameters())
    opt_state, index = {}, 0
    with torch.no_grad():
        for name, param in named.items():
            saved = tensors.get(f"model/{name}")
            if saved is None or saved.shape != param.shape:
                raise TrainingError(f"train state tensors {file} lack or misshape model/{name}; {hint}")
            param.copy_(saved)
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = next(n for n, p in named.items() if p is param)
            prefix = f"optim/{name}/"
            entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if entry:
                opt_state[index] = entry
            index += 1
    if meta["step"] > 0 and not opt_state:
        raise TrainingError(f"train state tensors {file} lack the optimizer state; {hint}")
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": optimizer.state_dict()["param_groups"]})
    except (ValueError, KeyError, RuntimeError) as err:
        raise TrainingError(f"train state tensors {file} hold a bad optimizer state ({err}); {hint}") from None
    torch.set_rng_state(tensors["rng/torch_cpu"])
    if "rng/torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/torch_cuda"])
    return meta


def _rewrite_loss_log(path: Path, up_to_step: int) -> None:
    """Keep the rows of steps the resumed state covers (later ones are trained again)."""
    rows = []
    if path.exists():
        with contextlib.suppress(OSError, ValueError, csv.Error):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= up_to_step]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, LOSS_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def release(model: Transformer, tokenizer: Tokenizer, special: SpecialIds, directory: Path,
            dtype: torch.dtype = torch.float16) -> torch.dtype:
    """Write the release checkpoint (16 MiB shards) in `dtype`, falling back to bf16 if fp16
    overflows; the loader casts to whatever dtype it serves in. Returns the dtype written."""
    weights = copy.deepcopy(model).cpu().to(dtype)
    if dtype == torch.float16 and not all(bool(torch.isfinite(p).all()) for p in weights.parameters()):
        log.warning("weights overflow fp16: releasing bf16")
        dtype, weights = torch.bfloat16, copy.deepcopy(model).cpu().to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in list(directory.glob("model*.safetensors")) + [directory / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    save_checkpoint(LoadedModel(weights.eval(), tokenizer, special, name=directory.name), directory,
                    max_shard_bytes=16 * 2**20)
    return dtype


def train_model(corpus_dir: str | Path, tokenizer_path: str | Path, out_dir: str | Path, *,
                config: ModelConfig = BUNDLED_CONFIG, steps: int | None = None, minutes: float | None = None,
                batch_size: int = 32, seq_len: int = 1024, lr: float = 1e-3, device: str | None = None,
                resume: bool = True, seed: int = 0, warmup: float = 0.03, min_lr_ratio: float = 0.1,
                weight_decay: float = 0.1, grad_clip: float = 1.0, holes_share: float = 0.7, eps: float = 1e-3,
                save_every_steps: int | None = 1000, save_every_minutes: float | None = 10.0,
                compile_model: bool = False, prefetch: int | None = None,
                release_dtype: torch.dtype = torch.float16, log_every: int = 10,
                on_step: Callable[[dict], None] | None = None) -> dict:
    """Train a masked-diffusion infill model; write `out_dir/model/` (the release checkpoint with
    the tokenizer), `out_dir/loss.csv`, `out_dir/stats.json`, and `out_dir/train-state/`.

    Runs until `steps` optimizer steps or `minutes` of training (counted over resumed runs too),
    whichever comes first; the LR schedule (warmup then cosine) follows steps when given, else the
    elapsed fraction of `minutes`. Steps are deterministic in (seed, step) on a given device, so
    an interrupted run resumed from train-state/ continues as if uninterrupted. State is saved
    every `save_every_steps` steps or `save_every_minutes`, on Ctrl-C, and at the end. bf16
    autocast on CUDA, fp32 elsewhere; `compile_model` runs the forward through torch.compile;
    `prefetch` batches (default 4 on CUDA, 2 elsewhere) are built ahead in threads. `on_step`
    gets each row of loss.csv as it is written (it may raise to stop the run).
    """
    if steps is None and minutes is None:
        raise ValueError("give steps or minutes")
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds the model's {config.max_position_embeddings} positions")
    tokenizer_path, out_dir = Path(tokenizer_path), Path(out_dir)
    if tokenizer_path.is_dir():
        tokenizer_path = tokenizer_path / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as err:  # tokenizers raises plain Exception
        raise TrainingError(f"cannot read the tokenizer {tokenizer_path}: {err}") from None
    special = special_ids(tokenizer, str(tokenizer_path))
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > config.vocab_size:
        raise TrainingError(f"the tokenizer {tokenizer_path} has {vocab} tokens but the model's vocab_size is "
                            f"{config.vocab_size}: train the tokenizer with vocab_size<={config.vocab_size} or "
                            f"use a config with vocab_size>={vocab}")
    texts, corpus_stats = read_corpus(corpus_dir)
    heldout = texts[::HELDOUT_EVERY]  # a corpus too small to spare them is measured on its own text
    if len(texts) > HELDOUT_EVERY:
        texts = [t for i, t in enumerate(texts) if i % HELDOUT_EVERY]
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir, loss_path = out_dir / STATE_DIR, out_dir / "loss.csv"

    model = Transformer(config)
    init_weights(model, seed)
    model.to(device_).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device_.type == "cuda")

    step, elapsed, tokens_seen, resumed_from = 0, 0.0, 0, None
    if not resume:  # a fresh run: an old state must not be resumed by a later call
        (state_dir / STATE_JSON).unlink(missing_ok=True)
        for old in state_dir.glob("step-*.safetensors"):
            old.unlink()
    if resume and (state_dir / STATE_JSON).exists():
        meta = load_train_state(state_dir, model, optimizer, config)
        step, elapsed = meta["step"], float(meta.get("elapsed_seconds", 0.0))
        tokens_seen = int(meta.get("tokens_seen", 0))
        resumed_from = step
        log.info("resuming from step %d (%s)", step, state_dir)
    _rewrite_loss_log(loss_path, step if resumed_from is not None else -1)

    sampler = ExampleSampler(texts, tokenizer, special, config.family, seq_len, holes_share, seed)
    forward = partial(train_hidden, model)
    if compile_model:
        compiled = torch.compile(train_hidden)
        forward = partial(compiled, model)

    def autocast():
        if device_.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def meta_now() -> dict:
        return {"step": step, "elapsed_seconds": elapsed, "tokens_seen": tokens_seen, "config": config.to_hf(),
                "seed": seed, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "steps": steps,
                "minutes": minutes, "tokenizer": str(tokenizer_path), "saved_at": time.time()}

    def finished() -> bool:
        return (steps is not None and step >= steps) or (minutes is not None and elapsed >= minutes * 60)

    parameters = sum(p.numel() for p in model.parameters())
    log.info("training %s parameters on %s: %d documents, %d chars", f"{parameters:,}", hardware(device_),
             corpus_stats["documents"], corpus_stats["chars"])
    losses: list[float] = []
    wall_start = time.perf_counter()
    last_save_step, last_save_time = step, time.perf_counter()
    log_file = open(loss_path, "a", newline="")
    writer = csv.DictWriter(log_file, LOSS_FIELDS)
    # Batches are built ahead in threads (the tokenizer releases the GIL while it encodes).
    ahead = max(1, prefetch if prefetch is not None else 4 if device_.type == "cuda" else 2)
    workers = ThreadPoolExecutor(ahead)
    updating = False
    pending = deque(workers.submit(sampler.batch, s, batch_size) for s in range(step, step + ahead))
    try:
        while not finished():
            started = time.perf_counter()
            progress = step / steps if steps is not None else elapsed / (minutes * 60)
            current_lr = lr_at(progress, lr, warmup, min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = current_lr
            batch = pending.popleft().result()
            pending.append(workers.submit(sampler.batch, step + len(pending) + 1, batch_size))
            noise = torch.Generator().manual_seed(_seed(seed, step, "noise"))
            noisy, masked = add_noise(batch, noise, special.mask, eps)
            batch_dev = batch.to(device_)
            with autocast():
                loss, ce = diffusion_loss(model, noisy.to(device_), batch_dev, masked.to(device_),
                                          forward)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            loss_value = loss.detach().item()
            if not math.isfinite(loss_value):
                raise TrainingError(f"the loss became {loss_value} at step {step + 1}; the state saved at step "
                                    f"{last_save_step} in {state_dir} is intact (lower lr to go on)")
            updating = True  # parameters and step count disagree until the step is counted
            optimizer.step()
            step += 1
            tokens_seen += batch.tokens
            updating = False
            losses.append(loss_value)
            row = {"step": step, "tokens": tokens_seen, "loss": round(loss_value, 5),
                   "masked_ce": round(float(ce.mean()), 5) if ce.numel() else "", "lr": f"{current_lr:.6g}",
                   "grad_norm": round(float(grad_norm), 4), "seconds": 0.0}
            now = time.perf_counter()
            due = (save_every_steps and step - last_save_step >= save_every_steps) or (
                save_every_minutes and now - last_save_time >= save_every_minutes * 60)
            elapsed += now - started
            if due:
                save_train_state(state_dir, model, optimizer, meta_now())
                last_save_step, last_save_time = step, time.perf_counter()
                elapsed += last_save_time - now
            row["seconds"] = round(elapsed, 2)
            writer.writerow(row)
            log_file.flush()
            if log_every and (step % log_every == 0 or step == 1):
                log.info("step %d loss %.4f lr %.3g %.0f tok/s", step, loss_value, current_lr,
                         tokens_seen / max(elapsed, 1e-9))
            if on_step is not None:
                on_step(row)
    except KeyboardInterrupt:
        if updating:  # within an optimizer step: half-updated moments are not worth keeping
            log.info("interrupted during an update: the state saved at step %d is kept", last_save_step)
        else:
            save_train_state(state_dir, model, optimizer, meta_now())
            log.info("interrupted: state saved at step %d in %s", step, state_dir)
        raise
    finally:
        log_file.close()
        for future in pending:
            future.cancel()
        workers.shutdown(wait=True)
    if step != last_save_step or not (state_dir / STATE_JSON).exists():
        save_train_state(state_dir, model, optimizer, meta_now())
    model.eval()
    written = release(model, tokenizer, special, out_dir / "model", release_dtype)
    tail = losses[-50:]
    stats = {
        "parameters": parameters, "steps": step, "tokens_seen": tokens_seen,
        "wall_seconds": round(time.perf_counter() - wall_start, 1), "train_seconds": round(elapsed, 1),
        "tokens_per_second": round(tokens_seen / max(elapsed, 1e-9), 1),
        "first_loss": losses[0] if losses else None, "final_loss": sum(tail) / len(tail) if tail else None,
        "last_loss": losses[-1] if losses else None, "resumed_from": resumed_from,
        "hardware": hardware(device_), "device": str(device_),
        "precision": "bf16 autocast" if device_.type == "cuda" else "fp32", "release_dtype": str(written),
        "model_dir": str(out_dir / "model"), "corpus": corpus_stats, "config": config.to_hf(),
        "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
        "heldout_masked": masked_accuracy(model, heldout, tokenizer, special, seq_len),
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats
