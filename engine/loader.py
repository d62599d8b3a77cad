"""Load and write checkpoints in the Hugging Face layout, safetensors only, never the network.

A directory holds `config.json`, `model.safetensors` (or shards listed in
`model.safetensors.index.json`; matrices may be stored 4-bit, see packed.py), `tokenizer.json`,
and optionally `tokenizer_config.json` and `generation_config.json`, from which the mask, pad,
EOS and BOS ids are read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .config import FAMILIES, FIM_VARIANTS, PRESETS, CheckpointError, Family, ModelConfig
from .model import Transformer, rope_inv_freq
from .packed import unpack_all

log = logging.getLogger(__name__)

MASK_TOKEN, EOS_TOKEN, BOS_TOKEN = "<|mask|>", "<|endoftext|>", "<|beginoftext|>"
# DreamOn grows an infill with this token (one becomes two masks); this engine fills a fixed span.
EXPAND_TOKEN = "<|expand|>"
# LLaDA's published weight names (OLMo style, in LLaDA's modeling_llada.py) -> this engine's.
# ff_proj is the SwiGLU gate, up_proj the linear half, a block's ff_out the down projection.
LLADA_NAMES = [(re.compile(pattern), target) for pattern, target in [
    (r"model\.transformer\.wte\.weight", "model.embed_tokens.weight"),
    (r"model\.transformer\.ln_f\.weight", "model.norm.weight"),
    (r"model\.transformer\.ff_out\.weight", "lm_head.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.ff_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.([qkv])_proj\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.attn_out\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.ff_proj\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.up_proj\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.ff_out\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]]
# The model Lacuna ships (package data; its model card is README.md there), loaded by default.
BUNDLED_DIR = Path(__file__).parent / "bundled"


@dataclass
class SpecialIds:
    mask: int
    eos: int
    pad: int
    bos: int | None  # the BOS the infill layout starts with; None where the family's has none
    stops: tuple[int, ...] = ()  # more ids that end an infill (DiffuCoder's <|dlm_pad|>)
    banned: tuple[int, ...] = ()  # ids never predicted besides the mask (DreamOn's expand, unused rows)
    separator: int | None = None  # between suffix and prefix in a suffix-prefix-middle layout
    fim: tuple[int, ...] | None = None  # a fill-in-the-middle family's sentinels, in Family.fim's order

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys((self.eos, self.pad, *self.stops)))


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    special: SpecialIds
    name: str
    random_weights: bool = False
    packed: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # weights stored 4-bit, by name


def _read_json(path: Path, required: bool) -> dict:
    if not path.exists():
        if required:
            raise CheckpointError(f"checkpoint is missing {path.name} ({path})")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path.name} is not valid JSON: {err}") from None


def _token_id(tokenizer: Tokenizer, value) -> int | None:
    """An id from a tokenizer_config entry: a token string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return tokenizer.token_to_id(value) if isinstance(value, str) else None


def _first_id(*values) -> int | None:
    for value in values:
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return None


def _special_ids(tokenizer: Tokenizer, family: Family, config: dict, generation: dict,
                 tok_config: dict, spare_row: int | None = None) -> SpecialIds:
    """`spare_row`: an embedding row the tokenizer lacks, for the masks of a fill-in-the-middle
    family, which has no mask token and never feeds its masks (they are never predicted either)."""
    def find(name: str) -> int | None:
        key = f"{name}_token_id"
        return _first_id(config.get(key), generation.get(key), _token_id(tokenizer, tok_config.get(f"{name}_token")))

    spare_row = spare_row if family.fim else None
    mask = _first_id(find("mask"), spare_row, *(tokenizer.token_to_id(token) for token in family.mask_tokens))
    if mask is None:
        raise CheckpointError(f"no mask token: {family.mask_hint}, or name it as mask_token in tokenizer_config.json")
    eos = find("eos")
    if eos is None:
        raise CheckpointError("no EOS token: set eos_token_id in config.json or generation_config.json")
    pad = find("pad")
    # A tokenizer's own EOS or pad that the config does not name, or the family's end of a turn,
    # also ends an infill.
    stops = [_token_id(tokenizer, tok_config.get(k)) for k in ("eos_token", "pad_token")]
    stops = tuple(i for i in stops + [tokenizer.token_to_id(t) for t in family.stop_tokens] if i is not None)
    expand = tokenizer.token_to_id(EXPAND_TOKEN)
    if expand is not None:
        log.warning("%s: DreamOn's expand token is never predicted; infills have the length the server asks for, "
                    "and an EOS inside one ends it (DreamOn's delete)", EXPAND_TOKEN)
    separator = None
    if family.spm_separator:
        separator = tokenizer.token_to_id(family.spm_separator)
        if separator is None:
            raise CheckpointError(f"the tokenizer lacks {family.spm_separator}, which this family's layout puts "
                                  "between the suffix and the prefix")
    fim = tuple(tokenizer.token_to_id(token) for token in family.fim) or None  # present: fim_variant checked
    return SpecialIds(mask=mask, eos=eos, pad=eos if pad is None else pad, bos=find("bos") if family.bos else None,
                      stops=stops, banned=() if expand is None else (expand,), separator=separator, fim=fim)


def _listed_tokens(tok_config: dict) -> set[str]:
    """The tokens tokenizer_config.json says the tokenizer adds."""
    decoder = tok_config.get("added_tokens_decoder")
    listed = [entry.get("content") for entry in decoder.values() if isinstance(entry, dict)] \
        if isinstance(decoder, dict) else []
    extra = tok_config.get("additional_special_tokens")
    return {token for token in listed + (extra if isinstance(extra, list) else []) if isinstance(token, str)}


def fim_variant(config: ModelConfig, hf_config: dict, generation: dict, tok_config: dict,
                tokenizer: Tokenizer) -> ModelConfig:
    """`config`, or its fill-in-the-middle family (config.FIM_VARIANTS) where the checkpoint is one:
    its tokenizer or tokenizer_config.json has the family's FIM sentinels, and nothing names a mask
    token (Open-dCoder keeps Qwen2.5-Coder's tokenizer, sentinels and all, and adds the mask <M>).
    A FIM family whose tokenizer lacks a sentinel is refused, naming it: no prompt could be built."""
    variant = FIM_VARIANTS.get(config.model_type)
    sentinels = FAMILIES[variant].fim if variant else config.family.fim
    if not sentinels:
        return config
    listed = _listed_tokens(tok_config)
    present = [token for token in sentinels if tokenizer.token_to_id(token) is not None]
    if variant:
        mask_tokens = config.family.mask_tokens
        named_mask = (_first_id(hf_config.get("mask_token_id"), generation.get("mask_token_id")) is not None
                      or tok_config.get("mask_token") or any(tokenizer.token_to_id(t) is not None for t in mask_tokens))
        if named_mask or not (present or listed & set(sentinels)):
            return config  # a diffusion model of the base family (or one the loader refuses for its mask)
    missing = [token for token in sentinels if tokenizer.token_to_id(token) is None]
    if missing:
        why = ("tokenizer_config.json lists it" if missing[0] in listed else
               f"its other sentinels ({', '.join(present)}) make it a fill-in-the-middle model" if present else
               "its fill-in-the-middle prompt needs it")
        raise CheckpointError(f"tokenizer.json lacks the fill-in-the-middle token {missing[0]}, and {why}: "
                              f"the prompt is {' prefix '.join(sentinels[:2])} suffix {sentinels[2]}")
    return dataclasses.replace(config, model_type=variant) if variant else config


def _check_ids_fit(tokenizer_rows: int, special: SpecialIds, rows: int) -> None:
    """A tokenizer or special id beyond the embedding would fail every request ("index out of
    range"): refuse the checkpoint at load instead."""
    named = [(name, getattr(special, name)) for name in ("mask", "eos", "pad", "bos")]
    for name, value in named + [("stop", i) for i in special.stops] + [("expand", i) for i in special.banned]:
        if value is not None and not 0 <= value < rows:
            raise CheckpointError(f"the {name} token id {value} lies outside the model's {rows} embedding rows "
                                  "(vocab_size in config.json)")
    largest = tokenizer_rows - 1
    if largest >= rows:
        raise CheckpointError(f"tokenizer.json has token ids up to {largest}, beyond the model's {rows} embedding "
                              "rows (vocab_size in config.json): the tokenizer does not belong to this model")


def _tokenizer_rows(tokenizer: Tokenizer) -> int:
    return max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The float weights by name, and the parts of those stored 4-bit."""
    index_path = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").exists():
        files = [directory / "model.safetensors"]
    elif index_path.exists():
        shard_names = sorted(set(_read_json(index_path, True).get("weight_map", {}).values()))
        files = [directory / name for name in shard_names]
        if not files:
            raise CheckpointError("model.safetensors.index.json has an empty weight_map")
    else:
        found = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        hint = f" (found {', '.join(found)}: pickled weights are never loaded; convert them)" if found else ""
        raise CheckpointError(f"checkpoint is missing model.safetensors{hint}")
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        if path.parent != directory or not path.exists():
            raise CheckpointError(f"checkpoint is missing the shard {path.name}")
        try:
            weights.update(load_file(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path.name} is corrupt: {err}") from None
    packed = unpack_all(weights)  # the float matrices restored into `weights`
    return weights, packed


def _rename_llada(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for name, tensor in weights.items():
        for pattern, target in LLADA_NAMES:
            if pattern.fullmatch(name):
                name = pattern.sub(target, name)
                break
        renamed[name] = tensor
    return renamed


def load_checkpoint(directory: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a checkpoint directory, or raise CheckpointError naming the missing or bad part."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    hf_config = _read_json(directory / "config.json", required=True)
    config = ModelConfig.from_hf(hf_config)
    if not (directory / "tokenizer.json").exists():
        raise CheckpointError(f"checkpoint is missing tokenizer.json ({directory})")
    try:
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception as err:  # tokenizers raises plain Exception on a bad file
        raise CheckpointError(f"tokenizer.json is corrupt: {err}") from None
    generation = _read_json(directory / "generation_config.json", required=False)
    tok_config = _read_json(directory / "tokenizer_config.json", required=False)
    config = fim_variant(config, hf_config, generation, tok_config, tokenizer)
    tokenizer_rows = _tokenizer_rows(tokenizer)
    special = _special_ids(tokenizer, config.family, hf_config, generation, tok_config,
                           spare_row=tokenizer_rows if tokenizer_rows < config.vocab_size else None)
    _check_ids_fit(tokenizer_rows, special, config.vocab_size)
    # Rows the tokenizer never produces (an embedding padded for speed) are never predicted either.
    special.banned += tuple(range(tokenizer_rows, config.vocab_size))
    weights, packed = _read_weights(directory)
    if any(name.startswith("model.transformer.") for name in weights):
        weights = _rename_llada(weights)
    with torch.device("meta"):
        model = Transformer(config)
    expected = set(model.state_dict())
    if config.tie_embeddings:
        expected.discard("lm_head.weight")
        weights.pop("lm_head.weight", None)
    missing = sorted(expected - set(weights))
    if missing:
        raise CheckpointError(f"checkpoint weights lack {len(missing)} tensors, e.g. {missing[0]}")
    unexpected = sorted(set(weights) - expected)
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unknown tensors, e.g. {unexpected[0]}")
    for name, param in model.state_dict().items():
        if name in expected and weights[name].shape != param.shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(weights[name].shape)}, "
                                  f"config says {tuple(param.shape)}")
    model.load_state_dict(weights, assign=True, strict=False)
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config)
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, tokenizer, special, name=directory.name, packed=packed)


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer with no merges (256 byte tokens + EOS, BOS, mask): for random models."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS_TOKEN, BOS_TOKEN, MASK_TOKEN])
    return tokenizer


def random_model(shape: str | ModelConfig = "tiny", device: str = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> LoadedModel:
    """A random-weight model of a named shape with the byte tokenizer: for tests and benchmarks."""
    config = PRESETS[shape] if isinstance(shape, str) else shape
    tokenizer = byte_tokenizer()
    ids = [tokenizer.token_to_id(t) for t in (MASK_TOKEN, EOS_TOKEN, BOS_TOKEN)]
    if max(ids) >= config.vocab_size:
        raise ValueError(f"vocab_size {config.vocab_size} is too small for the byte tokenizer")
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(config).to(dtype)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            continue
        torch.nn.init.normal_(param, std=0.02) if param.dim() > 1 else torch.nn.init.zeros_(param)
    special = SpecialIds(mask=ids[0], eos=ids[1], pad=ids[1], bos=ids[2])
    name = shape if isinstance(shape, str) else config.model_type
    return LoadedModel(model.eval(), tokenizer, special, name=f"random-{name}", random_weights=True)


def save_checkpoint(loaded: LoadedModel, directory: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write `loaded` in the layout `load_checkpoint` reads, sharded when `max_shard_bytes` is set."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = loaded.model.config
    state = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight")
    save_weights(state, directory, max_shard_bytes)
    save_config(directory, config, loaded.special, loaded.tokenizer)


def save_config(directory: Path, config: ModelConfig, special: SpecialIds, tokenizer: Tokenizer) -> None:
    """What `load_checkpoint` reads besides the weights: config.json with the special ids,
    generation_config.json, tokenizer.json and tokenizer_config.json."""
    ids = {"mask_token_id": special.mask, "eos_token_id": special.eos, "pad_token_id": special.pad,
           "bos_token_id": special.bos}
    (directory / "config.json").write_text(json.dumps({**config.to_hf(), **ids}, indent=1))
    (directory / "generation_config.json").write_text(json.dumps(ids, indent=1))
    tokenizer.save(str(directory / "tokenizer.json"), pretty=False)
    ids_by_name = {"mask": special.mask, "eos": special.eos, "pad": special.pad, "bos": special.bos}
    names = {f"{k}_token": tokenizer.id_to_token(v) for k, v in ids_by_name.items() if v is not None}
    (directory / "tokenizer_config.json").write_text(json.dumps(names, indent=1))


def save_weights(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int | None = None) -> list[str]:
    """`state` as model.safetensors, or in shards of at most `max_shard_bytes` with their index;
    the files written."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return ["model.safetensors"]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    return sorted(set(weight_map.values()))
