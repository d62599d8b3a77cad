"""Tiny random-weight checkpoints in the layouts the open diffusion coders are published in.

Each writer reproduces one family's files at a tiny size: the config.json keys and the values
that matter, weight names and their shapes relative to the config, and the special tokens and the
way their ids are found (config.json, generation_config.json, tokenizer_config.json or the
tokenizer's added tokens). The Hugging Face hub could not be reached from here; every fact was read
from the families' own code or from copies of the published files, named beside it:

- [LLaDA-cfg] yinj66/support_basis@66e6761, `LLaDA-8B-Instruct-B&S-light/`: a copy of the published
  LLaDA-8B-Instruct config.json, tokenizer_config.json and model.safetensors.index.json (the index's
  total_size equals the parameter count of these names and shapes exactly).
- [LLaDA-code] ML-GSAI/LLaDA@b7e6c35 generate.py (mask 126336, no logit shift) and
  NVlabs/Fast-dLLM@24cc59e llada/model/{configuration,modeling}_llada.py (OLMo-style ModelConfig;
  LLaDALlamaBlock: `x, x_up = ff_proj(x), up_proj(x); x = act(x) * x_up; ff_out(x)`; RMSNorm;
  rotate-half RoPE; `is_causal=False`; embedding rows `embedding_size or vocab_size`).
- [DiffuCoder-cfg] huggingface.co/apple/DiffuCoder-7B-Instruct/resolve/main/config.json (stored copy):
  model_type "Dream", DreamModel, bos = eos = pad = 151643, mask 151666, untied lm_head.
  apple/ml-diffucoder inference_demo.py cuts the output at `<|dlm_pad|>` (151667, the tokenizer's pad).
- [Dream-Coder-cfg] a duplicate of Dream-org/Dream-Coder-v0-Instruct-7B (smoorsmith/Dream-coder-test):
  bos 151665 (<|beginoftext|>), eos = pad 151643, mask 151666.
- [Dream-gen] a duplicate of Dream-org/Dream-v0-Instruct-7B's generation_config.json:
  `"mask_token_id": null`, so the mask comes from config.json (DreamConfig's default 151666).
- [Dream-code] NVlabs/Fast-dLLM dream/model/modeling_dream.py (a copy of the published file):
  Qwen2 names, q/k/v bias, no o_proj bias, `is_causal=False`; generation_utils.py shifts the logits:
  `logits = torch.cat([logits[:,:1], logits[:, :-1]], dim=1)`.
- [DreamOn-code] DreamLM/DreamOn eval/evaluate.py `self.expand_id = 151667` (<|expand|>, right after
  the mask); its infilling input is `[bos] + prefix + [mask]*n + suffix + [eos]` (readme, quickstart).
- [Open-dCoder-code] pengzhangzhi/Open-dLLM: trained from Qwen2.5-Coder-0.5B (tied embeddings,
  model_type qwen2); tasks/train_torch.py adds `<M>` as the mask token (151665, only an added
  token); eval/eval_infill/eval_infill.py feeds prefix + masks + suffix with no BOS and no EOS;
  its generation_utils.py shifts the logits as Dream does.
- [Fast-dLLM-v2-cfg] a copy of Efficient-Large-Model/Fast_dLLM_v2_7B's config.json
  (Satgoy152/DualDiffusion@d3a3470): model_type "Fast_dLLM_Qwen", bd_size 32.
- [SDAR-code] JetAstra/SDAR and sglang's sdar.py: model_type "sdar" / "sdar_moe", block diffusion.
- [LLaDA-MoE-code] ZHZisZZ/dllm configuration_lladamoe.py: model_type "llada" with num_experts.
- [CoDA] SalesforceAIResearch/CoDA@fa1d505, CoDALanguageModel/: config.json (model_type "CoDA",
  architectures ["CoDALanguageModel"], hidden 2048, 28 layers, 16 heads / 8 KV of 128,
  vocab_size 151936, no bias, mask_token_id 151669, pad_token_id 151643, no tie_word_embeddings,
  bos/eos ids absent); modeling_coda.py and attention.py (Qwen3 layers: q_norm / k_norm per head
  over head_dim before RoPE, RMSNorm weight * x, SDPA with is_causal=False and no mask, lm_head
  its own Linear that nothing ties); generation_utils.py:457 shifts logits as Dream does;
  tokenizer_config.json (add_bos_token false, bos and eos <|im_end|> 151645, pad <|endoftext|>
  151643, mask <|mask|> 151669); serving/fast-api decodes with alg "entropy". Licence CC BY-NC 4.0.
  No infill code is published: the layout is Open-dCoder's (prefix masks suffix), as pre-training
  saw documents without BOS.

Autoregressive fill-in-the-middle coders (family `qwen2_fim`; StarCoder2 refused):
- [Qwen-Coder-card] QwenLM/Qwen2.5-Coder@251cddd examples/Qwen2.5-Coder.md (the models' card text):
  the FIM prompt `'<|fim_prefix|>' + prefix + '<|fim_suffix|>' + suffix + '<|fim_middle|>'`, and
  generation stops at `eos_token_ids = [151664, 151662, 151659, 151660, 151661, 151662, 151663,
  151664, 151645, 151643]`. huggingface.co/Qwen/Qwen2.5-Coder-{0.5B,1.5B,7B} (model cards, stored
  copies): licence apache-2.0, safetensors weights.
- [Qwen-tok] a copy of a Qwen2.5 Instruct tokenizer_config.json (the tokenizer Qwen2.5-Coder
  shares): 151643 regular tokens, then added tokens <|endoftext|> 151643, <|im_start|> 151644,
  <|im_end|> 151645, <|object_ref_start|> .. <|video_pad|> 151646-151656 (special), <tool_call>
  151657, </tool_call> 151658, <|fim_prefix|> 151659, <|fim_middle|> 151660, <|fim_suffix|> 151661,
  <|fim_pad|> 151662, <|repo_name|> 151663, <|file_sep|> 151664 (special false); bos_token null, pad
  <|endoftext|>, tokenizer_class Qwen2Tokenizer. Its eos_token is the chat turn's <|im_end|>; the base
  models' is <|endoftext|>, the eos of their generation_config.json (below).
- [Qwen-Coder-cfg] copies of config.json: Qwen2.5-Coder-0.5B-Instruct's (GoidaAlignment/GOIDA-0.5B,
  Hachipo/...-MIFT-ja) and Qwen2.5-0.5B's (the base it starts from, osllmai-community/Qwen2.5-0.5B):
  Qwen2ForCausalLM, model_type qwen2, hidden 896, 24 layers, 14 heads / 2 KV, max_window_layers 24,
  vocab_size 151936 (past the tokenizer's 151665), tie_word_embeddings true, rope_theta 1e6,
  rms_norm_eps 1e-6, use_sliding_window false. Qwen2.5-Coder-0.5B's generation_config.json (a copy,
  PrunaAI/mlx-community-Qwen2.5-Coder-0.5B-bf16-bnb-smashed): bos = eos = 151643; the 1.5B's (a
  duplicate, beingSong/Qwen2.5-Coder-1.5B) adds max_new_tokens 2048.
- [StarCoder2-cfg] huggingface.co/bigcode/starcoder2-3b/blob/refs/pr/3/config.json (stored copy):
  Starcoder2ForCausalLM, model_type starcoder2, hidden 3072, 30 layers, 24 heads / 2 KV,
  intermediate 12288, hidden_act gelu_pytorch_tanh, norm_type layer_norm, norm_epsilon 1e-5,
  use_bias true, sliding_window 4096, max_position_embeddings 16384, rope_theta 999999.44, vocab
  49152, bos = eos = 0. transformers' modeling_starcoder2.py: nn.LayerNorm (weight and bias) before
  attention, before the MLP and at the end; q/k/v/o_proj with bias; Starcoder2MLP c_fc -> act ->
  c_proj with bias; lm_head tied to the embedding (tie_word_embeddings defaults to true).
- [StarCoder-tok] bigcode/starcoderbase-3b's tokenizer_config.json (a stored copy): <|endoftext|>,
  <fim_prefix>, <fim_middle>, <fim_suffix>, <fim_pad> are ids 0-4, before the regular tokens;
  StarCoder2 follows them with <repo_name> and <file_sep> (its paper's repository-level format,
  arXiv 2402.19173 section 5).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, POSITIONS = 64, 2, 4, 2, 96, 512


def byte_tokenizer_with(specials: list[str]) -> Tokenizer:
    """256 byte-level tokens, then `specials` as added tokens in this order (ids 256, 257, ...)."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    return tokenizer


def _write(directory: Path, config: dict, weights: dict[str, torch.Tensor], tokenizer: Tokenizer,
           tokenizer_config: dict, generation_config: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config, indent=1))
    tokenizer.save(str(directory / "tokenizer.json"))
    save_file({k: v.contiguous() for k, v in weights.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    return directory


def _random(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * (0.02 if len(shape) > 1 else 1.0)


def _qwen2_weights(rows: int, tied: bool, seed: int) -> dict[str, torch.Tensor]:
    """Qwen2 / Dream names: q/k/v with bias, o_proj without [Dream-code]."""
    g = torch.Generator().manual_seed(seed)
    head_dim = HIDDEN // HEADS
    weights = {"model.embed_tokens.weight": _random(rows, HIDDEN, generator=g),
               "model.norm.weight": 1 + 0.1 * _random(HIDDEN, generator=g)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name, out in (("q", HEADS * head_dim), ("k", KV_HEADS * head_dim), ("v", KV_HEADS * head_dim)):
            weights[f"{p}self_attn.{name}_proj.weight"] = _random(out, HIDDEN, generator=g)
            weights[f"{p}self_attn.{name}_proj.bias"] = 0.02 * _random(out, generator=g)
        weights[f"{p}self_attn.o_proj.weight"] = _random(HIDDEN, HEADS * head_dim, generator=g)
        weights[f"{p}mlp.gate_proj.weight"] = _random(FFN, HIDDEN, generator=g)
        weights[f"{p}mlp.up_proj.weight"] = _random(FFN, HIDDEN, generator=g)
        weights[f"{p}mlp.down_proj.weight"] = _random(HIDDEN, FFN, generator=g)
        weights[f"{p}input_layernorm.weight"] = 1 + 0.1 * _random(HIDDEN, generator=g)
        weights[f"{p}post_attention_layernorm.weight"] = 1 + 0.1 * _random(HIDDEN, generator=g)
    if not tied:
        weights["lm_head.weight"] = _random(rows, HIDDEN, generator=g)
    return weights


def _qwen2_config(rows: int, **extra) -> dict:
    return {"hidden_act": "silu", "hidden_size": HIDDEN, "intermediate_size": FFN, "num_attention_heads": HEADS,
            "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS, "max_position_embeddings": POSITIONS,
            "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
            "use_sliding_window": False, "vocab_size": rows, "torch_dtype": "bfloat16", **extra}


# The Qwen2.5 specials in their order (<|endoftext|> first), then each family's own. The 8B and 7B
# vocabularies are scaled down, but each id keeps its place relative to the others.
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DREAM_AUTO_MAP = {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"}


def dream_coder(directory: Path) -> Path:
    """Dream-Coder-v0-Instruct-7B [Dream-Coder-cfg]: BOS <|beginoftext|>, mask in config.json."""
    tokenizer = byte_tokenizer_with(QWEN_SPECIALS + ["<|beginoftext|>", "<|mask|>"])
    eos, bos, mask = (tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|beginoftext|>", "<|mask|>"))
    rows = 288  # the embedding is padded past the tokenizer, as 152064 > 151667
    config = _qwen2_config(rows, architectures=["DreamModel"], auto_map=DREAM_AUTO_MAP, model_type="Dream",
                           bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, mask_token_id=mask,
                           tie_word_embeddings=False, use_cache=True)
    return _write(directory, config, _qwen2_weights(rows, tied=False, seed=1), tokenizer,
                  {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})


def dream_v0(directory: Path) -> Path:
    """Dream-v0-Instruct-7B [Dream-gen]: generation_config.json's mask_token_id is null; BOS is EOS."""
    tokenizer = byte_tokenizer_with(QWEN_SPECIALS + ["<|beginoftext|>", "<|mask|>"])
    eos, mask = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|mask|>")
    rows = 288
    config = _qwen2_config(rows, architectures=["DreamModel"], auto_map=DREAM_AUTO_MAP, model_type="Dream",
                           bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, mask_token_id=mask,
                           tie_word_embeddings=False)
    generation = {"_from_model_config": True, "alg": "origin", "bos_token_id": eos, "eos_token_id": eos,
                  "mask_token_id": None, "pad_token_id": eos, "steps": 512, "temperature": 0.0}
    return _write(directory, config, _qwen2_weights(rows, tied=False, seed=2), tokenizer,
                  {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, generation)


def diffucoder(directory: Path) -> Path:
    """DiffuCoder-7B-Instruct [DiffuCoder-cfg]: the tokenizer's pad <|dlm_pad|> fills after the answer."""
    tokenizer = byte_tokenizer_with(QWEN_SPECIALS + ["<|beginoftext|>", "<|mask|>", "<|dlm_pad|>"])
    eos, mask = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|mask|>")
    rows = 288
    config = _qwen2_config(rows, architectures=["DreamModel"], auto_map=DREAM_AUTO_MAP, model_type="Dream",
                           bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, mask_token_id=mask,
                           tie_word_embeddings=False, max_window_layers=LAYERS, use_mrope=False)
    return _write(directory, config, _qwen2_weights(rows, tied=False, seed=3), tokenizer,
                  {"eos_token": "<|endoftext|>", "pad_token": "<|dlm_pad|>"})


def dreamon(directory: Path) -> Path:
    """DreamOn-v0-7B [DreamOn-code]: <|expand|> right after <|mask|>."""
    tokenizer = byte_tokenizer_with(QWEN_SPECIALS + ["<|beginoftext|>", "<|mask|>", "<|expand|>"])
    eos, bos, mask = (tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|beginoftext|>", "<|mask|>"))
    rows = 288
    config = _qwen2_config(rows, architectures=["DreamModel"], auto_map=DREAM_AUTO_MAP, model_type="Dream",
                           bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, mask_token_id=mask,
                           tie_word_embeddings=False)
    return _write(directory, config, _qwen2_weights(rows, tied=False, seed=4), tokenizer,
                  {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})


def open_dcoder(directory: Path) -> Path:
    """Open-dCoder-0.5B [Open-dCoder-code]: Qwen2, tied, mask <M> only an added token."""
    tokenizer = byte_tokenizer_with(QWEN_SPECIALS + ["<M>"])
    eos = tokenizer.token_to_id("<|endoftext|>")
    rows = 272
    config = _qwen2_config(rows, architectures=["Qwen2ForCausalLM"], model_type="qwen2", bos_token_id=eos,
                           eos_token_id=eos, tie_word_embeddings=True)
    return _write(directory, config, _qwen2_weights(rows, tied=True, seed=5), tokenizer,
                  {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})


def llada_weights(rows: int, seed: int) -> dict[str, torch.Tensor]:
    """LLaDA's OLMo names [LLaDA-cfg]: nine tensors a block, no biases, an untied `ff_out` head."""
    g = torch.Generator().manual_seed(seed)
    t = "model.transformer."
    weights = {f"{t}wte.weight": _random(rows, HIDDEN, generator=g), f"{t}ln_f.weight": 1 + 0.1 * _random(HIDDEN,
               generator=g), f"{t}ff_out.weight": _random(rows, HIDDEN, generator=g)}
    for i in range(LAYERS):
        b = f"{t}blocks.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "attn_out"):
            weights[f"{b}{name}.weight"] = _random(HIDDEN, HIDDEN, generator=g)
        weights[f"{b}ff_proj.weight"] = _random(FFN, HIDDEN, generator=g)
        weights[f"{b}up_proj.weight"] = _random(FFN, HIDDEN, generator=g)
        weights[f"{b}ff_out.weight"] = _random(HIDDEN, FFN, generator=g)
        weights[f"{b}attn_norm.weight"] = 1 + 0.1 * _random(HIDDEN, generator=g)
        weights[f"{b}ff_norm.weight"] = 1 + 0.1 * _random(HIDDEN, generator=g)
    return weights


def llada_config(rows: int, eos: int, mask: int) -> dict:
    """LLaDA-8B-Instruct's config.json [LLaDA-cfg], every key, at the tiny size."""
    return {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                     "AutoModel": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": HIDDEN,
        "embedding_dropout": 0.0, "embedding_size": rows, "eos_token_id": eos, "flash_attention": False,
        "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": mask, "max_sequence_length": POSITIONS,
        "mlp_hidden_size": FFN, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
        "n_heads": HEADS, "n_kv_heads": HEADS, "n_layers": LAYERS, "pad_token_id": eos, "precision": "amp_bf16",
        "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
        "rope_theta": 500000.0, "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
        "vocab_size": rows, "weight_tying": False,
    }


def llada(directory: Path) -> Path:
    """LLaDA-8B-Instruct [LLaDA-cfg]: <|startoftext|> 126080, <|endoftext|> 126081, <|mdm_mask|> 126336,
    <|eot_id|> 126348 in that order; the mask only in config.json; 126464 embedding rows."""
    tokenizer = byte_tokenizer_with(["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|eot_id|>"])
    eos, mask = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|mdm_mask|>")
    rows = 272
    return _write(directory, llada_config(rows, eos, mask), llada_weights(rows, seed=6), tokenizer,
                  {"add_bos_token": False, "add_eos_token": False, "bos_token": "<|startoftext|>",
                   "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                   "tokenizer_class": "PreTrainedTokenizerFast"})


def coda(directory: Path) -> Path:
    """CoDA-v0-Instruct [CoDA]: Qwen3 layers with q/k norms and no biases, an untied head, the mask
    <|mask|> in config.json, after Qwen3's added tokens."""
    tokenizer = byte_tokenizer_with(QWEN_SPECIALS + ["<|file_sep|>", "<|mask|>"])
    pad, mask = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|mask|>")
    rows = 288
    weights = {name: tensor for name, tensor in _qwen2_weights(rows, tied=False, seed=7).items()
               if not name.endswith("_proj.bias")}
    g = torch.Generator().manual_seed(8)
    for i in range(LAYERS):
        for norm in ("q_norm", "k_norm"):
            weights[f"model.layers.{i}.self_attn.{norm}.weight"] = 1 + 0.1 * _random(HIDDEN // HEADS, generator=g)
    config = _qwen2_config(rows, architectures=["CoDALanguageModel"], model_type="CoDA", attention_bias=False,
                           attention_dropout=0.0, head_dim=HIDDEN // HEADS, mask_token_id=mask, pad_token_id=pad,
                           auto_map={"AutoConfig": "model_config.CoDAConfig",
                                     "AutoModel": "modeling_coda.CoDALanguageModel"})
    return _write(directory, config, weights, tokenizer,
                  {"add_bos_token": False, "bos_token": "<|im_end|>", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "mask_token": "<|mask|>", "tokenizer_class": "Qwen2Tokenizer"})


# Qwen2.5-Coder's added tokens from <|endoftext|>, at their published ids [Qwen-tok] (False: "special": false).
QWEN25_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
                ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
                ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
                ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
                ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
                ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
                ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False)]
QWEN25_REGULAR, QWEN25_ROWS = 151643, 151936  # tokens before <|endoftext|>; embedding rows [Qwen-Coder-cfg]


def qwen25_tokenizer(added: list[tuple[str, bool]] = QWEN25_ADDED) -> Tokenizer:
    """Byte-level BPE whose regular vocabulary fills the ids below 151643 as Qwen's does (the 256
    bytes, then tokens " t256", " t257", ... that no merge ever produces), then `added` from 151643."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    byte_char = _byte_chars()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({"".join(byte_char[b] for b in f" t{i}".encode()): i for i in range(len(vocab), QWEN25_REGULAR)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    for token, special in added:  # one at a time: each takes the next id
        tokenizer.add_tokens([AddedToken(token, special=special, normalized=False)])
    return tokenizer


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the character each byte is written as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def qwen25_coder(directory: Path, added: list[tuple[str, bool]] = QWEN25_ADDED) -> Path:
    """Qwen2.5-Coder-0.5B (base) [Qwen-Coder-cfg, Qwen-tok]: a plain Qwen2 checkpoint (tied, no mask
    anywhere) whose tokenizer holds the FIM sentinels at their published ids; 151936 embedding rows
    (bfloat16, as published), the blocks at the tiny size."""
    tokenizer = qwen25_tokenizer(added)
    eos = tokenizer.token_to_id("<|endoftext|>")
    config = _qwen2_config(QWEN25_ROWS, architectures=["Qwen2ForCausalLM"], model_type="qwen2", attention_dropout=0.0,
                           bos_token_id=eos, eos_token_id=eos, initializer_range=0.02, max_window_layers=LAYERS,
                           tie_word_embeddings=True, use_cache=True)
    weights = {k: v.to(torch.bfloat16) for k, v in _qwen2_weights(QWEN25_ROWS, tied=True, seed=9).items()}
    ids = {str(tokenizer.token_to_id(token)): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                                               "single_word": False, "special": special} for token, special in added}
    tokenizer_config = {"add_prefix_space": False, "added_tokens_decoder": ids,
                        "additional_special_tokens": [t for t, special in added[1:] if special],
                        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>",
                        "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
                        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    return _write(directory, config, weights, tokenizer, tokenizer_config,
                  {"bos_token_id": eos, "eos_token_id": eos, "max_new_tokens": 2048})


STARCODER2_SPECIALS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<repo_name>",
                       "<file_sep>"]


def starcoder2(directory: Path) -> Path:
    """StarCoder2-3B [StarCoder2-cfg, StarCoder-tok]: LayerNorm with bias, a GELU MLP c_fc/c_proj,
    biases everywhere, sliding-window attention; its special tokens first (ids 0-6)."""
    vocab = {token: i for i, token in enumerate(STARCODER2_SPECIALS)}
    vocab.update({ch: len(vocab) + i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(STARCODER2_SPECIALS)  # already in the vocabulary: their ids stay
    rows = len(vocab)
    g = torch.Generator().manual_seed(10)
    head_dim = HIDDEN // HEADS
    weights = {"model.embed_tokens.weight": _random(rows, HIDDEN, generator=g)}
    norms = ["model.norm"]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name, out, inp in (("q", HEADS * head_dim, HIDDEN), ("k", KV_HEADS * head_dim, HIDDEN),
                               ("v", KV_HEADS * head_dim, HIDDEN), ("o", HIDDEN, HEADS * head_dim)):
            weights[f"{p}self_attn.{name}_proj.weight"] = _random(out, inp, generator=g)
            weights[f"{p}self_attn.{name}_proj.bias"] = 0.02 * _random(out, generator=g)
        for name, out, inp in (("c_fc", FFN, HIDDEN), ("c_proj", HIDDEN, FFN)):
            weights[f"{p}mlp.{name}.weight"] = _random(out, inp, generator=g)
            weights[f"{p}mlp.{name}.bias"] = 0.02 * _random(out, generator=g)
        norms += [f"{p}input_layernorm", f"{p}post_attention_layernorm"]
    for norm in norms:
        weights[f"{norm}.weight"] = 1 + 0.1 * _random(HIDDEN, generator=g)
        weights[f"{norm}.bias"] = 0.02 * _random(HIDDEN, generator=g)
    config = {"architectures": ["Starcoder2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 0,
              "eos_token_id": 0, "hidden_act": "gelu_pytorch_tanh", "hidden_size": HIDDEN,
              "initializer_range": 0.018042, "intermediate_size": FFN, "max_position_embeddings": POSITIONS,
              "mlp_type": "default", "model_type": "starcoder2", "norm_epsilon": 1e-05, "norm_type": "layer_norm",
              "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS,
              "rope_theta": 999999.4420358813, "sliding_window": POSITIONS // 4, "transformers_version": "4.37.0.dev0",
              "use_bias": True, "use_cache": True, "vocab_size": rows}
    return _write(directory, config, weights, tokenizer,
                  {"additional_special_tokens": STARCODER2_SPECIALS, "bos_token": "<|endoftext|>",
                   "eos_token": "<|endoftext|>", "model_max_length": 1000000000000000019884624838656,
                   "tokenizer_class": "GPT2Tokenizer", "unk_token": "<|endoftext|>", "vocab_size": rows})


# name -> (writer, model_type, logit shift, the layout's lead and tail tokens by name)
SUPPORTED = {
    "llada-8b-instruct": (llada, "llada", 0, ["<|startoftext|>"], []),
    "dream-coder-7b-instruct": (dream_coder, "dream", 1, ["<|beginoftext|>"], ["<|endoftext|>"]),
    "dream-v0-7b-instruct": (dream_v0, "dream", 1, ["<|endoftext|>"], ["<|endoftext|>"]),
    "diffucoder-7b-instruct": (diffucoder, "dream", 1, ["<|endoftext|>"], ["<|endoftext|>"]),
    "dreamon-7b": (dreamon, "dream", 1, ["<|beginoftext|>"], ["<|endoftext|>"]),
    "open-dcoder-0.5b": (open_dcoder, "qwen2", 1, [], []),
    "coda-1.7b-instruct": (coda, "coda", 1, [], []),
}


def unsupported(directory: Path, kind: str) -> Path:
    """A checkpoint whose config.json names a family this engine refuses (the rest is a Dream layout)."""
    dream_coder(directory)
    config = json.loads((directory / "config.json").read_text())
    config.update({
        # [Fast-dLLM-v2-cfg]
        "fast-dllm-v2": {"model_type": "Fast_dLLM_Qwen", "architectures": ["Fast_dLLM_QwenForCausalLM"],
                         "bd_size": 32},
        # [SDAR-code]
        "sdar": {"model_type": "sdar", "architectures": ["SDARForCausalLM"]},
        # [LLaDA-MoE-code]
        "llada-moe": {"model_type": "llada", "num_experts": 64, "num_experts_per_tok": 8, "moe_layer_freq": 1},
    }[kind])
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory
