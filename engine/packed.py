"""4-bit weights on disk, unpacked to float at load (and on a CPU also multiplied as they are:
`Int4Linear`): how the bundled model fits in 64 MiB.

A matrix is cut into groups of 32 consecutive weights of a row. Each group has a step `d` and a
minimum `m`, and each weight is stored as a code q in 0..15: w = m + q * d. That is llama.cpp's
Q4_1, except that `d` and `m` take one byte each instead of two: `d` as a multiple of a step
per row (its largest `d` / 255), and `m` as a zero point, m = -zero / 17 * d with zero in 0..255
(groups that hold 0 have m in [-15d, 0]). 4.5 bits a weight in all, against Q4_1's 5. Stored in
safetensors under the weight's name with the suffixes below; `unpack` restores the float matrix.

Measured on SmolLM2-135M's Q4_1 layers (engine/training/pretrained.py), the one-byte `d` and `m`
cost 0.001 nats of next-token cross-entropy on held-out code; requantizing the same layers to
Q4_1 in groups of 64 instead cost 0.28.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CheckpointError
from .model import CONTEXT_ROWS, Transformer

GROUP = 32
SUFFIXES = (".q4", ".d", ".d_step", ".zero")  # codes (two a byte), steps, step per row, zero points


def pack(weight: Tensor) -> dict[str, Tensor]:
    """A float matrix (rows, columns; columns a multiple of 32) as 4-bit codes with their scales,
    keyed by suffix."""
    rows, columns = weight.shape
    if columns % GROUP:
        raise ValueError(f"{columns} columns are not a multiple of the group size {GROUP}")
    groups = weight.float().reshape(rows, columns // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    d_step = ((high - low) / 15).amax(-1, keepdim=True).clamp_min(1e-12) / 255
    d_code = ((high - low) / 15 / d_step).round().clamp(0, 255)
    d = d_code * d_step
    zero = (-low / d.clamp_min(1e-12) * 17).round().clamp(0, 255)
    q = ((groups + zero[..., None] / 17 * d[..., None]) / d.clamp_min(1e-12)[..., None]).round().clamp(0, 15)
    q = q.to(torch.uint8).reshape(rows, columns)
    return {".q4": q[:, 0::2] | (q[:, 1::2] << 4), ".d": d_code.to(torch.uint8),
            ".d_step": d_step, ".zero": zero.to(torch.uint8)}


def _codes_and_scales(parts: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The codes (rows, columns) as uint8, and each group's step and minimum (rows, groups)."""
    packed = parts[".q4"]
    q = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
    d = parts[".d"].float() * parts[".d_step"]
    return q, d, -parts[".zero"].float() / 17 * d


def unpack(parts: dict[str, Tensor]) -> Tensor:
    """The float32 matrix that `pack` stored."""
    q, d, low = _codes_and_scales(parts)
    groups = q.float().reshape(q.shape[0], -1, GROUP) * d[..., None] + low[..., None]
    return groups.reshape(q.shape)


def unpack_all(weights: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Restore every packed matrix in `weights` as a float one under its own name; return the
    packed parts by name (for `Int4Linear`)."""
    names = [name[:-len(".q4")] for name in weights if name.endswith(".q4")]
    packed = {}
    for name in names:
        missing = [name + suffix for suffix in SUFFIXES if name + suffix not in weights]
        if missing:
            raise CheckpointError(f"the 4-bit weight {name} lacks {missing[0]}")
        packed[name] = {suffix: weights.pop(name + suffix) for suffix in SUFFIXES}
        try:
            weights[name] = unpack(packed[name])
        except RuntimeError as err:  # parts whose shapes disagree
            raise CheckpointError(f"the 4-bit weight {name} is malformed: {err}") from None
    return packed


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


class Int4Linear(nn.Module):
    """A linear layer stored 4-bit that multiplies its codes as they are where that is faster.

    A decode step feeds a few rows, and on a CPU its time is reading the weights: torch's int4
    kernel (the one torchao's CPU layout calls) reads an eighth of the float bytes, in bfloat16
    activations. A context feeds hundreds of rows, which a float weight multiplies faster: in
    `context_dtype`, bfloat16 where the CPU multiplies it in hardware.
    On 2 cores, 210 matrices of the bundled model's shapes: 11.6 ms against 29.3 in float for one
    row, 45 against 90 for 16, 92 against 97 for 32, 188 against 135 for 64. With AMX, a matrix
    of 64 to 256 rows takes a third to two fifths of its fp32 time in bfloat16.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, parts: dict[str, Tensor],
                 context_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(context_dtype), persistent=False)
        self.bias = bias
        q, d, low = _codes_and_scales(parts)
        self.register_buffer("codes", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1),
                             persistent=False)
        # The kernel's weight is (q - 8) * scale + zero, per group of input columns: (groups, rows, 2).
        scales = torch.stack((d, low + 8 * d), dim=-1).transpose(0, 1)
        self.register_buffer("scales_and_zeros", scales.contiguous().bfloat16(), persistent=False)

    @staticmethod
    def fits(weight: Tensor) -> bool:
        """Whether the kernel takes this shape (rows in sixteens)."""
        return weight.device.type == "cpu" and weight.shape[0] % 16 == 0

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > CONTEXT_ROWS:
            out = F.linear(x.to(self.weight.dtype), self.weight)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(rows, -1).bfloat16(), self.codes, GROUP, self.scales_and_zeros)
            out = out.reshape(*x.shape[:-1], -1)
        out = out.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)


# Layers a block's input feeds side by side, which one 4-bit layer computes at once (in the
# order of the fused layer's output columns).
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def use_int4_kernels(model: Transformer, packed: dict[str, dict[str, Tensor]],
                     context_dtype: torch.dtype = torch.float32) -> None:
    """Swap each linear layer of `model` whose weight was stored 4-bit for an `Int4Linear`, in
    place (a head tied to a 4-bit embedding too); the layers of each `FUSED` group become one.
    A step of the bundled model on 2 cores makes 121 calls instead of 211."""
    if model.config.tie_embeddings and "model.embed_tokens.weight" in packed:
        packed = {**packed, "lm_head.weight": packed["model.embed_tokens.weight"]}
    for i, block in enumerate(model.model.layers):
        for fused, members in FUSED.items():
            names = [f"model.layers.{i}.{member}" for member in members]
            linears = [block.get_submodule(member) for member in members]
            if all(name + ".weight" in packed and Int4Linear.fits(linear.weight)
                   for name, linear in zip(names, linears)):
                parts = {suffix: torch.cat([packed[name + ".weight"][suffix] for name in names])
                         for suffix in SUFFIXES}
                biases = [linear.bias for linear in linears]
                layer = Int4Linear(torch.cat([linear.weight for linear in linears]),
                                   None if biases[0] is None else torch.cat(biases), parts, context_dtype)
                parent, _, attribute = fused.rpartition(".")  # an attribute that was None: not set_submodule
                setattr(block.get_submodule(parent), attribute, layer)
                for member in members:
                    parent, _, attribute = member.rpartition(".")
                    delattr(block.get_submodule(parent), attribute)
    for name, module in list(model.named_modules()):
        parts = packed.get(name + ".weight")
        if isinstance(module, nn.Linear) and parts is not None and Int4Linear.fits(module.weight):
            model.set_submodule(name, Int4Linear(module.weight, module.bias, parts, context_dtype))
    # A context's activations then take the faster dtype too, unless a float layer is left that
    # would get them in the wrong one.
    if not any(isinstance(module, nn.Linear) for module in model.modules()):
        model.context_dtype = context_dtype
