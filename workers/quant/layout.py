"""`QuantWeight`: one linear layer's weight in the contract layout of workers/kernels/quant_reference.py
(int4 group-wise asymmetric, int8 group-wise symmetric, fp8 per output channel), and the slicing
that tensor parallelism and merged projections need: rows carry their scales and zeros with them;
a slice of input columns takes whole groups (so the group size must divide it).

Every scheme's quantizer produces one, the GGUF reader repacks its blocks into one, and the
checkpoint format stores its tensors as they are, so loading, saving and sharding are layout-level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from workers.kernels import quant_reference as qr

Kind = Literal["int4", "int8", "fp8"]


class QuantizationError(ValueError):
    """A quantization setting this model or device cannot run; the message says what would work."""


@dataclass
class QuantWeight:
    kind: Kind
    qweight: torch.Tensor  # int4: uint8 [N, K // 2]; int8: int8 [N, K]; fp8: float8_e4m3fn [N, K]
    scales: torch.Tensor  # int4/int8: [N, K // G]; fp8: [N]
    zeros: torch.Tensor | None = None  # int4 only: [N, K // G]

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.qweight.shape
        return n, k * 2 if self.kind == "int4" else k

    @property
    def group_size(self) -> int:
        k = self.shape[1]
        return k if self.kind == "fp8" else k // self.scales.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    def rows(self, start: int, size: int) -> QuantWeight:
        cut = lambda t: None if t is None else t.narrow(0, start, size)  # noqa: E731
        return QuantWeight(self.kind, cut(self.qweight), cut(self.scales), cut(self.zeros))

    def cols(self, start: int, size: int) -> QuantWeight:
        """Input columns [start, start + size): whole groups only (fp8's per-row scales stay whole)."""
        if (start, size) == (0, self.shape[1]):
            return self
        if self.kind == "fp8":
            return QuantWeight("fp8", self.qweight.narrow(1, start, size), self.scales)
        g = self.group_size
        if start % g or size % g:
            raise QuantizationError(
                f"a {self.kind} weight with group size {g} cannot be cut at input columns [{start}, {start + size})"
            )
        per_byte = 2 if self.kind == "int4" else 1
        q = self.qweight.narrow(1, start // per_byte, size // per_byte)
        cut = lambda t: None if t is None else t.narrow(1, start // g, size // g)  # noqa: E731
        return QuantWeight(self.kind, q, cut(self.scales), cut(self.zeros))

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]."""
        if self.kind == "int4":
            return qr.dequant_int4(self.qweight, self.scales, self.zeros)
        if self.kind == "int8":
            return qr.dequant_int8(self.qweight, self.scales)
        return qr.dequant_fp8(self.qweight, self.scales)

    def to(self, device: torch.device) -> QuantWeight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantWeight(self.kind, move(self.qweight), move(self.scales), move(self.zeros))


def quantize_rtn(w: torch.Tensor, kind: Kind, group_size: int) -> QuantWeight:
    """Round-to-nearest quantization of a float weight [N, K] into the contract layout."""
    if kind == "int4":
        return QuantWeight("int4", *qr.quantize_int4(w, group_size))
    if kind == "int8":
        return QuantWeight("int8", *qr.quantize_int8(w, group_size))
    return QuantWeight("fp8", *qr.quantize_fp8(w))


def empty(kind: Kind, n: int, k: int, group_size: int, device=None) -> QuantWeight:
    """An unfilled weight of `n` x `k` (a loader copies rows into it)."""
    groups = 1 if kind == "fp8" else k // group_size
    if kind == "int4":
        q = torch.empty(n, k // 2, dtype=torch.uint8, device=device)
        return QuantWeight("int4", q, torch.empty(n, groups, device=device), torch.empty(n, groups, device=device))
    if kind == "int8":
        return QuantWeight(
            "int8", torch.empty(n, k, dtype=torch.int8, device=device), torch.empty(n, groups, device=device)
        )
    return QuantWeight(
        "fp8", torch.empty(n, k, dtype=torch.float8_e4m3fn, device=device), torch.empty(n, device=device)
    )
