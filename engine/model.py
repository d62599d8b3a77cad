"""A bidirectional Llama/Qwen2 transformer for masked-diffusion LMs (LLaDA, Dream, DiffuCoder).

Module names mirror the Hugging Face checkpoints, so a safetensors state dict loads as is.
Every forward writes its keys and values into a `KVCache` at the tokens' positions and then
attends over the whole cache: a full forward fills it, and a denoising step that feeds only
the masked window reuses the context's cached keys (Fast-dLLM's dual cache). With
`causal=True` the same network serves as the autoregressive baseline.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

# A forward of more rows than this is a context (a decode step feeds a few): on a CPU it can
# compute in a faster dtype (Transformer.context_dtype) and multiply float weights (packed.py).
CONTEXT_ROWS = 16


class KVCache:
    """Per-layer keys and values, shape (batch, kv_heads, slots, head_dim)."""

    def __init__(self, config: ModelConfig, batch: int, slots: int, device, dtype):
        shape = (batch, config.num_kv_heads, slots, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]

    @property
    def slots(self) -> int:
        return self.k[0].shape[2]

    @classmethod
    def of(cls, k: list[Tensor], v: list[Tensor]) -> KVCache:
        cache = cls.__new__(cls)
        cache.k, cache.v = k, v
        return cache

    def rows(self, start: int, end: int) -> KVCache:
        """A view of rows [start, end): writes through to this cache."""
        return KVCache.of([k[start:end] for k in self.k], [v[start:end] for v in self.v])

    def expand(self, batch: int) -> KVCache:
        """A one-row cache repeated for `batch` rows (candidates of one request), as a copy."""
        return KVCache.of([k.expand(batch, -1, -1, -1).contiguous() for k in self.k],
                          [v.expand(batch, -1, -1, -1).contiguous() for v in self.v])


def rope_inv_freq(config: ModelConfig) -> Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in the Llama layout (halves of the head dimension paired); `sin` has its first half
    negated, so the rotation is one roll (a third faster than slicing and concatenating)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean attention mask as the scores' 0 (attend) or -inf (not)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -torch.inf)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # torch's own op (in float32 inside): one call where the spelled-out norm made seven.
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        hidden, bias = config.hidden_size, config.qkv_bias
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=config.o_bias)
        norm = (lambda: RMSNorm(self.head_dim, config.rms_norm_eps)) if config.qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        # For inference, q, k and v can be one layer (packed.py fuses them): a step then makes one
        # call where it made three.
        self.qkv_proj: nn.Module | None = None
        self.qkv_sizes = (self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim)

    def forward(self, x, cos, sin, k_cache, v_cache, write_index, kv_len, attn_mask, causal, rows):
        """Writes keys and values of all of `x` into the cache (without one, attends over them
        alone); queries only `rows` of `x` when given."""
        b, t, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        k = self.k_norm(k.view(b, t, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        k = rotary(k, cos, sin)
        if k_cache is not None:
            k_cache.scatter_(2, write_index, k.to(k_cache.dtype))
            v_cache.scatter_(2, write_index, v.to(v_cache.dtype))
            k, v = k_cache[:, :, :kv_len].to(x.dtype), v_cache[:, :, :kv_len].to(x.dtype)
        if rows is not None:
            q, cos, sin = q[:, rows], cos[:, :, rows], sin[:, :, rows]
        r = q.shape[1]
        q = self.q_norm(q.view(b, r, self.heads, self.head_dim)).transpose(1, 2)
        q = rotary(q, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=self.heads != self.kv_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, r, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up as one layer, as qkv_proj

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, write_index, kv_len, attn_mask, causal, rows=None):
        attended = self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache,
                                  write_index, kv_len, attn_mask, causal, rows)
        x = (x if rows is None else x[:, rows]) + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        # The activations' dtype in a context's forward, where it differs from the weights' (bf16
        # on a CPU that multiplies it in hardware: packed.py); its keys are cached in `dtype`.
        self.context_dtype: torch.dtype | None = None

    def forward(self, tokens: Tensor, positions: Tensor, cache: KVCache | None, *, rows: Tensor | None = None,
                kv_len: int | None = None, attn_mask: Tensor | None = None, causal: bool = False,
                block_start: Tensor | None = None) -> Tensor:
        """Hidden states (batch, len, hidden) of `tokens` at `positions` (both (batch, len)).

        Keys and values are written into `cache` at `positions`; attention covers the first
        `kv_len` cache slots (all by default), restricted by the boolean `attn_mask`
        (batch, 1, 1, slots) where rows are padded. Without a cache (training) attention covers
        the tokens themselves, `attn_mask` then (batch, 1, 1, len). With `rows` (indices into len), only those
        rows' hidden states are computed in the last layer and returned: every layer's keys
        are still written, and the last layer's queries and MLP run on `rows` alone. With
        `causal` and `block_start` (batch,), queries at that position or later see every key:
        a context-causal model's masked middle (Family.context_causal).
        """
        x = self.model.embed_tokens(tokens)
        if self.context_dtype is not None and tokens.numel() > CONTEXT_ROWS:
            x = x.to(self.context_dtype)
        freqs = positions[..., None].float() * self.inv_freq
        cos = torch.cat((freqs, freqs), dim=-1)[:, None].cos().to(x.dtype)
        sin = torch.cat((-freqs, freqs), dim=-1)[:, None].sin().to(x.dtype)  # see rotary
        b, t = tokens.shape
        write_index = positions[:, None, :, None].expand(b, self.config.num_kv_heads, t, self.config.head_dim)
        kv_len = kv_len or (cache.slots if cache is not None else t)
        layer_caches = zip(cache.k, cache.v) if cache is not None else [(None, None)] * len(self.model.layers)
        last = len(self.model.layers) - 1
        last_mask, last_causal = attn_mask, causal
        if causal and (cache is not None or rows is not None or block_start is not None):
            # is_causal assumes square attention from position 0: against a cache, or for some
            # rows only, each query sees the keys at its position and before, spelled out.
            keys = torch.arange(kv_len, device=positions.device)
            seen = keys <= positions[:, None, :, None]
            if block_start is not None:
                seen = seen | (positions >= block_start[:, None])[:, None, :, None]
            attn_mask, causal = seen if attn_mask is None else seen & attn_mask, False
            last_mask, last_causal = attn_mask if rows is None else attn_mask[:, :, rows], False
        # Attention turns a boolean mask into an additive one in every layer: once here instead.
        attn_mask, last_mask = additive(attn_mask, x.dtype), additive(last_mask, x.dtype)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.model.layers, layer_caches)):
            if i == last:
                attn_mask, causal = last_mask, last_causal
            x = layer(x, cos, sin, k_cache, v_cache, write_index, kv_len, attn_mask, causal,
                      rows if i == last else None)
        return self.model.norm(x).to(self.dtype)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (an int8 head or layer still computes in it)."""
        return self.model.embed_tokens.weight.dtype

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden).float()

    def new_cache(self, batch: int, slots: int) -> KVCache:
        return KVCache(self.config, batch, slots, self.device, self.dtype)
