"""The AVX2 weight-only int8/int4 matmul (cpu_quant.cpp): its build, its weight layout, its call.

`load()` compiles cpu_quant.cpp once per source and flag set with torch.utils.cpp_extension into
torch's extension cache (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions); `make install` runs
it ahead of time. On a CPU without AVX2 and FMA, or where the build fails (no compiler), it logs one
warning and returns None, and the caller keeps aten's kernels.

Layout (`pack_int8`, `pack_int4`): output rows in tiles of 16 (N padded with zero rows to a multiple
of 16), each tile stored input column after input column, so the kernel reads a tile's weights as
one stream: int8 [tiles, K, 16]; int4 [tiles, K // 2, 16] bytes, low nibble column 2j, high nibble
column 2j + 1 (the codes 0..15). Scales float32 [tiles, K // G, 16]; int4 zeros as z - 8 s, so the
kernel computes s * sum(x q) + (z - 8 s) * sum(x) per group, the contract's (q - 8) s + z.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

import torch

from workers.kernels import quant_reference as qr

log = logging.getLogger(__name__)

TILE = 16
SOURCE = Path(__file__).with_name("cpu_quant.cpp")
CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # OpenMP: at::parallel_for's pragma, torch's libgomp at run time


@functools.cache
def load():
    """The compiled module, or None (with one warning saying why) where it cannot run here."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        log.warning(
            "cpu_quant: this CPU lacks AVX2/FMA (torch sees %s); int8/int4 matmuls use aten's kernels", capability
        )
        return None
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # torch runs `ninja` from PATH; the ninja wheel's may not be on it
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        return cpp_extension.load(
            name="kvfleet_cpu_quant",
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # a missing compiler or ninja shows up as several exception types (ImportError too)
        log.warning("cpu_quant: building %s failed (%s); int8/int4 matmuls use aten's kernels", SOURCE.name, e)
        return None


def _tiles(t: torch.Tensor) -> torch.Tensor:
    """[N, C] -> [tiles, C, 16], N padded with zeros to whole tiles."""
    n = t.shape[0]
    pad = -n % TILE
    if pad:
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
    return t.view(-1, TILE, t.shape[1]).transpose(1, 2).contiguous()


def pack_int8(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """int8 [N, K], scales [N, K // G] -> (weight [tiles, K, 16], scales float32 [tiles, K // G, 16], N)."""
    return _tiles(qweight.to(torch.int8)), _tiles(scales.float()), qweight.shape[0]


def pack_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """uint8 [N, K // 2], scales and zeros [N, K // G] -> (weight [tiles, K // 2, 16] uint8, scales,
    zeros - 8 * scales (float32 [tiles, K // G, 16]), N)."""
    codes = _tiles(qr.unpack_int4(qweight))  # [tiles, K, 16]
    pairs = codes.view(codes.shape[0], -1, 2, TILE)
    packed = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).contiguous()
    s = scales.float()
    return packed, _tiles(s), _tiles(zeros.float() - 8.0 * s), qweight.shape[0]


def int8_matmul(x: torch.Tensor, weight, scales, n: int) -> torch.Tensor:
    """y [M, n] = x @ W^T, x and y rounded to bfloat16 as the reference rounds them; y in x's dtype."""
    return load().quant_matmul(x.float(), weight, scales, None, n).to(x.dtype)


def int4_matmul(x: torch.Tensor, weight, scales, zeros, n: int) -> torch.Tensor:
    return load().quant_matmul(x.float(), weight, scales, zeros, n).to(x.dtype)


def dequantize(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, n: int) -> torch.Tensor:
    """The packed weight back to float32 [n, K] (tests; prefill matmuls of many rows)."""
    if zeros is None:
        q = weight.float()  # [tiles, K, 16]
    else:
        q = torch.stack((weight & 15, weight >> 4), dim=2).view(weight.shape[0], -1, TILE).float()
    tiles, k, _ = q.shape
    groups = scales.shape[1]
    w = q.view(tiles, groups, k // groups, TILE) * scales[:, :, None]
    if zeros is not None:
        w = w + zeros[:, :, None]
    return w.view(tiles, k, TILE).transpose(1, 2).reshape(-1, k)[:n]
