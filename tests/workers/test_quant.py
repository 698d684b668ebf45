"""Quantized weights (workers/quant/): each CPU kernel against quant_reference, GGUF blocks repacked
exactly, layers against the same weights dequantized, the refusals, and quantized checkpoints.
Tolerances: the aten kernels take bfloat16 activations (so does the reference on CPU) and return
bfloat16, so a matmul agrees to bfloat16's rounding of its output (~2**-8 of its largest value)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from workers.config import EngineConfig
from workers.kernels import quant_reference as qr
from workers.kernels.ops import get_ops
from workers.models import gguf as float_gguf
from workers.models.config import ModelConfig
from workers.models.loader import load_model
from workers.quant import QuantizationError, backends, quantize_model
from workers.quant.backends import get_backend, per_channel_int8
from workers.quant.gguf_blocks import repack
from workers.quant.layers import QuantLogitsHead, _QuantLinear
from workers.quant.layout import quantize_rtn

CPU = torch.device("cpu")


def _close(y: torch.Tensor, ref: torch.Tensor, rel: float = 2**-7) -> None:
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= rel * ref.float().abs().max().item(), f"max error {err} vs scale {ref.abs().max().item()}"


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_aten_int4_equals_the_reference(group_size, rows):
    torch.manual_seed(group_size + rows)
    w = quantize_rtn(torch.randn(96, 256), "int4", group_size)
    x = torch.randn(rows, 256)
    aten, ref = get_backend("int4", CPU, "aten"), get_backend("int4", CPU, "reference")
    y = aten.matmul(x, *aten.prepare(w))
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    _close(y, ref.matmul(x, *ref.prepare(w)))
    # and the reference is the contract's formula on bf16-rounded inputs
    _close(y, qr.w4a16_matmul(x.bfloat16().float(), w.qweight, w.scales, w.zeros))


@pytest.mark.parametrize("group_size", [32, 128])
def test_aten_int4_prefill_rows_dequantize_and_equal_the_reference(group_size):
    """From PREFILL_ROWS rows the aten backend reads aten's packed weight back to bfloat16 and
    multiplies there; this torch must pack as that reader expects (else it would take the slow path)."""
    torch.manual_seed(group_size)
    w = quantize_rtn(torch.randn(128, 256), "int4", group_size)
    aten, ref = get_backend("int4", CPU, "aten"), get_backend("int4", CPU, "reference")
    block_n = backends.packed_int4_block_n()
    assert block_n in (32, 64)
    prepared = aten.prepare(w)
    transposed = backends._dequantize_packed_int4(prepared[0], prepared[1], group_size, block_n)
    # the kernel's scales and zeros are bfloat16: the same formula on them, rounded once to bfloat16
    bf16 = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    assert torch.equal(transposed.T.float(), bf16(qr.dequant_int4(w.qweight, bf16(w.scales), bf16(w.zeros))))
    for rows in (backends.PREFILL_ROWS - 1, backends.PREFILL_ROWS, 300):
        x = torch.randn(rows, 256)
        _close(aten.matmul(x, *prepared), ref.matmul(x, *ref.prepare(w)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_rows_equal_the_reference_in_either_dense_dtype(monkeypatch, dtype):
    """The dequantized prefill matmuls run in bfloat16 on CPUs with bfloat16 arithmetic and in
    float32 elsewhere (`dense_dtype`); both round input and output as the kernels do."""
    monkeypatch.setattr(backends, "dense_dtype", lambda: dtype)
    torch.manual_seed(1)
    x = torch.randn(backends.PREFILL_ROWS, 256)
    for kind, group_size in (("int4", 32), ("int8", 256)):
        w = quantize_rtn(torch.randn(128, 256), kind, group_size)
        aten, ref = get_backend(kind, CPU, "aten"), get_backend(kind, CPU, "reference")
        y = aten.matmul(x, *aten.prepare(w))
        assert y.dtype == torch.float32 and torch.equal(y, y.bfloat16().float())
        _close(y, ref.matmul(x, *ref.prepare(w)))


@pytest.mark.parametrize("rows", [1, 16, backends.PREFILL_ROWS])  # the last through bfloat16
def test_aten_int8_equals_the_reference(rows):
    torch.manual_seed(rows)
    w = quantize_rtn(torch.randn(96, 256), "int8", 256)  # per channel: what aten takes
    x = torch.randn(rows, 256)
    aten, ref = get_backend("int8", CPU, "aten"), get_backend("int8", CPU, "reference")
    _close(aten.matmul(x, *aten.prepare(w)), ref.matmul(x, *ref.prepare(w)))


def test_group_wise_int8_is_requantized_per_channel_within_its_step():
    torch.manual_seed(0)
    w = quantize_rtn(torch.randn(64, 256), "int8", 32)
    per_channel = per_channel_int8(w)
    assert per_channel.scales.shape == (64, 1)
    dense = w.dequantize()
    # one step of the per-row grid (row max / 127) at most half away
    assert ((per_channel.dequantize() - dense).abs() <= dense.abs().amax(1, keepdim=True) / 254 + 1e-6).all()


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_repack_exactly(type_name):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((48, 128)).astype(np.float32)
    data = quants.quantize(values, GGMLQuantizationType[type_name])
    w = repack(data, type_name, 48, 128)
    assert w.group_size == 32 and w.kind == ("int8" if type_name == "Q8_0" else "int4")
    expected = float_gguf.dequantize(data, type_name, (48, 128))
    np.testing.assert_allclose(w.dequantize().numpy(), expected, rtol=0, atol=1e-6)


def test_quant_weight_slices_keep_whole_groups():
    w = quantize_rtn(torch.randn(8, 128), "int4", 32)
    part = w.cols(64, 64)
    torch.testing.assert_close(part.dequantize(), w.dequantize()[:, 64:])
    torch.testing.assert_close(w.rows(2, 3).dequantize(), w.dequantize()[2:5])
    with pytest.raises(QuantizationError, match="group size 32 cannot be cut"):
        w.cols(16, 64)


@pytest.mark.parametrize("rows", [1, 8, 32])  # int8; int8 or the dense matmul (by CPU); the dense matmul
def test_logits_head_refines_its_top_tokens_in_float32(rows):
    """The int8 logits head: the REFINED_TOKENS highest logits of a row are the float matmul's (to
    float32 summation order), so greedy choices and log-probabilities are the float model's; the
    rest are within the 8-bit error."""
    torch.manual_seed(rows)
    weight = torch.randn(1000, 64)
    head = QuantLogitsHead(weight, get_backend("int8", CPU, "aten"))
    hidden = torch.randn(rows, 64)
    logits, exact = head(hidden), hidden @ weight.T
    assert logits.dtype == torch.float32 and logits.shape == (rows, 1000)
    top = exact.topk(8, dim=-1).indices
    torch.testing.assert_close(logits.gather(1, top), exact.gather(1, top), rtol=1e-6, atol=1e-5)
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    _close(logits, exact, rel=2**-6)


def _tiny(model_dir) -> tuple:
    cfg = ModelConfig.from_dir(model_dir)
    model = load_model(model_dir, cfg, torch.float32, CPU, 64, get_ops("torch", CPU))
    return cfg, model


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantized_layers_equal_the_same_weights_dequantized(model_dirs, scheme):
    """Every quantized layer (the CPU kernel 'auto' picks) computes what a float layer holding its dequantized
    weight computes, to bf16 rounding; the model's linears are all replaced."""
    _, model = _tiny(model_dirs["llama"])
    floats = {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if hasattr(m, "part_sizes") or "o_proj" in n or "down_proj" in n
    }
    quantize_model(model, scheme, group_size=32, keep_layout=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _QuantLinear)}
    assert set(layers) == set(floats) and all(m.backend_name == get_backend(scheme, CPU).name for m in layers.values())
    torch.manual_seed(0)
    for name, layer in layers.items():
        x = torch.randn(7, layer.in_features)
        dense = layer.layout.dequantize()
        _close(layer(x), x.bfloat16().float() @ dense.T)
        # and the dequantized weight is the float one to within its quantization step
        step = (floats[name].abs().amax(1, keepdim=True) / (7.5 if scheme == "int4" else 127)).max()
        assert (dense - floats[name]).abs().max() <= step


def test_refusals_name_scheme_layer_and_device(model_dirs, tmp_path):
    _, model = _tiny(model_dirs["llama"])
    with pytest.raises(
        QuantizationError,
        match=r"group size 128 does not divide the 64 input columns of layer model\.layers\.0\.self_attn\.qkv_proj; "
        r"group sizes that divide it: 64, 32",
    ):
        quantize_model(model, "int4", group_size=128)
    with pytest.raises(
        QuantizationError, match=r"fp8 needs a GPU with fp8 tensor cores.*on CPU use int8, int4 or gguf"
    ):
        quantize_model(model, "fp8")
    with pytest.raises(QuantizationError, match="int4 on CPU takes group sizes 32, 64, 128, 256, not 16"):
        quantize_model(model, "int4", group_size=16)
    with pytest.raises(QuantizationError, match="unknown quantization scheme 'int3'"):
        quantize_model(model, "int3")
    with pytest.raises(ValueError, match="fp8 needs a GPU with fp8 tensor cores"):
        EngineConfig(model=str(model_dirs["llama"]), device="cpu", quantization="fp8")
    cfg = ModelConfig.from_dir(model_dirs["llama"])
    with pytest.raises(
        QuantizationError, match=r"quantization gguf keeps a GGUF file's blocks, but .* is no GGUF model"
    ):
        load_model(model_dirs["llama"], cfg, torch.float32, CPU, 64, get_ops("torch", CPU), quantization="gguf")


def test_gguf_with_a_float_linear_is_refused_by_tensor(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "f16.gguf"
    w = GGUFWriter(str(path), "llama")
    for add, v in [(w.add_block_count, 1), (w.add_embedding_length, 32), (w.add_feed_forward_length, 64),
                   (w.add_head_count, 2), (w.add_context_length, 128), (w.add_layer_norm_rms_eps, 1e-5),
                   (w.add_vocab_size, 64)]:  # fmt: skip
        add(v)
    w.add_tensor("blk.0.attn_q.weight", np.ones((32, 32), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from workers.quant.gguf_blocks import linear_kinds

    with pytest.raises(
        QuantizationError, match=r"tensor blk\.0\.attn_q\.weight is F16, which quantization gguf does not keep"
    ):
        linear_kinds(path)


def test_int4_awq_calls_awq_then_rtn(model_dirs):
    """int4-awq = workers/quant/awq.py's apply_awq on the float model, then int4 RTN; a build
    without that module refuses the scheme by name."""
    import importlib.util

    cfg, model = _tiny(model_dirs["llama"])
    batches = [torch.randint(0, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    if importlib.util.find_spec("workers.quant.awq") is None:
        with pytest.raises(QuantizationError, match=r"int4-awq needs workers/quant/awq\.py"):
            quantize_model(model, "int4-awq", group_size=32, calib_batches=batches)
        return
    with pytest.raises(QuantizationError, match="int4-awq needs calibration batches"):
        quantize_model(model, "int4-awq", group_size=32)
    report = quantize_model(model, "int4-awq", group_size=32, calib_batches=batches)
    assert report["group_size"] == 32
    layers = [m for m in model.modules() if isinstance(m, _QuantLinear)]
    assert layers and {(m.kind, m.group_size) for m in layers} == {("int4", 32)}
