"""Calibrated fp8 (`fp8-gptq`): the same on-device layout as `fp8` (E4M3 codes, one float32 scale per
output channel, activations rounded to E4M3 per token at run time on Hopper), with weights and scales
chosen on the shipped calibration text instead of by round-to-nearest. Three steps per decoder layer,
on the float model (tensor parallelism 1):

1. Smoothing (SmoothQuant; Xiao et al. 2022): per input channel s = mean|x| ** alpha, the linear's
   columns times s, its input divided by s, folded into what produces the input (the RMSNorm weight
   for qkv and gate_up, the up rows for down, the v rows for o: workers/quant/awq.py's table), so
   nothing is computed at run time. alpha is searched on a grid for the least output error of the
   *whole* fp8 path on calibration rows, per-token activation rounding included (alpha 0 is plain
   fp8, so the search never does worse on them). The per-token activation scale is what makes
   activation outliers costly: one large channel coarsens every other channel of that token.
2. Scale search: per output row, the clipping ratio of its abs max (CLIP_GRID) with the least output
   error d H d^T, H = X^T X over the calibration tokens (of the smoothed inputs).
3. GPTQ (Frantar et al. 2022) with those scales fixed and E4M3 rounding as the quantizer: columns in
   act-order (largest H diagonal first), each column's rounding error spread over the columns not yet
   quantized through the Cholesky factor of H^-1 (damped by DAMP of its mean diagonal).

The result is one `QuantWeight("fp8", ...)` per linear, which `quantize_model` puts in place of RTN's.
"""

from __future__ import annotations

import torch

from workers.quant.awq import _linears, _scale_columns, _scale_rows, collect_input_stats
from workers.quant.layout import QuantizationError, QuantWeight

FP8_MAX = 448.0
ALPHA_GRID = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75)
CLIP_GRID = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85)  # of each row's abs max
DAMP = 0.01
BLOCK = 128
SAMPLE_ROWS = 256  # calibration rows per linear kept for the smoothing search


def fake_fp8_rows(x: torch.Tensor) -> torch.Tensor:
    """x rounded to E4M3 with one dynamic scale per row (token), and back: the W8A8 path's input."""
    scale = (x.float().abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return ((x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def round_fp8(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """E4M3 codes (as float32 values) of w / scales, scales broadcast against w."""
    return (w / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def rtn_scales(w: torch.Tensor) -> torch.Tensor:
    return (w.float().abs().amax(1) / FP8_MAX).clamp_min(1e-12)


class _Inputs:
    """Per linear: H = sum x^T x over every calibration token, sum |x| per channel, a row sample."""

    def __init__(self):
        self.h: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        self.rows = 0
        self.samples: list[torch.Tensor] = []

    def __call__(self, module, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        self.h = x.T @ x if self.h is None else self.h.addmm_(x.T, x)
        s = x.abs().sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.rows += x.shape[0]
        self.samples.append(x[:: max(1, x.shape[0] // 64)][:64].clone())

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)

    def x(self) -> torch.Tensor:
        x = torch.cat(self.samples)
        return x[:: -(-x.shape[0] // SAMPLE_ROWS)]


def collect_inputs(model, calib_batches: list[torch.Tensor]) -> list[dict[str, _Inputs]]:
    return collect_input_stats(model, calib_batches, _Inputs)


def _w8a8_mse(w: torch.Tensor, x: torch.Tensor, s_cols: torch.Tensor) -> float:
    """Output error of the fp8 path (RTN weight, per-token input) after smoothing by s_cols."""
    ws = w * s_cols
    sc = rtn_scales(ws)
    wq = round_fp8(ws, sc[:, None]) * sc[:, None]
    return float(((x @ w.T - fake_fp8_rows(x / s_cols) @ wq.T) ** 2).mean())


def search_smoothing(w, x, mean_abs, pool=None, expand=None) -> tuple[torch.Tensor, float, float, float]:
    """(s, alpha, mse at alpha 0, best mse) over s = mean_abs ** alpha (see the module docstring)."""
    w = w.float()
    base = (pool(mean_abs) if pool else mean_abs).clamp_min(1e-6)
    best = (torch.ones_like(base), 0.0, float("inf"))
    mse0 = float("nan")
    for alpha in ALPHA_GRID:
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        mse = _w8a8_mse(w, x, expand(s) if expand else s)
        if alpha == 0.0:
            mse0 = mse
        if mse < best[2]:
            best = (s, alpha, mse)
    return best[0], best[1], mse0, best[2]


def search_scales(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per output row, the scale (clip ratio * abs max / 448) of least d H d^T."""
    w = w.float()
    amax = w.abs().amax(1).clamp_min(1e-12)
    best_err = torch.full_like(amax, float("inf"))
    best = amax / FP8_MAX
    for ratio in CLIP_GRID:
        sc = amax * ratio / FP8_MAX
        d = round_fp8(w, sc[:, None]) * sc[:, None] - w
        err = ((d @ h) * d).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, sc, best)
    return best


def gptq_fp8(w: torch.Tensor, h: torch.Tensor, scales: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """GPTQ with E4M3 rounding at fixed per-row `scales`: the E4M3 codes [N, K] (float32 values)."""
    w = w.float().clone()
    h = h.float().clone()
    _n, k = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, perm], h[perm][:, perm]
    h += torch.eye(k) * (damp * torch.diag(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    sc = scales[:, None].float()
    codes = torch.zeros_like(w)
    for i0 in range(0, k, BLOCK):
        i1 = min(i0 + BLOCK, k)
        wb = w[:, i0:i1].clone()
        err = torch.zeros_like(wb)
        hb = hinv[i0:i1, i0:i1]
        for j in range(i1 - i0):
            col = wb[:, j : j + 1]
            q = round_fp8(col, sc)
            codes[:, i0 + j] = q[:, 0]
            e = (col - q * sc) / hb[j, j]
            wb[:, j:] -= e @ hb[j : j + 1, j:]
            err[:, j] = e[:, 0]
        w[:, i1:] -= err @ hinv[i0:i1, i1:]
    return codes[:, torch.argsort(perm)]


def quantize_linear(w: torch.Tensor, h: torch.Tensor, gptq: bool = True) -> tuple[QuantWeight, dict]:
    """One linear's fp8 weight from its calibration H: scale search, then GPTQ (or RTN at those scales)."""
    w = w.float()
    scales = search_scales(w, h)
    codes = gptq_fp8(w, h, scales) if gptq else round_fp8(w, scales[:, None])
    out = QuantWeight("fp8", codes.to(torch.float8_e4m3fn), scales.float())

    def err(wq):
        d = wq - w
        return float(((d @ h) * d).sum() / max(float(torch.diag(h).sum()), 1e-30))

    rtn = rtn_scales(w)
    return out, {"err_rtn": err(round_fp8(w, rtn[:, None]) * rtn[:, None]), "err": err(out.dequantize())}


@torch.no_grad()
def apply_fp8_gptq(model, calib_batches: list[torch.Tensor], smooth: bool = True) -> tuple[dict, dict]:
    """Calibrate every decoder layer's linears (module docstring). Folds the smoothing into the
    model in place (it stays float and computes the same function) and returns ({layer name:
    QuantWeight}, report). The report gives per linear the smoothing alpha and the weight error of
    RTN and of the calibrated weight (d H d^T over trace H), and their mean ratio."""
    tp = getattr(model, "tp", None)
    if tp is not None and tp.size > 1:
        raise QuantizationError(
            "fp8-gptq calibrates a whole model: quantize it once with `kvfleet quantize --scheme fp8-gptq` "
            "(tensor parallelism 1), then serve the saved checkpoint"
        )
    if not calib_batches:
        raise QuantizationError("fp8-gptq needs calibration batches (token id tensors); none were given")
    stats = collect_inputs(model, calib_batches)
    names = {id(m): name for name, m in model.named_modules()}
    layouts, report = {}, []
    for i, layer in enumerate(model.model.layers):
        alphas = _smooth_layer(layer, stats[i]) if smooth else {}
        for name, lin in _linears(layer).items():
            s = alphas.get(name, (None, 0.0))[0]
            h = stats[i][name].h if s is None else stats[i][name].h / s[:, None] / s[None, :]
            layouts[names[id(lin)]], errs = quantize_linear(lin.weight.data, h)
            report.append({"layer": i, "linear": name, "alpha": alphas.get(name, (None, 0.0))[1], **errs})
    ratios = [e["err"] / e["err_rtn"] for e in report if e["err_rtn"] > 0]
    summary = {
        "calibration_tokens": sum(int(b.numel()) for b in calib_batches),
        "smooth": smooth,
        "mean_err_ratio": sum(ratios) / max(len(ratios), 1),
        "layers": report,
    }
    return layouts, summary


def _smooth_layer(layer, st: dict[str, _Inputs]) -> dict[str, tuple[torch.Tensor, float]]:
    """Search and fold each linear's smoothing; returns linear -> (s per input column, alpha)."""
    attn, mlp = layer.self_attn, layer.mlp
    lin = _linears(layer)
    out = {}
    for name, norm in (("qkv", layer.input_layernorm), ("gate_up", layer.post_attention_layernorm)):
        s, alpha, _, _ = search_smoothing(lin[name].weight, st[name].x(), st[name].mean_abs())
        _scale_columns(lin[name], s)
        norm.weight.div_(s.to(norm.weight.dtype))
        out[name] = (s, alpha)
    inter = mlp.gate_up_proj.weight.shape[0] // 2
    s, alpha, _, _ = search_smoothing(lin["down"].weight, st["down"].x(), st["down"].mean_abs())
    _scale_columns(lin["down"], s)
    _scale_rows(mlp.gate_up_proj, inter, 2 * inter, 1.0 / s)
    out["down"] = (s, alpha)
    nkv, hd = attn.num_kv_heads, attn.head_dim
    group = attn.num_heads // nkv

    def pool(m):
        return m.reshape(nkv, group, hd).mean(1).reshape(-1)

    def expand(s):
        return s.reshape(nkv, 1, hd).expand(nkv, group, hd).reshape(-1)

    s, alpha, _, _ = search_smoothing(lin["o"].weight, st["o"].x(), st["o"].mean_abs(), pool=pool, expand=expand)
    _scale_columns(lin["o"], expand(s))
    v_start = attn.q_size + attn.kv_size
    _scale_rows(attn.qkv_proj, v_start, v_start + attn.kv_size, 1.0 / s)
    out["o"] = (expand(s), alpha)
    return out
