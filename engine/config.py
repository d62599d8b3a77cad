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
    """What differs between open masked-diffusion model families beyond the architecture."""

    style: str  # "llama" or "qwen2": decides QKV bias defaults and weight names
    logit_shift: int  # 1: position i-1 predicts token i (Dream family); 0: position i (LLaDA)
    eos_after_suffix: bool  # whether the infill layout closes the suffix with EOS


# model_type in config.json -> family. Dream, Dream-Coder, DiffuCoder and Open-dCoder are
# Qwen2 networks trained with shifted logits; LLaDA is Llama-like and unshifted.
FAMILIES = {
    "llama": Family("llama", logit_shift=0, eos_after_suffix=False),
    "llada": Family("llama", logit_shift=0, eos_after_suffix=False),
    "qwen2": Family("qwen2", logit_shift=1, eos_after_suffix=True),
    "dream": Family("qwen2", logit_shift=1, eos_after_suffix=True),
}

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

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def parameters(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = h * (q + 2 * kv) + q * h + (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        layer = attention + 3 * h * self.intermediate_size + 2 * h
        return self.vocab_size * h * (1 if self.tie_embeddings else 2) + self.num_layers * layer + h

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        model_type = str(cfg.get("model_type", "")).lower()
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
                o_bias=style == "llama" and bool(cfg.get("attention_bias", False)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except KeyError as missing:
            raise CheckpointError(f"config.json lacks the key {missing.args[0]!r}") from None

    def to_hf(self) -> dict:
        """The config.json that `from_hf` reads back (used when we write checkpoints)."""
        rope = {"rope_type": "default", **self.rope_scaling, "rope_theta": self.rope_theta}
        return {
            "model_type": self.model_type,
            "architectures": ["Qwen2ForCausalLM" if self.family.style == "qwen2" else "LlamaForCausalLM"],
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


# Every model shape by name: `lacuna bench --shape` builds random weights of one, `lacuna train
# model --config` trains one.
PRESETS = {
    # For tests and quick benchmarks: a CPU runs and trains it in milliseconds a step.
    "tiny": ModelConfig("qwen2", 512, 128, 352, 2, 4, 2, 32, 4096, qkv_bias=True, tie_embeddings=True),
    # Qwen2.5-0.5B / Qwen2.5-Coder-0.5B: the shape of Open-dCoder-0.5B.
    "0.5b": ModelConfig("qwen2", 151936, 896, 4864, 24, 14, 2, 64, 32768, rope_theta=1e6,
                        qkv_bias=True, tie_embeddings=True),
    # Qwen2.5-7B: the shape of Dream-v0-7B, Dream-Coder-7B and DiffuCoder-7B.
    "7b": ModelConfig("qwen2", 152064, 3584, 18944, 28, 28, 4, 128, 131072, rope_theta=1e6,
                      qkv_bias=True),
    # The bundled model: ~29.9M parameters, 59.8 MB in fp16 with tied embeddings (under 64 MB with
    # its tokenizer). Qwen2 style (shifted logits, QKV bias), as Dream and DiffuCoder; 1024 positions
    # cover the server's default context (512 prefix tokens, the suffix, a 64-token block).
    "bundled": ModelConfig("qwen2", vocab_size=12288, hidden_size=512, intermediate_size=1408, num_layers=8,
                           num_heads=8, num_kv_heads=4, head_dim=64, max_position_embeddings=1024,
                           rope_theta=10000.0, qkv_bias=True, tie_embeddings=True),
    # What 2 CPU cores can train while no GPU is available: ~6.3M parameters (3.1M of them
    # the embedding), about 2,000 tokens/s to train there. 256 positions: the server fits its context
    # to them (about 1,000 characters around the cursor), and rows of 256 tokens let a weak model find
    # its neighbours sooner than rows of 512 (the first CPU runs at 512 stayed at the unigram level).
    "cpu": ModelConfig("qwen2", vocab_size=12288, hidden_size=256, intermediate_size=768, num_layers=4,
                       num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=256,
                       rope_theta=10000.0, qkv_bias=True, tie_embeddings=True),
}
