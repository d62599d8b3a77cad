"""Model configuration: one dataclass for every supported masked-diffusion family.

A checkpoint's `config.json` (Hugging Face layout) is mapped onto `ModelConfig` by
`ModelConfig.from_hf`; the family decides the logit shift and the infill layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names what is wrong."""


@dataclass(frozen=True)
class Family:
    """What differs between open masked-diffusion model families beyond the architecture: the
    logit shift and the infill layout `[BOS] prefix MASK*N suffix [EOS]` each was trained with."""

    style: str  # "llama", "qwen2" or "qwen3": decides QKV bias defaults and q/k norms
    logit_shift: int  # 1: position i-1 predicts token i (Dream family); 0: position i (LLaDA)
    bos: bool  # whether the layout starts with the BOS token
    eos_after_suffix: bool  # whether the layout closes the suffix with EOS
    mask_tokens: tuple[str, ...] = ()  # the family's mask token, found by name when no config gives its id
    mask_hint: str = "set mask_token_id in config.json"  # where the family's checkpoints name the mask
    stop_tokens: tuple[str, ...] = ()  # tokens besides EOS and pad that end an answer
    # Trained on whole tokenized documents, the model never saw a token boundary at a cursor: the
    # engine heals it (Engine.submit). Lacuna's models train on prefix, middle and suffix
    # tokenized apart, as the server sends them, and need no healing.
    token_healing: bool = True
    # The unmasking order the family's authors decode with, used when a request names none.
    ordering: str = "confidence"
    # How the "steps" policy spreads the masked tokens over the steps, as the family's own decoder
    # does (engine.sampler.SCHEDULES): "even", LLaDA's split (generate.py's get_num_transfer_tokens);
    # "dream", Dream's (generation_utils.py's _sample: int(m * (1 - s / t)) of the m masks left
    # over timesteps linspace(1, 1e-3, steps + 1), the rest at the last step).
    schedule: str = "even"
    # An autoregressive network run causally: each position sees only those before it, so only
    # the leftmost masked token can be predicted, one a step, from the prefix alone (the suffix
    # shapes the answer through the language server's post-processing only).
    causal: bool = False
    # A context-causal diffusion model (NBDiff, Fast-dLLM v2's blocks): its context attends
    # causally, as the autoregressive model it was adapted from, and only the masked middle, last
    # in the layout, attends both ways. Its context's keys depend on nothing after them.
    context_causal: bool = False
    # Suffix-prefix-middle layout (the FIM paper's SPM): `suffix SEP prefix MASK*N`, SEP being this
    # token, so that typing at the cursor only appends to the context; "" for `prefix MASK*N suffix`.
    spm_separator: str = ""
    # An autoregressive fill-in-the-middle coder's sentinels, in the order its prompt puts them:
    # `PRE prefix SUF suffix MID`, then the middle is written left to right (a causal family: it reads
    # the suffix through the prompt). () for the layouts above.
    fim: tuple[str, ...] = ()


# model_type in config.json -> family. Where each fact was read: tests/published.py.
FAMILIES = {
    # Dream-v0, Dream-Coder, DiffuCoder, DreamOn ("Dream"): Qwen2.5 networks, shifted logits; DreamOn's
    # infilling layout is [BOS] prefix masks suffix [EOS]. Dream's and DiffuCoder's READMEs decode
    # with alg="entropy"; the _sample of Dream's generation_utils.py (as Dream-Coder publishes it)
    # spreads the masks by Dream's schedule.
    "dream": Family("qwen2", 1, bos=True, eos_after_suffix=True, mask_tokens=("<|mask|>",),
                    mask_hint="Dream-family checkpoints give mask_token_id in config.json (<|mask|>, 151666)",
                    ordering="entropy", schedule="dream"),
    # Open-dCoder: a Qwen2 checkpoint, shifted logits; its infill evaluation feeds prefix masks
    # suffix with no BOS or EOS, and its mask `<M>` exists only as an added token. It decodes by
    # confidence (alg="p2"), as LLaDA does (low-confidence remasking).
    "qwen2": Family("qwen2", 1, bos=False, eos_after_suffix=False, mask_tokens=("<M>", "<|mask|>"),
                    mask_hint="Open-dCoder adds <M> to the tokenizer (151665)"),
    # LLaDA: Llama blocks under OLMo names (see `_llada_keys`), logits not shifted.
    "llada": Family("llama", 0, bos=True, eos_after_suffix=False, mask_tokens=("<|mdm_mask|>",),
                    mask_hint="LLaDA checkpoints give mask_token_id in config.json (<|mdm_mask|>, 126336)",
                    stop_tokens=("<|eot_id|>",)),
    # CoDA (Salesforce): Qwen3 layers (q/k norms), shifted logits, bidirectional. It publishes no
    # infill code; pre-training saw documents without BOS, so prefix masks suffix, as Open-dCoder.
    # Its serving code decodes with alg="entropy", and its generation_utils.py with Dream's schedule.
    "coda": Family("qwen3", 1, bos=False, eos_after_suffix=False, mask_tokens=("<|mask|>",),
                   mask_hint="CoDA gives mask_token_id in config.json (<|mask|>, 151669)", ordering="entropy",
                   schedule="dream"),
    "llama": Family("llama", 0, bos=True, eos_after_suffix=False),
    # The bundled model (engine/bundled): SmolLM2-135M-Instruct, an autoregressive Llama trained on
    # whole documents, whose chat turns end with <|im_end|>.
    "llama_causal": Family("llama", 1, bos=False, eos_after_suffix=False, stop_tokens=("<|im_end|>",),
                           ordering="left_to_right", causal=True),
    # The bundled model adapted to masked-diffusion infilling (`lacuna train adapt`): SmolLM2's
    # Llama, shifted logits, context-causal, suffix-prefix-middle with <file_sep> between them (the
    # token its pre-training put between files of one repository). It decodes left to right, as
    # its autoregressive start reads best (the confident run after the leftmost mask kept a step).
    "llama_spm": Family("llama", 1, bos=False, eos_after_suffix=False, stop_tokens=("<|im_end|>",),
                        ordering="left_to_right", context_causal=True, spm_separator="<file_sep>"),
    # Qwen2.5-Coder (base), fill-in-the-middle: a Qwen2 checkpoint whose tokenizer holds the FIM
    # sentinels and no mask (the loader tells it from Open-dCoder's `qwen2`, see `fim_variant`). Its
    # card's prompt is `<|fim_prefix|>` prefix `<|fim_suffix|>` suffix `<|fim_middle|>`, and its
    # generation stops at the ids it lists: <|endoftext|>, the FIM tokens, <|repo_name|>,
    # <|file_sep|>, <|im_end|>. FIM training tokenizes the middle apart from the prefix: no healing.
    # It has no mask token; its masks are never fed, so the first embedding row the tokenizer lacks
    # holds them (else <|fim_pad|>).
    "qwen2_fim": Family("qwen2", 1, bos=False, eos_after_suffix=False, mask_tokens=("<|fim_pad|>",),
                        mask_hint="a fill-in-the-middle model's masks take an unused embedding row or <|fim_pad|>",
                        stop_tokens=("<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<|fim_prefix|>",
                                     "<|fim_suffix|>", "<|fim_middle|>", "<|im_end|>"),
                        token_healing=False, ordering="left_to_right", causal=True,
                        fim=("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")),
    # Lacuna's own models (`lacuna train`): Qwen2 blocks, shifted, [BOS] prefix masks suffix [EOS].
    "lacuna": Family("qwen2", 1, bos=True, eos_after_suffix=True, token_healing=False, ordering="left_to_right"),
}

# Open diffusion coders whose layout is known and that this engine cannot run, by model_type.
BLOCK_DIFFUSION = "a block-diffusion model: it decodes block by block with block-causal attention and a per-block " \
                  "KV cache, which this engine (one masked span, bidirectional) does not do"
UNSUPPORTED = {
    "fast_dllm_qwen": f"Fast-dLLM v2 is {BLOCK_DIFFUSION}",
    "sdar": f"SDAR is {BLOCK_DIFFUSION}",
    "sdar_moe": f"SDAR-MoE is {BLOCK_DIFFUSION}",
    "lladamoe": "LLaDA-MoE is a mixture of experts, which this engine's model lacks",
    # StarCoder2 (a fill-in-the-middle coder: <fim_prefix>, <fim_suffix>, <fim_middle>): its blocks,
    # read from transformers' modeling_starcoder2.py, are not this engine's Llama/Qwen ones.
    "starcoder2": "StarCoder2's blocks are not this engine's: they need LayerNorm with a bias (norm_type "
                  "layer_norm) where it has RMSNorm, an MLP c_fc -> gelu_pytorch_tanh -> c_proj where it has "
                  "SwiGLU, a bias on every linear layer (use_bias) and sliding-window attention (sliding_window)",
}

# A published model_type whose checkpoints are either this family or a fill-in-the-middle coder,
# told apart by the tokenizer (engine.loader): the FIM variant of each.
FIM_VARIANTS = {"qwen2": "qwen2_fim"}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)
    qkv_bias: bool = False  # Qwen2 always; Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias only
    tie_embeddings: bool = False
    qk_norm: bool = False  # Qwen3: queries and keys RMS-normalised per head before RoPE

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def parameters(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = h * (q + 2 * kv) + q * h + (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        layer = attention + 3 * h * self.intermediate_size + 2 * h + 2 * self.head_dim * self.qk_norm
        return self.vocab_size * h * (1 if self.tie_embeddings else 2) + self.num_layers * layer + h

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        model_type = str(cfg.get("model_type", "")).lower()
        if model_type == "llada" and "num_experts" in cfg:  # LLaDA-MoE's config says "llada" too
            model_type = "lladamoe"
        if model_type in UNSUPPORTED:
            raise CheckpointError(f"unsupported model: {UNSUPPORTED[model_type]}")
        if model_type == "llada" and "d_model" in cfg:
            cfg = _llada_keys(cfg)
        if model_type not in FAMILIES:
            raise CheckpointError(
                f"unsupported architecture: model_type {model_type!r} "
                f"(supported: {', '.join(sorted(FAMILIES))})"
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            # transformers 5 moved rope_theta and rope_scaling into rope_parameters.
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise CheckpointError(f"unsupported rope scaling type {rope_type!r} in config.json")
            style = FAMILIES[model_type].style
            return cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling={} if rope_type == "default" else {**rope, "rope_type": rope_type},
                qkv_bias=style == "qwen2" or bool(cfg.get("attention_bias", False)),
                o_bias=style in ("llama", "qwen3") and bool(cfg.get("attention_bias", False)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qk_norm=style == "qwen3",
            )
        except KeyError as missing:
            raise CheckpointError(f"config.json lacks the key {missing.args[0]!r}") from None

    def to_hf(self) -> dict:
        """The config.json that `from_hf` reads back (used when we write checkpoints)."""
        rope = {"rope_type": "default", **self.rope_scaling, "rope_theta": self.rope_theta}
        return {
            "model_type": self.model_type,
            "architectures": [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(self.family.style,
                                                                                           "LlamaForCausalLM")],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "attention_bias": self.o_bias,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
        }


# LLaDA's config.json (OLMo style) -> (key, the value this engine's Llama blocks need, what the
# published LLaDA-8B config says, with OLMo's default when the key is absent).
LLADA_REQUIRED = [("block_type", "llama", "sequential"), ("layer_norm_type", "rms", "default"),
                  ("activation_type", "silu", "swiglu"), ("rope", True, False), ("alibi", False, False),
                  ("include_bias", False, False), ("include_qkv_bias", False, False),
                  ("bias_for_layer_norm", False, None), ("attention_layer_norm", False, False),
                  ("scale_logits", False, False), ("input_emb_norm", False, False)]


def _llada_keys(cfg: dict) -> dict:
    """LLaDA's OLMo-style config.json in the Hugging Face Llama keys `from_hf` reads. Names and
    defaults follow LLaDA's configuration_llada.py; the embedding has `embedding_size` rows."""
    for key, needed, default in LLADA_REQUIRED:
        value = cfg.get(key, default)
        if (value or False) != needed:
            raise CheckpointError(f"unsupported LLaDA config: {key} is {value!r}, this engine needs {needed!r}")
    try:
        d_model, heads = int(cfg["d_model"]), int(cfg["n_heads"])
        return {**cfg,
                "hidden_size": d_model,
                "num_hidden_layers": cfg["n_layers"],
                "num_attention_heads": heads,
                "num_key_value_heads": cfg.get("n_kv_heads") or heads,
                "intermediate_size": cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * d_model,
                "vocab_size": cfg.get("embedding_size") or cfg["vocab_size"],
                "max_position_embeddings": cfg["max_sequence_length"],
                "rms_norm_eps": cfg.get("rms_norm_eps", 1e-5),
                "rope_theta": cfg.get("rope_theta", 10000.0),
                "tie_word_embeddings": cfg.get("weight_tying", True)}
    except KeyError as missing:
        raise CheckpointError(f"config.json (LLaDA) lacks the key {missing.args[0]!r}") from None


# Every model shape by name: `lacuna bench --shape` builds random weights of one, `lacuna train
# model --config` trains one.
PRESETS = {
    # For tests and quick benchmarks: a CPU runs and trains it in milliseconds a step.
    "tiny": ModelConfig("lacuna", 512, 128, 352, 2, 4, 2, 32, 4096, qkv_bias=True, tie_embeddings=True),
    # Qwen2.5-0.5B / Qwen2.5-Coder-0.5B: the shape of Open-dCoder-0.5B.
    "0.5b": ModelConfig("qwen2", 151936, 896, 4864, 24, 14, 2, 64, 32768, rope_theta=1e6,
                        qkv_bias=True, tie_embeddings=True),
    # Qwen2.5-7B: the shape of Dream-v0-7B, Dream-Coder-7B and DiffuCoder-7B.
    "7b": ModelConfig("dream", 152064, 3584, 18944, 28, 28, 4, 128, 131072, rope_theta=1e6,
                      qkv_bias=True),
    # A Lacuna model for a GPU run of `lacuna train model`: ~29.9M parameters, 59.8 MB in fp16 with
    # tied embeddings (under 64 MB with its tokenizer). Qwen2 style (shifted logits, QKV bias), as
    # Dream and DiffuCoder; 1024 positions cover the server's default context (512 prefix tokens,
    # the suffix, a 64-token block).
    "30m": ModelConfig("lacuna", vocab_size=12288, hidden_size=512, intermediate_size=1408, num_layers=8,
                       num_heads=8, num_kv_heads=4, head_dim=64, max_position_embeddings=1024,
                       rope_theta=10000.0, qkv_bias=True, tie_embeddings=True),
    # What 2 CPU cores can train while no GPU is available: ~6.3M parameters (3.1M of them
    # the embedding), about 2,000 tokens/s to train there. 256 positions: the server fits its context
    # to them (about 1,000 characters around the cursor), and rows of 256 tokens let a weak model find
    # its neighbours sooner than rows of 512 (the first CPU runs at 512 stayed at the unigram level).
    "cpu": ModelConfig("lacuna", vocab_size=12288, hidden_size=256, intermediate_size=768, num_layers=4,
                       num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=256,
                       rope_theta=10000.0, qkv_bias=True, tie_embeddings=True),
}
