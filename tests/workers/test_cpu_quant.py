"""The avx2 weight-only kernel (workers/kernels/cpu_quant.cpp) against quant_reference: int8 per
channel and group-wise, int4 groups 32/64/128, 1 to 64 rows, output rows that leave a partial tile;
its packed layout read back exactly; what `auto` picks on CPU, and the fallback when it cannot build.
Tolerance as in test_quant.py: both round x and y to bfloat16 and differ only in summation order, so
they agree to bfloat16's rounding of the output."""

from __future__ import annotations

import logging

import pytest
import torch

from workers.kernels import cpu_quant
from workers.quant import QuantizationError
from workers.quant.backends import get_backend
from workers.quant.layout import quantize_rtn

CPU = torch.device("cpu")
# The kernel needs an x86 CPU with AVX2+FMA and a C++ compiler (gcc/g++, as `make install` uses); CI has
# both, so these run there. Elsewhere kvfleet uses aten's kernels (tested below without the kernel).
needs_kernel = pytest.mark.skipif(
    cpu_quant.load() is None, reason="needs an AVX2+FMA CPU and a C++ compiler to build the avx2 kernel"
)


def _close(y: torch.Tensor, ref: torch.Tensor, rel: float = 2**-7) -> None:
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= rel * ref.float().abs().max().item(), f"max error {err} vs scale {ref.abs().max().item()}"


CASES = [("int8", 576), ("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128)]


@needs_kernel
@pytest.mark.parametrize(("kind", "group_size"), CASES)
@pytest.mark.parametrize("rows", [1, 3, 16, 64])
@pytest.mark.parametrize("out_features", [192, 200])  # 200: a last tile of 8 rows
def test_avx2_kernel_equals_the_reference(kind, group_size, rows, out_features):
    torch.manual_seed(rows * 7 + group_size + out_features)
    in_features = 1152 if group_size == 128 else 576
    w = quantize_rtn(torch.randn(out_features, in_features), kind, group_size)
    x = torch.randn(rows, in_features)
    avx2, ref = get_backend(kind, CPU, "avx2"), get_backend(kind, CPU, "reference")
    y = avx2.matmul(x, *avx2.prepare(w))
    assert y.dtype == torch.float32 and y.shape == (rows, out_features)
    assert torch.equal(y, y.bfloat16().float()), "the output is rounded to bfloat16, as aten's is"
    _close(y, ref.matmul(x, *ref.prepare(w)))


@needs_kernel
def test_avx2_kernel_takes_bfloat16_rows_and_many_rows():
    """Prefill's many rows take the same kernel; a bfloat16 input gives a bfloat16 output."""
    torch.manual_seed(0)
    w = quantize_rtn(torch.randn(64, 256), "int4", 32)
    avx2, ref = get_backend("int4", CPU, "avx2"), get_backend("int4", CPU, "reference")
    prepared = avx2.prepare(w)
    x = torch.randn(300, 256)
    _close(avx2.matmul(x, *prepared), ref.matmul(x, *ref.prepare(w)))
    y = avx2.matmul(x[:5].bfloat16(), *prepared)
    assert y.dtype == torch.bfloat16
    _close(y, ref.matmul(x[:5], *ref.prepare(w)))


@pytest.mark.parametrize(("kind", "group_size"), CASES)
def test_packed_layout_reads_back_to_the_same_weight(kind, group_size):
    torch.manual_seed(group_size)
    in_features = 1152 if group_size == 128 else 576
    w = quantize_rtn(torch.randn(40, in_features), kind, group_size)
    if kind == "int8":
        weight, scales, n = cpu_quant.pack_int8(w.qweight, w.scales)
        dense = cpu_quant.dequantize(weight, scales, None, n)
    else:
        weight, scales, zeros, n = cpu_quant.pack_int4(w.qweight, w.scales, w.zeros)
        dense = cpu_quant.dequantize(weight, scales, zeros, n)
    assert weight.shape[0] == 3 and n == 40  # 40 rows: three tiles of 16, the last padded
    torch.testing.assert_close(dense, w.dequantize(), rtol=0, atol=1e-6)


@needs_kernel
def test_auto_picks_avx2_on_cpu_where_it_builds():
    assert get_backend("int8", CPU).name == get_backend("int4", CPU).name == "avx2"


def test_auto_picks_aten_where_the_kernel_cannot_build(monkeypatch):
    monkeypatch.setattr(cpu_quant, "load", lambda: None)
    assert get_backend("int8", CPU).name == get_backend("int4", CPU).name == "aten"
    with pytest.raises(QuantizationError, match="the avx2 kernel did not build"):
        get_backend("int4", CPU, "avx2")


def test_a_failed_build_warns_once_and_returns_none(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def broken(**kwargs):
        raise RuntimeError("no compiler")

    cpu_quant.load.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", broken)
    try:
        with caplog.at_level(logging.WARNING):
            assert cpu_quant.load() is None and cpu_quant.load() is None
        warnings = [r for r in caplog.records if "cpu_quant" in r.getMessage()]
        assert len(warnings) == 1 and "no compiler" in warnings[0].getMessage()
    finally:
        cpu_quant.load.cache_clear()


@needs_kernel
def test_groups_the_kernel_cannot_take_are_refused_by_name():
    w = quantize_rtn(torch.randn(16, 36), "int8", 18)
    with pytest.raises(QuantizationError, match="multiple of 32 input columns, not 18; use the aten backend"):
        get_backend("int8", CPU, "avx2").prepare(w)


@needs_kernel
def test_threads_split_the_tiles_and_agree_with_one_thread():
    torch.manual_seed(3)
    w = quantize_rtn(torch.randn(4096, 576), "int8", 576)
    avx2 = get_backend("int8", CPU, "avx2")
    prepared = avx2.prepare(w)
    x = torch.randn(4, 576)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = avx2.matmul(x, *prepared)
        torch.set_num_threads(2)
        assert torch.equal(avx2.matmul(x, *prepared), one)  # each output is summed by one thread
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_a_non_finite_input_row_gives_nan_outputs_and_leaves_the_others():
    """int16 cannot hold inf or NaN: such a 32-column group gets a NaN scale, so its row's outputs
    are NaN (as a float matmul's mostly are), not silently finite."""
    torch.manual_seed(4)
    w = quantize_rtn(torch.randn(32, 64), "int8", 64)
    avx2, ref = get_backend("int8", CPU, "avx2"), get_backend("int8", CPU, "reference")
    x = torch.randn(3, 64)
    x[1, 5] = float("inf")
    y = avx2.matmul(x, *avx2.prepare(w))
    assert y[1].isnan().all()
    _close(y[[0, 2]], ref.matmul(x[[0, 2]], *ref.prepare(w)))
