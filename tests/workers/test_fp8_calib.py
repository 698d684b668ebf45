"""Calibrated fp8 (`fp8-gptq`, workers/quant/fp8_calib.py): the scale search and GPTQ beat plain
round-to-nearest fp8 on a synthetic layer's output error, smoothing helps per-token activation
rounding when a channel carries outliers, the scheme keeps fp8's layout, its saved checkpoint reloads
to the same tensors, and it is refused where fp8 is (CPU serving) with the same sentence."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from workers.config import EngineConfig
from workers.kernels.ops import get_ops
from workers.models.config import ModelConfig
from workers.models.loader import iter_safetensors, load_model
from workers.quant import QuantizationError, quantize_model
from workers.quant.checkpoint import read_quant_config, saved_layer_kinds
from workers.quant.convert import quantize_checkpoint
from workers.quant.fp8_calib import fake_fp8_rows, gptq_fp8, quantize_linear, round_fp8, rtn_scales, search_smoothing
from workers.quant.layers import _QuantLinear
from workers.quant.quantize import prepare_empty

CPU = torch.device("cpu")


def _layer(n=48, k=96, rows=512, seed=0):
    """A weight and correlated inputs with a few large channels (as LLM activations have)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(rows, k, generator=g) @ mix
    x[:, :3] *= 20.0
    return w, x


def _out_err(w, wq, x):
    return float(((x @ (wq - w).T) ** 2).mean())


def test_scale_search_and_gptq_beat_rtn_fp8_on_output_error():
    w, x = _layer()
    h = x.T @ x
    sc = rtn_scales(w)
    rtn = round_fp8(w, sc[:, None]) * sc[:, None]
    searched, _errs = quantize_linear(w, h, gptq=False)
    calibrated, _ = quantize_linear(w, h)
    e_rtn, e_search, e_gptq = (_out_err(w, q, x) for q in (rtn, searched.dequantize(), calibrated.dequantize()))
    assert e_search <= e_rtn
    assert e_gptq < 0.8 * e_rtn
    # the layout is fp8's: E4M3 codes, one float32 scale per output row
    assert calibrated.kind == "fp8" and calibrated.qweight.dtype == torch.float8_e4m3fn
    assert calibrated.scales.shape == (w.shape[0],) and calibrated.scales.dtype == torch.float32


def test_gptq_codes_lie_on_the_e4m3_grid_and_round_trip():
    w, x = _layer(n=8, k=32, rows=64, seed=1)
    sc = rtn_scales(w)
    codes = gptq_fp8(w, x.T @ x, sc)
    assert torch.equal(codes, codes.to(torch.float8_e4m3fn).float())
    assert codes.abs().max() <= 448.0


def test_smoothing_reduces_w8a8_error_with_outlier_channels():
    w, x = _layer(seed=2)
    s, alpha, mse0, best = search_smoothing(w, x, x.abs().mean(0))
    assert alpha > 0 and best < mse0
    # the smoothed pair computes the same function before rounding
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-4)
    assert torch.equal(fake_fp8_rows(torch.zeros(2, 4)), torch.zeros(2, 4))


def _tiny(model_dir):
    cfg = ModelConfig.from_dir(model_dir)
    return cfg, load_model(model_dir, cfg, torch.float32, CPU, 64, get_ops("torch", CPU))


def _batches(cfg, n=2, length=24):
    return [torch.randint(0, cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def test_fp8_gptq_keeps_fp8_layout_and_the_models_function(model_dirs):
    """On held-out tokens of the tiny random model, the calibrated model stays as close to the float
    one as plain fp8 (within 1.5x: a random model's activations have no outliers to win on)."""
    cfg, model = _tiny(model_dirs["llama"])
    _, rtn = _tiny(model_dirs["llama"])
    ids = torch.randint(0, cfg.vocab_size, (32,), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ref = model.compute_logits(_hidden(model, ids))
    report = quantize_model(model, "fp8-gptq", backend="reference", calib_batches=_batches(cfg, 4, 64))
    quantize_model(rtn, "fp8", backend="reference")
    layers = [m for m in model.modules() if isinstance(m, _QuantLinear)]
    assert layers and {m.kind for m in layers} == {"fp8"}
    assert report["mean_err_ratio"] < 1.0  # calibrated weights: less error than RTN on calibration inputs
    with torch.no_grad():
        err = (model.compute_logits(_hidden(model, ids)) - ref).pow(2).mean()
        err_rtn = (rtn.compute_logits(_hidden(rtn, ids)) - ref).pow(2).mean()
    assert err < 1.5 * err_rtn


def _hidden(model, ids):
    from workers.quant.prefill import prefill_hidden

    return prefill_hidden(model, ids)


def test_fp8_gptq_refusals_match_fp8(model_dirs):
    cfg, model = _tiny(model_dirs["llama"])
    with pytest.raises(
        QuantizationError, match=r"fp8 needs a GPU with fp8 tensor cores.*on CPU use int8, int4 or gguf"
    ):
        quantize_model(model, "fp8-gptq", calib_batches=_batches(cfg))
    with pytest.raises(QuantizationError, match="fp8-gptq needs calibration batches"):
        quantize_model(model, "fp8-gptq", backend="reference")
    with pytest.raises(ValueError, match="quantization fp8-gptq needs a GPU with fp8 tensor cores"):
        EngineConfig(model=str(model_dirs["llama"]), device="cpu", quantization="fp8-gptq")


def test_saved_fp8_gptq_checkpoint_reloads_to_identical_weights(model_dirs, tmp_path):
    src, dst = model_dirs["llama"], tmp_path / "llama-fp8-gptq"
    summary = quantize_checkpoint(src, dst, "fp8-gptq", calib={"num_seqs": 2, "seq_len": 24})
    assert summary["awq"]["mean_err_ratio"] < 1.0
    saved = read_quant_config(dst)
    assert saved["scheme"] == "fp8-gptq" and saved["group_size"] is None
    tensors = load_file(str(dst / "model.safetensors"))
    # smoothing was folded into the norms: they are saved changed
    _cfg, float_model = _tiny(src)
    assert not torch.equal(
        tensors["model.layers.0.input_layernorm.weight"], float_model.model.layers[0].input_layernorm.weight
    )

    # reload into empty fp8 layers (what the loader does before the device check a GPU passes)
    _, model = _tiny(src)
    prepare_empty(model, saved_layer_kinds(model, saved))
    model.load_weights(iter_safetensors(dst))
    for name, layer in model.named_modules():
        if isinstance(layer, _QuantLinear):
            assert not layer.missing()
            if "o_proj" in name or "down_proj" in name:
                assert torch.equal(layer.layout.qweight.view(torch.uint8), tensors[f"{name}.qweight"].view(torch.uint8))
                assert torch.equal(layer.layout.scales, tensors[f"{name}.scales"])
    norm = model.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, tensors["model.layers.0.input_layernorm.weight"])
    # and serving it on a CPU is refused as fp8 is
    from workers.engine import Engine

    with pytest.raises(QuantizationError, match="fp8 needs a GPU"):
        Engine(EngineConfig(model=str(dst), device="cpu", page_size=4, num_pages=64, max_model_len=128))
