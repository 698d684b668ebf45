"""Matrix-vector products over quantized weights (one row of x: batch-1 decode), on the layouts that
`triton_quant.prepare_*` makes. Beside the tiled kernel, which pads the row to a 16-row tensor-core
tile, these use no tensor cores: each program reads a [BLOCK_N, BLOCK_K] tile of weight bytes,
multiplies it by x in float32 registers and sums along K. Nothing is dequantized to memory or to
shared memory, so the bytes read are the weight's own; K is split over programs (the last of a
column block to finish sums the float32 partials, as in the tiled kernel) so that enough loads are
in flight to keep HBM busy.

- **int4**: a 4-bit code q becomes the float q exactly by OR-ing it into the mantissa of 2^23 and
  subtracting 2^23 (two full-rate instructions instead of a quarter-rate int-to-float convert);
  per group, s * sum(q x) + (z - 8 s) * sum(x).
- **int8**: per group, s * sum(q x).
- **fp8**: sum(q x) times the channel scale at the end.
- **float** (bf16/fp16 weights, no scale): the same loop, for layers left unquantized (the LM head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 1


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    ws_ptr,
    lock_ptr,
    N,
    K,
    stride_wn,
    stride_sg,
    tiles_per_split,
    GROUP_SIZE: tl.constexpr,
    KIND: tl.constexpr,  # 0: int4 (packed per UNIT columns), 1: int8 group-wise, 2: fp8 per channel, 3: float
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UNIT: tl.constexpr,  # columns that share one scale inside a tile (int4: its packing unit too)
    SPLIT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N
    k_tiles = K // BLOCK_K
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, k_tiles)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    UNITS: tl.constexpr = BLOCK_K // UNIT
    u = tl.arange(0, UNITS)
    if KIND == 0:
        # byte j of a packing unit holds its columns j (low nibble) and j + UNIT // 2 (high nibble)
        HALF: tl.constexpr = UNIT // 2
        j = tl.arange(0, HALF)
        for t in range(t0, t1):
            k0 = t * BLOCK_K
            xo = k0 + u[:, None] * UNIT + j[None, :]  # [UNITS, HALF]
            xl = tl.load(x_ptr + xo).to(tl.float32)
            xh = tl.load(x_ptr + xo + HALF).to(tl.float32)
            wo = k0 // 2 + u[:, None] * HALF + j[None, :]
            w = tl.load(w_ptr + n_offs[:, None, None] * stride_wn + wo[None, :, :], mask=n_mask[:, None, None], other=0)
            lo = ((w & 0xF).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            hi = ((w >> 4).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            d = tl.sum(lo * xl[None, :, :] + hi * xh[None, :, :], axis=2)  # [BLOCK_N, UNITS]
            g = (k0 + u * UNIT) // GROUP_SIZE
            so = g[None, :] * stride_sg + n_offs[:, None]
            s = tl.load(s_ptr + so, mask=n_mask[:, None], other=0.0)
            z = tl.load(z_ptr + so, mask=n_mask[:, None], other=0.0)
            xs = tl.sum(xl + xh, axis=1)  # [UNITS]
            acc += tl.sum(d * s + z * xs[None, :], axis=1)
    elif KIND == 1:
        j = tl.arange(0, UNIT)
        for t in range(t0, t1):
            k0 = t * BLOCK_K
            ko = k0 + u[:, None] * UNIT + j[None, :]  # [UNITS, UNIT]
            x = tl.load(x_ptr + ko).to(tl.float32)
            w = tl.load(w_ptr + n_offs[:, None, None] * stride_wn + ko[None, :, :], mask=n_mask[:, None, None], other=0)
            d = tl.sum(w.to(tl.float32) * x[None, :, :], axis=2)  # [BLOCK_N, UNITS]
            g = (k0 + u * UNIT) // GROUP_SIZE
            s = tl.load(s_ptr + g[None, :] * stride_sg + n_offs[:, None], mask=n_mask[:, None], other=0.0)
            acc += tl.sum(d * s, axis=1)
    else:
        kk = tl.arange(0, BLOCK_K)
        for t in range(t0, t1):
            k0 = t * BLOCK_K
            x = tl.load(x_ptr + k0 + kk).to(tl.float32)
            w = tl.load(w_ptr + n_offs[:, None] * stride_wn + (k0 + kk)[None, :], mask=n_mask[:, None], other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if SPLIT:
        num_splits = tl.num_programs(1)
        tl.store(ws_ptr + split * N + n_offs, acc, mask=n_mask)
        tl.debug_barrier()
        lock = lock_ptr + pid_n
        if tl.atomic_add(lock, 1, sem="acq_rel") == num_splits - 1:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for i in range(0, num_splits):
                acc += tl.load(ws_ptr + i * N + n_offs, mask=n_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(lock, 0)
            _store(acc, s_ptr, out_ptr, n_offs, n_mask, KIND)
    else:
        _store(acc, s_ptr, out_ptr, n_offs, n_mask, KIND)


@triton.jit
def _store(acc, s_ptr, out_ptr, n_offs, n_mask, KIND: tl.constexpr):
    if KIND == 2:
        acc *= tl.load(s_ptr + n_offs, mask=n_mask, other=0.0)
    tl.store(out_ptr + n_offs, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


# Per kind: (block_n, block_k, num_warps) for K up to 8192 and (block_n, block_k, num_warps, split_k)
# beyond: the best of a sweep on an H200 over the Llama-3-8B decode shapes (qkv, o, gate_up, down, the
# LM head). Short K runs best unsplit with
# 8-column blocks (enough programs already: N / 8 >= 512); long K (down: 14336) splits in four.
_SHORT_K = {0: (8, 2048, 4), 1: (8, 512, 4), 2: (8, 512, 4), 3: (8, 256, 4)}
_LONG_K = {0: (8, 2048, 4, 4), 1: (16, 256, 4, 16), 2: (16, 512, 8, 4), 3: (8, 256, 4, 4)}


def pick_gemv_config(n: int, k: int, kind: int, unit: int, device: torch.device) -> GemvConfig:
    """The tuned tiles for `kind` (see _SHORT_K), shrunk to fit K and the scale unit; eight warps
    where N is small (qkv, o: fewer, longer programs)."""
    if k > 8192:
        block_n, block_k, warps, split_k = _LONG_K[kind]
    else:
        (block_n, block_k, warps), split_k = _SHORT_K[kind], 1
        warps = 8 if n <= 8192 else warps
    while block_k > unit and (k % block_k or block_k % unit):
        block_k //= 2
    block_k = max(block_k, unit)
    n_blocks = triton.cdiv(n, block_n)
    if n_blocks * split_k < _num_sms(device):  # small layers: split K until every SM has work
        split_k = max(split_k, min(triton.cdiv(2 * _num_sms(device), n_blocks), k // block_k))
    return GemvConfig(block_n, block_k, min(split_k, max(1, k // block_k)), warps)


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor | None,
    z: torch.Tensor | None,
    n: int,
    k: int,
    group_size: int,
    kind: int,
    locks: torch.Tensor,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """y [1, n] = x [1, k] W^T over a prepared quantized weight (`triton_quant.prepare_*`)."""
    unit = min(group_size, 128) if kind in (0, 1) else 1
    cfg = config or pick_gemv_config(n, k, kind, unit, x.device)
    if kind >= 2:
        unit = cfg.block_k
    if k % cfg.block_k or cfg.block_k % unit or (kind < 2 and group_size % unit and unit % group_size):
        raise ValueError(f"gemv tile {cfg.block_k} does not fit K {k} and group {group_size}")
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    k_tiles = k // cfg.block_k
    tiles_per_split = triton.cdiv(k_tiles, max(1, min(cfg.split_k, k_tiles)))
    split_k = triton.cdiv(k_tiles, tiles_per_split)
    n_blocks = triton.cdiv(n, cfg.block_n)
    if n_blocks > locks.numel():
        split_k, tiles_per_split = 1, k_tiles
    ws = torch.empty((split_k, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    _gemv_kernel[(n_blocks, split_k)](
        x,
        w,
        s if s is not None else w,
        z if z is not None else w,
        out,
        ws,
        locks,
        n,
        k,
        w.stride(0),
        s.stride(0) if s is not None and s.dim() == 2 else 0,
        tiles_per_split,
        GROUP_SIZE=group_size,
        KIND=kind,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        UNIT=unit,
        SPLIT=split_k > 1,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
