"""`kvfleet bench quality` end to end on the shipped tiny draft model and a slice of the held-out
text: its numbers are what they claim to be (perplexity against transformers' own NLL on the same
windows, KL and agreement of the unquantized model against itself) and the schemes are ordered as
their precision says."""

import json
import math

import pytest
import torch
import transformers

from cluster.bench.quality import EVAL_TEXT, Scores, fake_quantize, linears
from cluster.cli import build_parser
from cluster.demo.model import shipped_demo_pair
from workers.kernels import quant_reference as qr
from workers.kernels.ops import get_ops
from workers.models.config import ModelConfig
from workers.models.loader import load_model
from workers.models.tokenizer import load_tokenizer
from workers.quant.calibration import tokenize_windows

NUM_SEQS, SEQ_LEN = 2, 48


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "quality-cpu.json"
    model = str(shipped_demo_pair()[1])
    argv = ["bench", "quality", "--model", model, "--num-seqs", str(NUM_SEQS), "--seq-len", str(SEQ_LEN)]
    argv += ["--calib-seqs", "2", "--calib-seq-len", "64", "--path", "fake-quant", "--json", str(out)]
    args = build_parser().parse_args(argv)
    args.func(args)
    return json.loads(out.read_text())


def test_unquantized_perplexity_is_exp_of_transformers_mean_nll(report):
    path = shipped_demo_pair()[1]
    windows = tokenize_windows(load_tokenizer(path), EVAL_TEXT.read_text(), NUM_SEQS, SEQ_LEN, "eval")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(hf(w[None]).logits[0, :-1], w[1:], reduction="sum") for w in windows]
    none = next(r for r in report["schemes"] if r["scheme"] == "none")
    assert none["positions"] == NUM_SEQS * (SEQ_LEN - 1)
    assert none["perplexity"] == pytest.approx(math.exp(float(sum(nll)) / none["positions"]), rel=1e-4)


def test_unquantized_model_agrees_with_itself_and_schemes_rank_by_precision(report):
    rows = {r["scheme"]: r for r in report["schemes"]}
    assert list(rows) == [
        "none",
        "fp8",
        "fp8-w8a16",
        "fp8-gptq",
        "fp8-gptq-w8a16",
        "int8",
        "int4",
        "int4-awq",
    ]  # gguf needs a GGUF model
    assert rows["none"]["kl_mean"] == 0.0 and rows["none"]["top1_agreement"] == 1.0
    assert rows["none"]["perplexity_change_pct"] == 0.0
    for name in ("fp8", "fp8-w8a16", "fp8-gptq", "fp8-gptq-w8a16", "int8", "int4", "int4-awq"):
        assert rows[name]["path"] == "fake-quant"
        assert rows[name]["kl_mean"] > 0 and 0 < rows[name]["top1_agreement"] <= 1
        assert math.isfinite(rows[name]["perplexity"])
    assert rows["int8"]["kl_mean"] < rows["int4"]["kl_mean"]
    # fp8's activation rounding (W8A8) costs on top of its weights' (W8A16)
    assert rows["fp8-w8a16"]["kl_mean"] < rows["fp8"]["kl_mean"]
    assert rows["fp8-gptq-w8a16"]["kl_mean"] < rows["fp8-gptq"]["kl_mean"]
    assert report["fp8_gptq"]["calibration_tokens"] == 2 * 64
    assert report["group_size"] == 64  # 128 does not divide the draft's 192 hidden columns
    assert report["awq"]["mean_mse_ratio"] < 1.0
    assert any("gguf skipped" in n for n in report["notes"])


def test_scores_match_hand_computed_kl_nll_and_agreement():
    ref = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    other = torch.log(torch.tensor([[0.25, 0.5, 0.25], [0.2, 0.6, 0.2]]))
    s = Scores()
    s.add(ref, other, torch.tensor([0, 1]))
    kl = 0.5 * math.log(2) + 0.25 * math.log(0.5) + (0.1 * math.log(0.5) * 2 + 0.8 * math.log(0.8 / 0.6))
    assert s.kl == pytest.approx(kl, rel=1e-5)
    assert s.nll == pytest.approx(-(math.log(0.25) + math.log(0.6)), rel=1e-5)
    assert (s.agree, s.positions) == (1, 2)


@pytest.mark.parametrize("scheme", ["fp8", "fp8-w8a16", "int8", "int4"])
def test_fake_quant_weights_are_the_reference_round_trip(scheme):
    path = shipped_demo_pair()[1]
    model = load_model(
        path, ModelConfig.from_dir(path), torch.float32, torch.device("cpu"), 64, get_ops("torch", "cpu")
    )
    w = linears(model)[0].weight.detach().clone()
    fake_quantize(model, scheme, 64)
    expected = {
        "fp8": lambda: qr.dequant_fp8(*qr.quantize_fp8(w)),
        "fp8-w8a16": lambda: qr.dequant_fp8(*qr.quantize_fp8(w)),
        "int8": lambda: qr.dequant_int8(*qr.quantize_int8(w, 64)),
        "int4": lambda: qr.dequant_int4(*qr.quantize_int4(w, 64)),
    }[scheme]()
    torch.testing.assert_close(linears(model)[0].weight, expected, atol=0, rtol=0)
    assert not torch.equal(linears(model)[0].weight, w)
