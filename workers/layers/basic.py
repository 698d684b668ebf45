"""The small layers of a Llama-family decoder: RMSNorm (optionally fused with the residual
add), the rotary tables, and a linear layer whose output is several checkpoint tensors side by
side (QKV, gate/up), loaded part by part. The arithmetic is the kernel set's (`ops`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.config import RopeConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with `residual`: (norm(x + residual), x + residual)."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class MergedLinear(nn.Module):
    """y = x W^T (+ b) where W stacks the rows of several checkpoint tensors (q, k, v or gate, up).

    Each part is `(checkpoint_rows, start, rows)`: this layer holds rows [start, start + rows) of a
    checkpoint tensor of `checkpoint_rows` rows (all of them without tensor parallelism; a rank's
    share with it, see workers/layers/parallel.py). A plain int means the whole tensor."""

    def __init__(self, in_features: int, parts: list[int | tuple[int, int, int]], bias: bool):
        super().__init__()
        self.parts = [(p, 0, p) if isinstance(p, int) else tuple(p) for p in parts]
        self.part_sizes = [rows for _, _, rows in self.parts]
        self.offsets = [0]
        for size in self.part_sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.weight = nn.Parameter(torch.empty(self.offsets[-1], in_features))
        self.bias = nn.Parameter(torch.empty(self.offsets[-1])) if bias else None

    def load_part(self, part: int, name: str, tensor) -> None:
        from workers.layers.parallel import read_rows, shape_of

        target = self.weight if name == "weight" else self.bias
        checkpoint_rows, start, rows = self.parts[part]
        if shape_of(tensor)[0] != checkpoint_rows:
            raise ValueError(f"part {part} of {name}: expected {checkpoint_rows} rows, got {shape_of(tensor)}")
        lo = self.offsets[part]
        target.data[lo : lo + rows].copy_(read_rows(tensor, start, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryTables(nn.Module):
    """float32 cos/sin of every position, [max_positions, head_dim] (halves duplicated, as HF)."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, rope)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
