"""The matmul kernels a quantized layer calls, chosen by device (gpt-fast's and torchao's split):

- `avx2` (CPU, what `auto` picks there): workers/kernels/cpu_quant.cpp, our int8 / int4 kernel for
  x86 with AVX2 and FMA, compiled once by torch.utils.cpp_extension (`make install` does it ahead of
  time). `prepare` repacks the weight into tiles of 16 output rows; the matmul reads the tiles once
  per call, multiplies each weight with up to 4 rows of x in int16 (x rounded to bfloat16 first, and
  exact in int16 with one power-of-two scale per 32 columns), sums 32 columns exactly in int32, then
  in float32, and rounds y to bfloat16: the reference's arithmetic up to float32 summation order. It
  takes group-wise int8 as stored (GGUF Q8_0 keeps its groups of 32) and groups that are multiples of
  32. Measured on a 2-core AVX2 EPYC, 1 thread, SmolLM2-135M's shapes (`kvfleet bench cpu-quant-kernels`):
  2.4-3.1x aten's kernels at one row (int8 6-13 GB/s of weights, near the core's 12 GB/s of DRAM
  reads), 1.4-2.0x at 16; from ~256-512 rows aten's dequantized float32 matmul is 10-20% faster.
  Where it does not build (no compiler, no ninja) or the CPU lacks AVX2, `cpu_quant.load` logs one
  warning and `auto` picks aten; the quantizers follow the same rules for both (`CPU_KERNELS`: int4
  groups 32-256, int8 per channel), so the model loaded is the same either way.
- `aten` (CPU): PyTorch's own weight-only kernels. int4: `_convert_weight_to_int4pack_for_cpu`
  (int32 codes [N, K] -> its tiled layout) and `_weight_int4pack_mm_for_cpu`, whose scales-and-zeros
  tensor [K // G, N, 2] holds our (scales, zeros) as they are: it computes (q - 8) * s + z, the
  contract's formula. int8: `_weight_int8pack_mm`, per output channel only; a group-wise int8
  weight (GGUF Q8_0, group 32) is requantized per channel at load, and the error is logged. Both
  kernels are fast only with bfloat16 activations (measured on AMX and AVX-512: float32 inputs are
  10-60x slower; on AVX2 alone 5-20x), so x is cast to bfloat16 and the result back to x's dtype.
  Where a layer's weight is dequantized for a matmul instead (prefill rows, the logits head's many
  rows), that matmul runs in bfloat16 only on a CPU with bfloat16 arithmetic (AMX, AVX-512 BF16):
  elsewhere oneDNN emulates it, 2-5x slower than float32 (`dense_dtype`).
- `triton` (CUDA): workers/kernels/triton_quant.py, imported lazily (`prepare_*` repacks once at
  load, `*_matmul(x, *prepared)` runs).
- `reference` (any device): workers/kernels/quant_reference.py, dequantize then multiply in float32:
  the oracle of the tests, and what `kernels: torch` runs on a GPU. On CPU it rounds x and y to
  bfloat16, as the aten path does, so the two differ only by summation order. `dequantized` is the
  same arithmetic with the weight dequantized once at load (tests of whole generations).

A backend is a pair of functions: `prepare(QuantWeight) -> tuple` of tensors (and ints) run once, at load,
and `matmul(x [M, K], *prepared) -> [M, N]`: no host syncs, so CUDA graphs can capture it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workers.kernels import cpu_quant
from workers.kernels import quant_reference as qr
from workers.quant.layout import QuantizationError, QuantWeight, quantize_rtn

log = logging.getLogger(__name__)

CPU_ACT_DTYPE = torch.bfloat16


@functools.cache
def dense_dtype() -> torch.dtype:
    """The dtype of the CPU matmuls that multiply a dequantized weight: bfloat16 where the CPU has
    bfloat16 arithmetic (AMX or AVX-512 BF16), float32 elsewhere (measured 2026-12-05 on an AVX2 EPYC,
    1 thread, 49152 x 576 at 16 rows: bfloat16 284 ms, float32 61 ms). Inputs and outputs are
    rounded to bfloat16 either way, as the int8/int4 kernels' are, so only the summation differs."""
    cpu = torch.cpu
    native = any(
        getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    )
    return torch.bfloat16 if native else torch.float32


@dataclass(frozen=True)
class Backend:
    name: str
    prepare: Callable[[QuantWeight], tuple[torch.Tensor, ...]]
    matmul: Callable[..., torch.Tensor]


# ---- aten (CPU) ---------------------------------------------------------------------------------


def _aten_prepare_int4(w: QuantWeight):
    codes = qr.unpack_int4(w.qweight).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_and_zeros = torch.stack([w.scales.T, w.zeros.T], dim=-1).to(CPU_ACT_DTYPE).contiguous()
    return packed, scales_and_zeros, w.group_size


# aten's int4 kernel is a matrix-vector loop: its time grows with the rows (measured 2026-12-05, 1
# thread, 3072 x 576: 0.7 ms at 16 rows, 59 ms at 1296), while oneDNN's bfloat16 matmul (AMX) takes
# 3.5 ms for 1296. From PREFILL_ROWS rows on, the weight is dequantized to `dense_dtype` for the call
# (2-3 ms for that layer) and multiplied there: a prefill 3-10x faster, decode steps unchanged.
PREFILL_ROWS = 128


def _dequantize_packed_int4(
    packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, block_n: int, dtype=CPU_ACT_DTYPE
) -> torch.Tensor:
    """W^T [K, N] in `dtype` from aten's packed int4 CPU weight: bytes [N / block_n, K, block_n / 2],
    low nibble row j, high row j + block_n / 2; (q - 8) * s + z, in float32, rounded once."""
    n = scales_and_zeros.shape[1]
    k = packed.shape[1] * 2
    b = packed.view(n // block_n, k, block_n // 2)
    q = torch.stack((b & 15, b >> 4), dim=2).permute(1, 0, 2, 3).reshape(k // group_size, group_size, n)
    s = scales_and_zeros[..., 0].float()
    z = scales_and_zeros[..., 1].float() - 8 * s
    return torch.addcmul(z[:, None, :], q.float(), s[:, None, :]).to(dtype).view(k, n)


@functools.cache
def packed_int4_block_n() -> int | None:
    """The row block of this torch's packed int4 CPU layout (an aten internal that follows the CPU's
    vector width: 64 rows with AVX-512, 32 with AVX2), found once by packing a random weight and
    reading it back; None if neither reads back (then every call takes aten's kernel)."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=gen)
    sz = torch.stack([torch.ones(2, 128), torch.zeros(2, 128)], -1).to(CPU_ACT_DTYPE)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    except RuntimeError:
        return None
    for block_n in (64, 32):
        if torch.equal(_dequantize_packed_int4(packed, sz, 32, block_n).T.float(), codes.float() - 8):
            return block_n
    return None


def _aten_int4(x, packed, scales_and_zeros, group_size: int):
    n = scales_and_zeros.shape[1]
    block_n = packed_int4_block_n() if x.shape[0] >= PREFILL_ROWS else None
    if block_n and n % block_n == 0:
        weight_t = _dequantize_packed_int4(packed, scales_and_zeros, group_size, block_n, dense_dtype())
        return _bf16_rounded(torch.mm(_bf16_rounded(x, weight_t.dtype), weight_t), x.dtype)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(CPU_ACT_DTYPE), packed, group_size, scales_and_zeros)
    return y.to(x.dtype)


def _bf16_rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t rounded to bfloat16 (as the kernels' inputs and outputs are), held in `dtype`."""
    return t.to(CPU_ACT_DTYPE).to(dtype)


def per_channel_int8(w: QuantWeight) -> QuantWeight:
    """A group-wise int8 weight requantized with one scale per output row (aten's int8 kernel
    takes no groups); logs the largest change of any weight, relative to its row's largest."""
    if w.scales.shape[1] == 1:
        return w
    dense = w.dequantize()
    out = quantize_rtn(dense, "int8", dense.shape[1])
    err = ((out.dequantize() - dense).abs().amax(1) / dense.abs().amax(1).clamp_min(1e-12)).max().item()
    log.debug("int8 group %d -> per channel: largest change %.2e of its row's largest weight", w.group_size, err)
    return out


def _aten_prepare_int8(w: QuantWeight):
    w = per_channel_int8(w)
    return w.qweight.contiguous(), w.scales[:, 0].to(CPU_ACT_DTYPE).contiguous()


def _aten_int8(x, qweight, scales):
    if x.shape[0] >= PREFILL_ROWS:  # a matrix-vector loop too (3072 x 576, 1296 rows, 1 thread: 57 ms; this 4)
        weight = qweight.to(dense_dtype()) * scales[:, None].to(dense_dtype())
        return _bf16_rounded(torch.nn.functional.linear(_bf16_rounded(x, weight.dtype), weight), x.dtype)
    return torch.ops.aten._weight_int8pack_mm(x.to(CPU_ACT_DTYPE), qweight, scales).to(x.dtype)


# ---- avx2 (CPU) ---------------------------------------------------------------------------------


def _avx2_check(w: QuantWeight) -> None:
    if w.group_size % 32:
        raise QuantizationError(
            f"the avx2 kernel takes groups of a multiple of 32 input columns, not {w.group_size}; use the aten backend"
        )


def _avx2_prepare_int8(w: QuantWeight):
    _avx2_check(w)
    return cpu_quant.pack_int8(w.qweight, w.scales)


def _avx2_prepare_int4(w: QuantWeight):
    _avx2_check(w)
    return cpu_quant.pack_int4(w.qweight, w.scales, w.zeros)


_AVX2 = {
    "int4": Backend("avx2", _avx2_prepare_int4, cpu_quant.int4_matmul),
    "int8": Backend("avx2", _avx2_prepare_int8, cpu_quant.int8_matmul),
}


# ---- reference (any device) ---------------------------------------------------------------------


def _ref_prepare(w: QuantWeight):
    return tuple(w.tensors().values())


def _ref_input(x):
    return x.to(CPU_ACT_DTYPE).to(x.dtype) if x.device.type == "cpu" else x


def _ref_output(y):
    return y.to(CPU_ACT_DTYPE).to(y.dtype) if y.device.type == "cpu" else y


def _ref(fn):
    return lambda x, *t: _ref_output(fn(_ref_input(x), *t))


# ---- triton (CUDA) ------------------------------------------------------------------------------


def _triton(kind: str) -> Backend:
    try:
        from workers.kernels import triton_quant
    except ImportError as e:
        raise QuantizationError(
            f"{kind} on CUDA needs workers/kernels/triton_quant.py, which this build lacks "
            "(set kernels: torch to run the pure-torch reference instead)"
        ) from e

    def prepare(w: QuantWeight):
        if kind == "int4":
            return tuple(triton_quant.prepare_int4(w.qweight, w.scales, w.zeros))
        if kind == "int8":
            return tuple(triton_quant.prepare_int8(w.qweight, w.scales))
        return tuple(triton_quant.prepare_fp8(w.qweight, w.scales))

    return Backend("triton", prepare, getattr(triton_quant, f"{kind}_matmul"))


def _dequantized_prepare(w: QuantWeight):
    return (w.dequantize(),)


def _dequantized(x, weight):
    return _ref_output(torch.nn.functional.linear(_ref_input(x).float(), weight)).to(x.dtype)


# The same weights dequantized once, multiplied in float32: the "dequantized reference path" the
# real model's greedy output is held to (fast enough for whole generations; float-sized memory).
DEQUANTIZED = Backend("dequantized", _dequantized_prepare, _dequantized)

_REFERENCE = {
    "int4": Backend("reference", _ref_prepare, _ref(qr.w4a16_matmul)),
    "int8": Backend("reference", _ref_prepare, _ref(qr.w8a16_matmul)),
    "fp8": Backend("reference", _ref_prepare, _ref(qr.fp8_matmul)),
}
_ATEN = {
    "int4": Backend("aten", _aten_prepare_int4, _aten_int4),
    "int8": Backend("aten", _aten_prepare_int8, _aten_int8),
}

BACKENDS = ("auto", "avx2", "aten", "triton", "reference", "dequantized")
CPU_KERNELS = ("avx2", "aten")  # the CPU backends: they take the same group sizes, so a fallback changes no model


def check_device(kind: str, device: torch.device) -> None:
    """Refuse a scheme the device cannot run, with a sentence saying what would."""
    if kind != "fp8":
        return
    if device.type == "cpu":
        raise QuantizationError(
            "quantization fp8 needs a GPU with fp8 tensor cores (compute capability 8.9+: Ada, Hopper); "
            "on CPU use int8, int4 or gguf"
        )
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise QuantizationError(
                f"quantization fp8 needs fp8 tensor cores (compute capability 8.9+), but {device} "
                f"({torch.cuda.get_device_name(device)}) has {major}.{minor}; use int8 or int4 there"
            )


def get_backend(kind: str, device: torch.device, name: str = "auto") -> Backend:
    """`name` 'auto': avx2 on CPU where it builds and runs (else aten, after one warning), triton on
    CUDA; 'reference' anywhere."""
    if name not in BACKENDS:
        raise QuantizationError(f"unknown quantized-matmul backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "reference":
        return _REFERENCE[kind]
    if name == "dequantized":
        return DEQUANTIZED
    if name == "auto" and device.type == "cpu":
        name = "avx2" if cpu_quant.load() is not None else "aten"
    if name in CPU_KERNELS:
        if kind not in _ATEN:
            raise QuantizationError(f"{kind} has no CPU kernel; on CPU use int8, int4 or gguf")
        if name == "avx2" and cpu_quant.load() is None:
            raise QuantizationError(
                "the avx2 kernel did not build or cannot run on this CPU (the log's warning says why); use aten"
            )
        return (_AVX2 if name == "avx2" else _ATEN)[kind]
    return _triton(kind)
