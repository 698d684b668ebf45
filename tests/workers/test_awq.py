"""AWQ calibration (workers/quant/awq.py): the folded scales leave the float model's function
unchanged, the searched scales cut the int4 error where inputs have outlier channels, and the
shipped calibration text is cut into the sequences asked for."""

import copy

import pytest
import torch

from cluster.demo.model import shipped_demo_pair
from workers.kernels.ops import get_ops
from workers.models.config import ModelConfig
from workers.models.loader import load_model
from workers.models.tokenizer import load_tokenizer
from workers.quant.awq import AWQError, apply_awq, fake_int4, reference_fake_int4, search_clip, search_scale
from workers.quant.calibration import CALIBRATION_TEXT, CalibrationTextError, load_calibration_batches
from workers.quant.prefill import prefill_logits


@pytest.fixture(scope="module")
def draft():
    path = shipped_demo_pair()[1]
    model = load_model(
        path, ModelConfig.from_dir(path), torch.float32, torch.device("cpu"), 512, get_ops("torch", "cpu")
    )
    return model, load_tokenizer(path)


def _linears(model):
    for layer in model.model.layers:
        yield from (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)


def _fake_quantize(model, group_size):
    for lin in _linears(model):
        lin.weight.data.copy_(reference_fake_int4(lin.weight.data, group_size))
    return model


def test_folded_scales_leave_the_float_model_output_unchanged(draft):
    model, tok = draft
    batches = load_calibration_batches(tok, num_seqs=2, seq_len=128)
    probe = batches[1][:64]
    before = prefill_logits(model, probe)
    awq = copy.deepcopy(model)
    report = apply_awq(awq, batches[:1], group_size=64, clip=False)
    # the scales did move weights: every linear of every layer got an alpha, most of them above 0
    assert len(report["layers"]) == 4 * len(model.model.layers)
    assert sum(e["alpha"] > 0 for e in report["layers"]) >= len(report["layers"]) // 2
    norm_before = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(awq.model.layers[0].input_layernorm.weight, norm_before)
    torch.testing.assert_close(prefill_logits(awq, probe), before, atol=2e-4, rtol=2e-4)


def test_awq_lowers_the_int4_model_error_against_rtn(draft):
    model, tok = draft
    batches = load_calibration_batches(tok, num_seqs=3, seq_len=128)
    probe = batches[2]  # not calibrated on
    ref = prefill_logits(model, probe)
    rtn = _fake_quantize(copy.deepcopy(model), 64)
    awq = copy.deepcopy(model)
    report = apply_awq(awq, batches[:2], group_size=64)
    _fake_quantize(awq, 64)
    assert report["mean_mse_ratio"] < 1.0
    err_rtn = (prefill_logits(rtn, probe) - ref).pow(2).mean()
    err_awq = (prefill_logits(awq, probe) - ref).pow(2).mean()
    assert err_awq < err_rtn


def test_scale_search_protects_outlier_input_channels():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) * 0.02
    x = torch.randn(512, 256, generator=gen)
    x[:, [3, 77, 140, 201]] *= 40.0  # a few salient channels, as in LLM activations
    s, alpha, mse_rtn, mse = search_scale(w, x, x.abs().mean(0), group_size=64)
    assert alpha > 0
    assert s[[3, 77, 140, 201]].min() > s.median()  # the outlier channels get the larger scales
    assert mse < 0.5 * mse_rtn
    # the chosen scale's error, recomputed by hand: (x / s) Q(W s)^T against x W^T
    recomputed = ((x / s) @ fake_int4(w * s, 64).T - x @ w.T).pow(2).mean()
    assert float(recomputed) == pytest.approx(mse, rel=1e-4)


def test_fast_fake_int4_is_the_reference_round_trip():
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    w[:, 7] = 3.0  # an outlier column stretches its groups
    torch.testing.assert_close(fake_int4(w, 64), reference_fake_int4(w, 64), atol=1e-7, rtol=0)


def test_clip_search_never_raises_the_error_and_lowers_it_for_heavy_tails():
    gen = torch.Generator().manual_seed(1)
    w = torch.distributions.StudentT(2.0).sample((32, 128))  # heavy-tailed: clipping pays
    x = torch.randn(256, 128, generator=gen)
    clipped, before, after = search_clip(w, x, group_size=64)
    assert after < before
    assert clipped.abs().amax() <= w.abs().amax()


def test_group_size_that_does_not_divide_a_layer_is_refused(draft):
    model, tok = draft
    with pytest.raises(AWQError, match="does not divide layer 0 qkv's 192 input columns"):
        apply_awq(copy.deepcopy(model), load_calibration_batches(tok, 1, 32), group_size=128)


def test_calibration_batches_are_consecutive_windows_of_the_shipped_text(draft):
    _, tok = draft
    batches = load_calibration_batches(tok, num_seqs=4, seq_len=100)
    assert [tuple(b.shape) for b in batches] == [(100,)] * 4
    assert all(b.dtype == torch.int64 for b in batches)
    ids = tok(CALIBRATION_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    assert torch.cat(batches).tolist() == ids[:400]
    assert tok.decode(ids[:400]).startswith("Module ")
    with pytest.raises(CalibrationTextError, match="ask for fewer or shorter sequences"):
        load_calibration_batches(tok, num_seqs=10_000, seq_len=512)
