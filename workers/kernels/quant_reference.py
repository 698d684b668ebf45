"""Pure-torch references of the quantized matmuls: the layouts every quantized weight is stored
in, the oracle the Triton kernels (GPU) and the aten weight-only kernels (CPU) are tested against.

Layouts (a linear layer y = x W^T with W of shape [N, K]: N output rows, K input columns):

- **int4, group-wise, asymmetric** (W4A16; GGUF Q4_0 and Q4_1 map onto it exactly, group 32):
  `qweight` uint8 [N, K // 2], two 4-bit codes per byte: column 2j in the low nibble, 2j + 1 in the
  high nibble. `scales` and `zeros` [N, K // group_size] in the activation dtype (or float32), and
  W[n, k] = (q[n, k] - 8) * scales[n, g] + zeros[n, g] with g = k // group_size
  (gpt-fast's and aten's `_weight_int4pack_mm` convention: Q4_1's d*q + m is (q - 8)*d + (m + 8d);
  Q4_0's d*(q - 8) has zero 0).
- **int8, group-wise, symmetric** (W8A16; GGUF Q8_0 is group 32; per-channel is group_size = K):
  `qweight` int8 [N, K], `scales` [N, K // group_size], W[n, k] = q[n, k] * scales[n, g].
- **fp8 E4M3, per output channel** (W8A8 on Hopper, weight-only below it): `qweight`
  float8_e4m3fn [N, K], `scales` float32 [N], W[n, k] = q[n, k] * scales[n].

These functions dequantize and multiply in float32, then cast to x's dtype: slow and exact, for
tests and as the definition of what the fast kernels compute.
"""

from __future__ import annotations

import torch


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> int codes 0..15 as uint8 [N, K] (low nibble first)."""
    low = qweight & 0x0F
    high = qweight >> 4
    return torch.stack((low, high), dim=-1).reshape(qweight.shape[0], -1)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int codes 0..15, [N, K] (K even) -> uint8 [N, K // 2] (column 2j low nibble, 2j + 1 high)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {codes.shape[-1]}")
    c = codes.to(torch.uint8).reshape(codes.shape[0], -1, 2)
    return c[..., 0] | (c[..., 1] << 4)


def _expand(groupwise: torch.Tensor, k: int) -> torch.Tensor:
    """[N, K // G] -> [N, K], each group's value repeated over its G columns."""
    return groupwise.float().repeat_interleave(k // groupwise.shape[-1], dim=-1)


def dequant_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    q = unpack_int4(qweight).float()
    k = q.shape[-1]
    return (q - 8.0) * _expand(scales, k) + _expand(zeros, k)


def dequant_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * _expand(scales, qweight.shape[-1])


def dequant_fp8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scales.float()[:, None]


def w4a16_matmul(x: torch.Tensor, qweight, scales, zeros) -> torch.Tensor:
    return (x.float() @ dequant_int4(qweight, scales, zeros).T).to(x.dtype)


def w8a16_matmul(x: torch.Tensor, qweight, scales) -> torch.Tensor:
    return (x.float() @ dequant_int8(qweight, scales).T).to(x.dtype)


def fp8_matmul(x: torch.Tensor, qweight, scales) -> torch.Tensor:
    return (x.float() @ dequant_fp8(qweight, scales).T).to(x.dtype)


# Round-to-nearest quantizers into the layouts above (a calibrated method, e.g. AWQ, transforms the
# float weights first and then calls these).


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide the {k} input columns")
    return w.float().reshape(n, k // group_size, group_size)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max RTN: (qweight uint8 [N, K // 2], scales, zeros [N, K // G] float32)."""
    g = _groups(w, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / 15.0).clamp_min(1e-10)
    codes = torch.round((g - lo[..., None]) / scales[..., None]).clamp_(0, 15)
    return pack_int4(codes.reshape(w.shape)), scales, lo + 8.0 * scales


def quantize_int8(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax RTN: (qweight int8 [N, K], scales [N, K // G] float32)."""
    g = _groups(w, group_size)
    scales = (g.abs().amax(-1) / 127.0).clamp_min(1e-10)
    codes = torch.round(g / scales[..., None]).clamp_(-127, 127)
    return codes.reshape(w.shape).to(torch.int8), scales


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel absmax to E4M3's largest finite value 448: (qweight, scales float32 [N])."""
    wf = w.float()
    scales = (wf.abs().amax(-1) / 448.0).clamp_min(1e-12)
    return (wf / scales[:, None]).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn), scales
