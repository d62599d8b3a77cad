"""Training the bundled infill model (`lacuna train model`; its data comes from corpus.py, its
objective from objective.py): the loop, resumable from `train-state/`, and the release in the
checkpoint layout the loader reads.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import logging
import math
import multiprocessing
import os
import platform
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor

from ..config import PRESETS, ModelConfig
from ..loader import CheckpointError, LoadedModel, SpecialIds, load_checkpoint, save_checkpoint
from ..model import Transformer
from .corpus import TrainingError, read_corpus
from .objective import ExampleSampler, add_noise, diffusion_loss, hidden_states
from .tokenizer import special_ids

log = logging.getLogger(__name__)


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
    """Masked-token accuracy and cross-entropy of plain text masked at each rate (the check that a
    model reads its context: a unigram model stays near 5% whatever the rate), and in holes as the
    server asks for them, partly decoded: `next` is the token left-to-right decoding takes next
    (a hole's first masked one), `holes` every scored token."""
    was_training = model.training
    model.eval()
    device, shift = model.device, model.config.family.logit_shift

    def measure(batches, noise) -> dict:
        right, ce_sum, count = 0, 0.0, 0
        for chunk, batch in enumerate(batches):
            noisy, masked = noise(chunk, batch)
            batch = batch.to(device)
            hidden = hidden_states(model, noisy.to(device), batch.attn)
            r, c = masked.to(device).nonzero(as_tuple=True)
            logits = model.logits(hidden[r, c - shift])
            target = batch.clean[r, c]
            right += int((logits.argmax(-1) == target).sum())
            ce_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            count += len(target)
        return {"accuracy": round(right / max(count, 1), 4), "cross_entropy": round(ce_sum / max(count, 1), 4),
                "tokens": count}

    def rows_of(holes_share: float) -> list:
        sampler = ExampleSampler(texts, tokenizer, special, model.config.family, seq_len, holes_share=holes_share,
                                 plain_max_rate=1.0)
        return [sampler.batch(chunk, 8) for chunk in range(0, rows, 8)]

    plain = rows_of(0.0)  # the same text at every rate
    report = {f"{rate:g}": measure(plain, lambda chunk, batch, rate=rate: add_noise(
        batch, torch.Generator().manual_seed(8 * chunk), special.mask, eps=rate, t=torch.zeros(8)))
        for rate in rates}
    holes = rows_of(1.0)
    report["holes"] = measure(holes, lambda chunk, batch: add_noise(batch, torch.Generator(), special.mask))

    def next_only(chunk, batch):
        noisy, _ = add_noise(batch, torch.Generator(), special.mask)
        first = batch.holes.clone()
        first[:, 1:] &= ~batch.holes[:, :-1]
        return noisy, first
    report["next"] = measure(holes, next_only)
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


def _rewrite_loss_log(path: Path, up_to_step: int, fields: list[str] = LOSS_FIELDS) -> None:
    """Keep the rows of steps the resumed state covers (later ones are trained again)."""
    rows = []
    if path.exists():
        with contextlib.suppress(OSError, ValueError, csv.Error):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= up_to_step]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
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


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 autocast takes a
    training step of the `cpu` preset in 0.6x fp32's time (measured on an EPYC); elsewhere bf16 is
    emulated and slower."""
    with contextlib.suppress(OSError):
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
        return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))
    return False


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


def read_texts(corpus_dir: str | Path | Sequence[str | Path]) -> tuple[list[str], list[str], dict]:
    """The documents of one or more corpus directories: those to train on, the held-out ones
    (every HELDOUT_EVERY-th; a corpus too small to spare them is measured on its own text), and
    the corpora's counts summed."""
    texts, corpus_stats = [], {}
    for directory in [corpus_dir] if isinstance(corpus_dir, (str, Path)) else corpus_dir:
        more, stats = read_corpus(directory)
        texts += more
        corpus_stats = {k: corpus_stats.get(k, 0) + v for k, v in stats.items()}
    heldout = texts[::HELDOUT_EVERY]
    if len(texts) > HELDOUT_EVERY:
        texts = [t for i, t in enumerate(texts) if i % HELDOUT_EVERY]
    return texts, heldout, corpus_stats


def batch_builders(sampler, device: torch.device, prefetch: int | None = None,
                   processes: int | None = None) -> tuple[Executor, Callable, int]:
    """Who builds `sampler`'s batches ahead of the step, the call that builds one (step, batch
    size), and how many are built ahead. Threads suffice for a CPU run (the tokenizer releases the
    GIL); a GPU steps faster than one Python thread parses holes, so there forked processes build
    them (`processes`, default: enough to keep a GPU fed; `prefetch` batches ahead, default 4 on
    CUDA and 2 elsewhere)."""
    if processes is None:
        processes = max(1, min(14, (os.cpu_count() or 2) - 2)) if device.type == "cuda" else 0
    ahead = max(1, prefetch if prefetch is not None else 4 if device.type == "cuda" else 2, processes)
    if processes > 0:
        return (ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"),
                                    initializer=_start_batch_process, initargs=(sampler,)), _process_batch, ahead)
    return ThreadPoolExecutor(ahead), sampler.batch, ahead


_process_sampler = None  # a batch-building process's own (forked) sampler


def _start_batch_process(sampler: ExampleSampler) -> None:
    global _process_sampler  # a batch-building process's own (forked) sampler
    torch.set_num_threads(1)
    _process_sampler = sampler


def _process_batch(step: int, batch_size: int):
    return _process_sampler.batch(step, batch_size)


def train_model(corpus_dir: str | Path | Sequence[str | Path], tokenizer_path: str | Path, out_dir: str | Path, *,
                config: ModelConfig = PRESETS["30m"], steps: int | None = None, minutes: float | None = None,
                batch_size: int = 32, seq_len: int = 1024, lr: float = 1e-3, device: str | None = None,
                resume: bool = True, seed: int = 0, warmup: float = 0.03, min_lr_ratio: float = 0.1,
                weight_decay: float = 0.1, grad_clip: float = 1.0, holes_share: float = 0.7, eps: float = 1e-3,
                save_every_steps: int | None = 1000, save_every_minutes: float | None = 10.0,
                compile_model: bool = False, prefetch: int | None = None, batch_processes: int | None = None,
                release_dtype: torch.dtype = torch.float16, log_every: int = 10,
                on_step: Callable[[dict], None] | None = None, on_release: Callable[[Path], None] | None = None,
                state_dir: str | Path | None = None, init_from: str | Path | None = None) -> dict:
    """Train a masked-diffusion infill model on one or more corpus directories; write
    `out_dir/model/` (the release checkpoint with the tokenizer, rewritten at every save, so a run
    cut short still has one), `out_dir/loss.csv`, `out_dir/stats.json`, and `out_dir/train-state/`.

    Runs until `steps` optimizer steps or `minutes` of training (counted over resumed runs too),
    whichever comes first; the LR schedule (warmup then cosine) follows steps when given, else the
    elapsed fraction of `minutes`. Steps are deterministic in (seed, step) on a given device, so
    an interrupted run resumed from train-state/ continues as if uninterrupted. State is saved
    every `save_every_steps` steps or `save_every_minutes`, on Ctrl-C, and at the end. bf16
    autocast on CUDA and on CPUs with bf16 instructions, fp32 elsewhere; `compile_model` runs the
    forward through torch.compile;
    `prefetch` batches (default 4 on CUDA, 2 elsewhere) are built ahead, in threads or in
    `batch_processes` forked processes (default on CUDA: enough to keep a GPU fed). `on_step`
    gets each row of loss.csv as it is written (it may raise to stop the run); `on_release` gets
    the release directory each time it is written. `state_dir` (default `out_dir/train-state`)
    can live elsewhere, away from an output folder that must stay small. `init_from` (a release
    directory of one of Lacuna's own models) continues it on another machine: its weights and
    shape replace `config`'s fresh ones, with a new optimizer and schedule; its tokenizer must be
    this run's.
    """
    if steps is None and minutes is None:
        raise ValueError("give steps or minutes")
    tokenizer_path, out_dir = Path(tokenizer_path), Path(out_dir)
    if tokenizer_path.is_dir():
        tokenizer_path = tokenizer_path / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as err:  # tokenizers raises plain Exception
        raise TrainingError(f"cannot read the tokenizer {tokenizer_path}: {err}") from None
    start = None
    if init_from is not None:
        try:
            start = load_checkpoint(init_from)
        except CheckpointError as err:
            raise TrainingError(f"cannot start from {init_from}: {err}") from None
        if start.tokenizer.to_str() != tokenizer.to_str():
            raise TrainingError(f"{init_from} was trained with another tokenizer than {tokenizer_path}")
        config = start.model.config
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds the model's {config.max_position_embeddings} positions")
    special = special_ids(tokenizer, str(tokenizer_path))
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > config.vocab_size:
        raise TrainingError(f"the tokenizer {tokenizer_path} has {vocab} tokens but the model's vocab_size is "
                            f"{config.vocab_size}: train the tokenizer with vocab_size<={config.vocab_size} or "
                            f"use a config with vocab_size>={vocab}")
    texts, heldout, corpus_stats = read_texts(corpus_dir)
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir, loss_path = Path(state_dir) if state_dir else out_dir / STATE_DIR, out_dir / "loss.csv"

    if start is not None:
        model = start.model
    else:
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
    forward = partial(hidden_states, torch.compile(model) if compile_model else model)

    bf16 = device_.type == "cuda" or (device_.type == "cpu" and cpu_has_bf16())

    def autocast():
        return torch.autocast(device_.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

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
    workers, build, ahead = batch_builders(sampler, device_, prefetch, batch_processes)
    updating = False
    pending = deque(workers.submit(build, s, batch_size) for s in range(step, step + ahead))
    try:
        while not finished():
            started = time.perf_counter()
            progress = step / steps if steps is not None else elapsed / (minutes * 60)
            current_lr = lr_at(progress, lr, warmup, min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = current_lr
            batch = pending.popleft().result()
            pending.append(workers.submit(build, step + len(pending) + 1, batch_size))
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
                release(model, tokenizer, special, out_dir / "model", release_dtype)
                if on_release is not None:
                    on_release(out_dir / "model")
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
    if on_release is not None:
        on_release(out_dir / "model")
    tail = losses[-50:]
    stats = {
        "parameters": parameters, "steps": step, "tokens_seen": tokens_seen,
        "wall_seconds": round(time.perf_counter() - wall_start, 1), "train_seconds": round(elapsed, 1),
        "tokens_per_second": round(tokens_seen / max(elapsed, 1e-9), 1),
        "first_loss": losses[0] if losses else None, "final_loss": sum(tail) / len(tail) if tail else None,
        "last_loss": losses[-1] if losses else None, "resumed_from": resumed_from,
        "hardware": hardware(device_), "device": str(device_),
        "precision": "bf16 autocast" if bf16 else "fp32", "release_dtype": str(written),
        "model_dir": str(out_dir / "model"), "corpus": corpus_stats, "config": config.to_hf(),
        "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
        "heldout_masked": masked_accuracy(model, heldout, tokenizer, special, seq_len),
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats
