"""The AVX2 weight-only int8/int4 matmul (cpu_quant.cpp): its build, its weight layout, its call.

`load()` compiles cpu_quant.cpp once per source and flag set with torch.utils.cpp_extension into
torch's extension cache (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions); `make install` runs
it ahead of time. On a CPU without AVX2 and FMA, or where the build fails (no compiler), it logs one
warning and returns None, and the caller keeps aten's kernels.

Layout (`pack_int8`, `pack_int4`): output rows in tiles of 16 (N padded with zero rows to a multiple
of 16), each tile stored a few input columns after another, so the kernel reads a tile's weights as
one stream and each 32-byte block widens to int16 lanes that `vpmaddwd` pairs with two columns of x:
int8 [tiles, K // 2, 32] = per column pair [row half][8 rows][2 columns]; int4 [tiles, K // 4, 32] =
per 4 columns [row half][8 rows][2] bytes whose low nibble holds column 4c + e and high nibble
4c + 2 + e (the codes 0..15). Scales float32 [tiles, K // G, 16]; int4 zeros as z - 8 s, so the
kernel computes s * sum(x q) + (z - 8 s) * sum(x) per group, the contract's (q - 8) s + z. Group
sizes: multiples of 32 (x's int16 scales cover 32 columns).
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
    """[N, C] -> [tiles, 2, 8, C], N padded with zeros to whole tiles (two halves of 8 rows)."""
    pad = -t.shape[0] % TILE
    if pad:
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
    return t.view(-1, 2, TILE // 2, t.shape[1])


def _group_params(t: torch.Tensor) -> torch.Tensor:
    """scales or zeros [N, K // G] -> float32 [tiles, K // G, 16]."""
    tiles = _tiles(t.float())
    return tiles.reshape(tiles.shape[0], TILE, -1).transpose(1, 2).contiguous()


def pack_int8(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """int8 [N, K], scales [N, K // G] -> (weight [tiles, K // 2, 32], scales float32 [tiles, K // G, 16], N)."""
    q = _tiles(qweight.to(torch.int8))  # [tiles, 2, 8, K]
    q = q.view(*q.shape[:3], -1, 2).permute(0, 3, 1, 2, 4)  # [tiles, K // 2, half, row, column of the pair]
    return q.reshape(q.shape[0], q.shape[1], 2 * TILE).contiguous(), _group_params(scales), qweight.shape[0]


def pack_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """uint8 [N, K // 2], scales and zeros [N, K // G] -> (weight [tiles, K // 4, 32] uint8, scales,
    zeros - 8 * scales (float32 [tiles, K // G, 16]), N)."""
    codes = _tiles(qr.unpack_int4(qweight))  # [tiles, 2, 8, K]
    codes = codes.view(*codes.shape[:3], -1, 2, 2)  # column 4c + 2s + e: [.., c, s, e]
    packed = (codes[..., 0, :] | (codes[..., 1, :] << 4)).permute(0, 3, 1, 2, 4)  # [tiles, c, half, row, e]
    packed = packed.reshape(packed.shape[0], packed.shape[1], 2 * TILE).contiguous()
    s = scales.float()
    return packed, _group_params(s), _group_params(zeros.float() - 8.0 * s), qweight.shape[0]


def int8_matmul(x: torch.Tensor, weight, scales, n: int) -> torch.Tensor:
    """y [M, n] = x @ W^T, x and y rounded to bfloat16 as the reference rounds them; y in x's dtype."""
    return load().quant_matmul(x.float(), weight, scales, None, n).to(x.dtype)


def int4_matmul(x: torch.Tensor, weight, scales, zeros, n: int) -> torch.Tensor:
    return load().quant_matmul(x.float(), weight, scales, zeros, n).to(x.dtype)


def dequantize(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, n: int) -> torch.Tensor:
    """The packed weight back to float32 [n, K] (the tests' check of the layout)."""
    tiles, blocks = weight.shape[:2]
    w = weight.view(tiles, blocks, 2, TILE // 2, 2)  # [tiles, block, half, row, e]
    if zeros is None:
        q = w.permute(0, 2, 3, 1, 4).reshape(tiles, TILE, -1).float()  # [tiles, 16, K]
    else:
        q = torch.stack((w & 15, w >> 4), dim=-2)  # [tiles, c, half, row, s, e]
        q = q.permute(0, 2, 3, 1, 4, 5).reshape(tiles, TILE, -1).float()
    groups = scales.shape[1]
    q = q.view(tiles, TILE, groups, -1) * scales.transpose(1, 2)[..., None]
    if zeros is not None:
        q = q + zeros.transpose(1, 2)[..., None]
    return q.reshape(tiles * TILE, -1)[:n]
