"""`kvfleet bench quality`: what each weight-quantization scheme costs a model in quality, on held-out
text (cluster/bench/data/eval.txt, PSF-licensed CPython docstrings and code, see its README).

For each scheme (none, fp8, int8, int4, int4-awq; gguf too when the model is a GGUF file and the
quantized layers are there), the same model is quantized and run over the same token sequences as
the unquantized one. Reported per scheme: perplexity (exp of the mean next-token NLL) and its change
against `none`, top-1 agreement with `none` (the share of positions whose argmax token is the same)
and the mean KL divergence KL(P_none || P_scheme) of the next-token distributions.

How a scheme is applied is stated in the output (`path`):
- `kernels`: `workers.quant.quantize_model` (the quantized layers and their kernels), when present;
- `fake-quant`: each linear weight (QKV, O, gate/up, down; not the embedding or LM head) is quantized
  and dequantized in place with workers/kernels/quant_reference.py, which is by definition what the
  kernels compute. fp8 also rounds each linear's input to fp8 per token (Hopper's W8A8 path);
  `fp8-w8a16` (fake-quant only) rounds the weights alone, as fp8 runs where there are no fp8 tensor
  cores, which tells the weights' share of fp8's cost from the activations';
  int8/int4 are weight-only (W8A16, W4A16); int4-awq runs workers/quant/awq.py on the shipped
  calibration text first; fp8-gptq runs workers/quant/fp8_calib.py on it (smoothing folded into the
  model, then its calibrated fp8 weights) and rounds the inputs as fp8 does; `fp8-gptq-w8a16`
  (fake-quant only) is its weights alone.
A model that ships quantized (the default, SmolLM2-135M-Instruct in GGUF Q4_1) is measured against
its dequantized float weights: those are `none`, and each scheme re-quantizes them.

    kvfleet bench quality --json bench/results/quality-cpu.json
    kvfleet bench quality --model /models/my-hf-dir --schemes none int8 int4 int4-awq
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from workers.kernels import quant_reference as qr
from workers.kernels.ops import get_ops
from workers.models.config import ModelConfig
from workers.models.gguf_file import find_gguf
from workers.models.loader import load_model
from workers.models.tokenizer import load_tokenizer
from workers.quant.awq import apply_awq
from workers.quant.calibration import load_calibration_batches, tokenize_windows
from workers.quant.fp8_calib import apply_fp8_gptq
from workers.quant.prefill import prefill_logits

EVAL_TEXT = Path(__file__).resolve().parent / "data" / "eval.txt"
SCHEMES = ("none", "fp8", "fp8-w8a16", "fp8-gptq", "fp8-gptq-w8a16", "int8", "int4", "int4-awq", "gguf")
TARGETS = {"fp8": 1.0, "fp8-gptq": 1.0, "int8": 2.0}  # the bounds on the perplexity change, percent


@dataclass
class Scores:
    """Running sums over the evaluated positions of one scheme."""

    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    positions: int = 0

    def add(self, ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Position i's logits predict targets[i]; ref_logits are the unquantized model's."""
        logp = torch.log_softmax(logits.float(), -1)
        ref_logp = torch.log_softmax(ref_logits.float(), -1)
        self.nll -= float(logp.gather(-1, targets[:, None]).sum())
        self.kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
        self.agree += int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
        self.positions += targets.shape[0]


@dataclass
class SchemeQuality:
    scheme: str
    path: str  # "kernels" or "fake-quant"
    perplexity: float
    perplexity_change_pct: float
    top1_agreement: float
    kl_mean: float
    positions: int
    quantize_s: float
    eval_s: float


@dataclass
class QualityReport:
    model: str
    baseline: str
    group_size: int
    eval_text: str
    eval_sequences: int
    seq_len: int
    schemes: list[SchemeQuality]
    targets: dict[str, bool]
    awq: dict | None = None
    fp8_gptq: dict | None = None  # its calibration report, per linear kind (workers/quant/fp8_calib.py)
    notes: list[str] = field(default_factory=list)
    machine: dict = field(default_factory=dict)


def kernels_quantize_model():
    """`workers.quant.quantize_model` if the quantized layers are installed, else None."""
    try:
        from workers.quant import quantize_model
    except ImportError:
        return None
    return quantize_model


def linears(model) -> list[torch.nn.Module]:
    out = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out += [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
    return out


def auto_group_size(model, preferred: int = 128) -> int:
    """The largest of preferred, 64, 32 that divides every linear's input columns."""
    widths = {lin.weight.shape[1] for lin in linears(model)}
    for g in (preferred, 64, 32):
        if all(w % g == 0 for w in widths):
            return g
    raise ValueError(f"no group size of {preferred}, 64 or 32 divides the layers' input widths {sorted(widths)}")


def _fp8_rows(module, args):
    """A linear's input rounded to fp8 E4M3 with one dynamic scale per token, and back."""
    x = args[0]
    scale = (x.float().abs().amax(-1, keepdim=True) / 448.0).clamp_min(1e-12)
    q = (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return ((q.float() * scale).to(x.dtype), *args[1:])


def fake_quantize(model, scheme: str, group_size: int) -> None:
    """Quantize and dequantize each linear weight in place (see the module docstring)."""
    for lin in linears(model):
        w = lin.weight.data
        if scheme in ("fp8", "fp8-w8a16"):
            deq = qr.dequant_fp8(*qr.quantize_fp8(w))
            if scheme == "fp8":
                lin.register_forward_pre_hook(_fp8_rows)
        elif scheme == "int8":
            deq = qr.dequant_int8(*qr.quantize_int8(w, group_size))
        elif scheme in ("int4", "int4-awq"):
            deq = qr.dequant_int4(*qr.quantize_int4(w, group_size))
        else:
            raise ValueError(f"fake-quant has no scheme {scheme!r}")
        w.copy_(deq.to(w.dtype))


def quantized_copy(base, scheme: str, group_size: int, path: str, calib: list[torch.Tensor]):
    """(a quantized copy of `base`, the calibration report if int4-awq or fp8-gptq ran here)."""
    model = copy.deepcopy(base)
    if scheme == "none":
        return model, None
    if path == "kernels":
        calibrated = scheme in ("int4-awq", "fp8-gptq")
        report = kernels_quantize_model()(
            model, scheme, group_size=group_size, calib_batches=calib if calibrated else None
        )
        return model, report
    if scheme.startswith("fp8-gptq"):
        layouts, report = apply_fp8_gptq(model, calib)
        for name, lin in model.named_modules():
            if name in layouts:
                lin.weight.data.copy_(layouts[name].dequantize().to(lin.weight.dtype))
                if scheme == "fp8-gptq":
                    lin.register_forward_pre_hook(_fp8_rows)
        return model, report
    awq = apply_awq(model, calib, group_size=group_size) if scheme == "int4-awq" else None
    fake_quantize(model, scheme, group_size)
    return model, awq


def run_quality(
    model_path: str | Path,
    schemes: list[str],
    num_seqs: int = 8,
    seq_len: int = 512,
    calib_seqs: int = 16,
    calib_seq_len: int = 512,
    group_size: int | None = None,
    path: str = "auto",
    text_path: Path = EVAL_TEXT,
    log=print,
) -> QualityReport:
    model_path = Path(model_path)
    is_gguf = find_gguf(model_path) is not None
    cfg = ModelConfig.from_dir(model_path)
    base = load_model(
        model_path, cfg, torch.float32, torch.device("cpu"), max(seq_len, calib_seq_len), get_ops("torch", "cpu")
    )
    tok = load_tokenizer(model_path)
    group_size = group_size or auto_group_size(base)
    if path == "auto":
        path = "kernels" if kernels_quantize_model() is not None else "fake-quant"
    if path == "kernels" and kernels_quantize_model() is None:
        raise ValueError("--path kernels needs workers.quant.quantize_model, which this install lacks")
    notes = []
    if "gguf" in schemes and not (is_gguf and path == "kernels"):
        schemes = [s for s in schemes if s != "gguf"]
        notes.append(
            "gguf skipped: it needs a GGUF model and the quantized layers (path kernels); "
            "as fake-quant it would be the float baseline itself"
        )
    schemes = ["none", *[s for s in schemes if s != "none"]]
    for diag in ("fp8-w8a16", "fp8-gptq-w8a16"):
        if diag in schemes and path == "kernels":
            schemes = [s for s in schemes if s != diag]
            notes.append(f"{diag} skipped: a fake-quant diagnostic (the kernels' fp8 is chosen by the device)")
    if "fp8" in schemes and path == "fake-quant":
        notes.append("fp8 fake-quant: weights per output channel and each linear's input per token (W8A8)")
    sequences = tokenize_windows(tok, text_path.read_text(encoding="utf-8"), num_seqs, seq_len, text_path.name)
    calibrated = any(s in ("int4-awq", "fp8-gptq", "fp8-gptq-w8a16") for s in schemes)
    calib = load_calibration_batches(tok, calib_seqs, calib_seq_len) if calibrated else []

    models, quantize_s, awq_report, gptq_report = {}, {}, None, None
    for scheme in schemes:
        t0 = time.perf_counter()
        if scheme == "fp8-gptq-w8a16" and "fp8-gptq" in models:  # the same calibration, inputs not rounded
            models[scheme], calib_report = copy.deepcopy(models["fp8-gptq"]), None
            for lin in linears(models[scheme]):
                lin._forward_pre_hooks.clear()
        else:
            models[scheme], calib_report = quantized_copy(base, scheme, group_size, path, calib)
        quantize_s[scheme] = time.perf_counter() - t0
        if scheme == "int4-awq":
            awq_report = calib_report
        elif calib_report is not None and scheme.startswith("fp8-gptq"):
            gptq_report = summarize_fp8_gptq(calib_report)
        log(f"{scheme}: ready in {quantize_s[scheme]:.1f} s")
    del base

    scores = {s: Scores() for s in schemes}
    eval_s = dict.fromkeys(schemes, 0.0)
    for i, ids in enumerate(sequences):
        ref = None
        for scheme, model in models.items():
            t0 = time.perf_counter()
            logits = prefill_logits(model, ids)[:-1]
            eval_s[scheme] += time.perf_counter() - t0
            ref = logits if ref is None else ref
            scores[scheme].add(ref, logits, ids[1:])
        running = "  ".join(f"{k} {math.exp(v.nll / v.positions):.3f}" for k, v in scores.items())
        log(f"sequence {i + 1}/{len(sequences)}: perplexity so far {running}")

    base_ppl = math.exp(scores["none"].nll / scores["none"].positions)
    rows = []
    for scheme in schemes:
        sc = scores[scheme]
        ppl = math.exp(sc.nll / sc.positions)
        rows.append(
            SchemeQuality(
                scheme=scheme,
                path="none" if scheme == "none" else path,
                perplexity=ppl,
                perplexity_change_pct=100.0 * (ppl / base_ppl - 1.0),
                top1_agreement=sc.agree / sc.positions,
                kl_mean=sc.kl / sc.positions,
                positions=sc.positions,
                quantize_s=round(quantize_s[scheme], 2),
                eval_s=round(eval_s[scheme], 2),
            )
        )
    return QualityReport(
        model=str(model_path),
        baseline=(
            "the GGUF file's weights dequantized to float32 (the model ships quantized)"
            if is_gguf
            else "the checkpoint's weights in float32"
        ),
        group_size=group_size,
        eval_text=text_path.name,
        eval_sequences=len(sequences),
        seq_len=seq_len,
        schemes=rows,
        targets=check_targets(rows),
        awq=None if awq_report is None else {k: v for k, v in awq_report.items() if k != "layers"},
        fp8_gptq=gptq_report,
        notes=notes,
        machine={"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    )


def summarize_fp8_gptq(report: dict) -> dict:
    """fp8-gptq's calibration report, per linear kind: mean smoothing alpha and mean weight error
    (d H d^T / trace H) of RTN fp8 and of the calibrated weights; the worst layers by RTN error."""
    out = {k: v for k, v in report.items() if k != "layers"}
    rows = report["layers"]
    for kind in sorted({r["linear"] for r in rows}):
        sel = [r for r in rows if r["linear"] == kind]
        out[kind] = {
            "alpha_mean": sum(r["alpha"] for r in sel) / len(sel),
            "err_rtn_mean": sum(r["err_rtn"] for r in sel) / len(sel),
            "err_mean": sum(r["err"] for r in sel) / len(sel),
        }
    worst = sorted(rows, key=lambda r: -r["err_rtn"])[:5]
    out["largest_rtn_error"] = [{k: r[k] for k in ("layer", "linear", "err_rtn", "err")} for r in worst]
    return out


def check_targets(rows: list[SchemeQuality]) -> dict[str, bool]:
    """The issue's targets that these rows can judge."""
    by = {r.scheme: r for r in rows}
    out = {
        f"{s} perplexity change <= {pct}%": by[s].perplexity_change_pct <= pct for s, pct in TARGETS.items() if s in by
    }
    if "int4" in by and "int4-awq" in by:
        out["int4-awq perplexity < int4 (RTN)"] = by["int4-awq"].perplexity < by["int4"].perplexity
    return out


def format_table(report: QualityReport) -> str:
    lines = [
        f"model {report.model} (baseline: {report.baseline}); group size {report.group_size}; "
        f"{report.eval_sequences} x {report.seq_len} tokens of {report.eval_text}",
        f"{'scheme':<15} {'path':<11} {'perplexity':>10} {'change':>8} {'top-1 agree':>11} {'KL mean':>9}",
    ]
    for r in report.schemes:
        lines.append(
            f"{r.scheme:<15} {r.path:<11} {r.perplexity:>10.3f} {r.perplexity_change_pct:>+7.2f}% "
            f"{r.top1_agreement:>11.4f} {r.kl_mean:>9.5f}"
        )
    lines += [f"target {name}: {'met' if ok else 'NOT met'}" for name, ok in report.targets.items()]
    return "\n".join(lines + report.notes)


def add_quality_parser(bench) -> None:
    p = bench.add_parser(
        "quality",
        help="perplexity, top-1 agreement and KL divergence per quantization scheme",
        description="kvfleet bench quality --json bench/results/quality-cpu.json",
    )
    p.add_argument("--model", help="HF model directory or GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    p.add_argument("--num-seqs", type=int, default=8, help="held-out sequences to evaluate")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-seqs", type=int, default=16, help="calibration sequences for int4-awq and fp8-gptq")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, help="int8/int4 group size (default: 128, else 64 or 32 if it divides)")
    p.add_argument("--path", choices=["auto", "kernels", "fake-quant"], default="auto")
    p.add_argument("--text", type=Path, default=EVAL_TEXT, help="held-out text file (default: the shipped one)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", help="also write the report here")
    p.set_defaults(func=cmd_quality)


def cmd_quality(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        from cluster.default_model import default_model_path

        model = default_model_path()
    report = run_quality(
        model,
        args.schemes,
        num_seqs=args.num_seqs,
        seq_len=args.seq_len,
        calib_seqs=args.calib_seqs,
        calib_seq_len=args.calib_seq_len,
        group_size=args.group_size,
        path=args.path,
        text_path=args.text,
    )
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(asdict(report), indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.bench.quality")
    add_quality_parser(parser.add_subparsers(dest="bench", required=True))
    args = parser.parse_args(["quality", *(sys.argv[1:] if argv is None else argv)])
    args.func(args)


if __name__ == "__main__":
    main()
