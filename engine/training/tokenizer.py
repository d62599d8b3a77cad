"""The tokenizer of Lacuna's own models (`lacuna train tokenizer`): a byte-level BPE trained on the
corpus, whose pre-tokenizer keeps a newline and the next line's indentation together, so lines
start on token boundaries. The one they train with is TOKENIZER (12,288 tokens).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from ..loader import BOS_TOKEN, EOS_TOKEN, MASK_TOKEN, SpecialIds
from .corpus import TrainingError, read_corpus

TOKENIZER = Path(__file__).parent / "tokenizer.json"


def tokenizer_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """A newline and the next line's indentation are one pre-token, so every line's code starts on
    a token boundary: a prefix ending after the indentation or a suffix starting at a newline
    tokenizes the same alone as inside the whole text."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n[ \t]*"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def train_tokenizer(corpus_dir: str | Path, out_dir: str | Path, vocab_size: int = 12288, *,
                    max_chars: int | None = 400_000_000) -> Path:
    """Train a byte-level BPE on the corpus; write and return `out_dir/tokenizer.json`.

    Special tokens (ids 0-2): `<|endoftext|>` (EOS, also pad), `<|beginoftext|>` (BOS), `<|mask|>`.
    The vocabulary is at most `vocab_size` (fewer when the corpus has fewer merges to offer).
    """
    if not 300 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size must be within [300, 65536] (8k-16k for the bundled model), not {vocab_size}")
    texts, _ = read_corpus(corpus_dir)
    if max_chars is not None:
        total, kept = 0, []
        for text in texts:
            if total >= max_chars:
                break
            kept.append(text)
            total += len(text)
        texts = kept
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = tokenizer_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[EOS_TOKEN, BOS_TOKEN, MASK_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def special_ids(tokenizer: Tokenizer, source: str = "the tokenizer") -> SpecialIds:
    ids = {t: tokenizer.token_to_id(t) for t in (MASK_TOKEN, EOS_TOKEN, BOS_TOKEN)}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise TrainingError(f"{source} lacks the special tokens {', '.join(missing)} (train it with train_tokenizer)")
    return SpecialIds(mask=ids[MASK_TOKEN], eos=ids[EOS_TOKEN], pad=ids[EOS_TOKEN], bos=ids[BOS_TOKEN])
