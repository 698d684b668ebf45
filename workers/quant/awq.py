"""Activation-aware weight quantization (AWQ; Lin et al. 2023), the calibration half of `int4-awq`:
the model stays float and computes the same function; its weights change so that round-to-nearest
int4 (workers/kernels/quant_reference.py `quantize_int4`, which follows) loses less.

A few input channels of each linear layer carry much larger activations than the rest; their weight
columns matter most, yet RTN gives them the same grid as the others. AWQ multiplies those columns by
s > 1 before quantizing (finer relative steps for them) and divides the input by s, folded into the
operation that produces the input, so nothing is computed at run time:

| linear (its input)               | s from                       | 1/s folded into                    |
| -------------------------------- | ---------------------------- | ---------------------------------- |
| qkv_proj (input_layernorm's out) | mean abs of its input        | input_layernorm.weight             |
| gate_up_proj (post-attn norm)    | mean abs of its input        | post_attention_layernorm.weight    |
| down_proj (silu(gate) * up)      | mean abs of its input        | the up rows of gate_up_proj        |
| o_proj (attention output)        | mean abs, pooled per kv head | the v rows of qkv_proj             |

o_proj's input channel (q head h, dim d) is a convex mix of v's channel (kv head h // group, dim d)
(attention weights sum to one), so with grouped-query attention one s per kv-head channel is shared
by the query heads of that group. Per layer and linear, s = mean|x| ** alpha with alpha searched on a
grid in [0, 1] for the least output error of the quantized layer on calibration inputs (alpha = 0 is
plain RTN, so the search never does worse on them). Then, optionally, each weight group's clipping
range is searched the same way (AWQ's clip search). Activations are gathered in one pass of the float
model with forward hooks; calibration batches come from workers/quant/calibration.py.
"""

from __future__ import annotations

import torch

from workers.kernels.quant_reference import dequant_int4, quantize_int4
from workers.quant.prefill import prefill_hidden

ALPHA_GRID = tuple(i / 10 for i in range(11))
CLIP_GRID = tuple(1.0 - i / 20 for i in range(10))  # 1.0 .. 0.55 of each group's abs max
ROWS_PER_BATCH = 64  # calibration rows kept per linear and batch for the error searches,
MAX_ROWS = 256  # and at most this many of them in all (evenly spread over the batches)


class AWQError(ValueError):
    pass


def fake_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w after int4 RTN and back (float32): what the int4 kernels multiply by. The arithmetic of
    quant_reference's `quantize_int4` then `dequant_int4` without packing the codes (the searches
    call it hundreds of times; tests hold it to the reference)."""
    n, k = w.shape
    if k % group_size:
        raise AWQError(f"group size {group_size} does not divide the {k} input columns")
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scales = ((hi - lo) / 15.0).clamp_min(1e-10)
    codes = torch.round((g - lo) / scales).clamp_(0, 15)
    return ((codes - 8.0) * scales + (lo + 8.0 * scales)).reshape(n, k)


def reference_fake_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return dequant_int4(*quantize_int4(w, group_size))


class _InputStats:
    """Per linear: sum of |x| per input channel, the row count, and a sample of input rows."""

    def __init__(self):
        self.abs_sum: torch.Tensor | None = None
        self.rows = 0
        self.samples: list[torch.Tensor] = []

    def __call__(self, module, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        s = x.abs().sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.rows += x.shape[0]
        step = max(1, x.shape[0] // ROWS_PER_BATCH)
        self.samples.append(x[::step][:ROWS_PER_BATCH].clone())

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)

    def x(self) -> torch.Tensor:
        x = torch.cat(self.samples)
        return x[:: -(-x.shape[0] // MAX_ROWS)]


def _linears(layer) -> dict[str, torch.nn.Module]:
    attn, mlp = layer.self_attn, layer.mlp
    return {"qkv": attn.qkv_proj, "o": attn.o_proj, "gate_up": mlp.gate_up_proj, "down": mlp.down_proj}


def _check(model, group_size: int) -> None:
    tp = getattr(model, "tp", None)
    if tp is not None and tp.size > 1:
        raise AWQError("AWQ calibrates a whole model: run it before tensor-parallel sharding (tp size 1)")
    for i, layer in enumerate(model.model.layers):
        for name, lin in _linears(layer).items():
            k = lin.weight.shape[1]
            if k % group_size:
                raise AWQError(
                    f"int4 group size {group_size} does not divide layer {i} {name}'s {k} input columns; "
                    f"use a group size that divides every layer's input (e.g. 64 or 32)"
                )


def collect_input_stats(model, calib_batches: list[torch.Tensor], stat=None) -> list[dict]:
    """Run the calibration batches through the float model; per decoder layer and linear, the
    statistics of its inputs: a `stat()` (default `_InputStats`) called with each input as a
    forward pre-hook."""
    stat = stat or _InputStats
    stats = [{name: stat() for name in _linears(layer)} for layer in model.model.layers]
    handles = [
        lin.register_forward_pre_hook(stats[i][name])
        for i, layer in enumerate(model.model.layers)
        for name, lin in _linears(layer).items()
    ]
    try:
        for batch in calib_batches:
            prefill_hidden(model, batch)
    finally:
        for h in handles:
            h.remove()
    return stats


def _output_mse(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (wq - w).T) ** 2).mean())


def search_scale(
    w: torch.Tensor, x: torch.Tensor, mean_abs: torch.Tensor, group_size: int, pool=None, expand=None
) -> tuple[torch.Tensor, float, float, float]:
    """The per-input-channel scale s (float32, [K], or pooled shape if `pool` is given) minimizing
    || x W^T - (x / s) Q(W s)^T ||^2 over s = mean_abs ** alpha; returns (s, alpha, mse at alpha 0,
    best mse). `pool` maps mean_abs to the shared channels, `expand` maps those back to W's columns."""
    w = w.float()
    base = (pool(mean_abs) if pool else mean_abs).clamp_min(1e-6)
    best = (torch.ones_like(base), 0.0, float("inf"))
    mse_rtn = float("nan")
    for alpha in ALPHA_GRID:
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales: keep W s in range
        s_cols = expand(s) if expand else s
        mse = _output_mse(w, fake_int4(w * s_cols, group_size) / s_cols, x)
        if alpha == 0.0:
            mse_rtn = mse
        if mse < best[2]:
            best = (s, alpha, mse)
    return best[0], best[1], mse_rtn, best[2]


def search_clip(w: torch.Tensor, x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, float, float]:
    """w with each (row, group) clipped to ratio * its abs max, the ratio from CLIP_GRID minimizing
    that group's share of the output error; returns (clipped w, mse before, mse after), never
    a larger error than before."""
    w = w.float()
    n, k = w.shape
    g = k // group_size
    xg = x.reshape(-1, g, group_size)
    amax = w.reshape(n, g, group_size).abs().amax(-1, keepdim=True)
    best_err = torch.full((n, g), float("inf"))
    best_w = w.clone()
    for ratio in CLIP_GRID:
        lim = (amax * ratio).expand(n, g, group_size).reshape(n, k)
        wc = torch.minimum(torch.maximum(w, -lim), lim)
        dw = (fake_int4(wc, group_size) - w).reshape(n, g, group_size)
        err = torch.einsum("ngk,tgk->tng", dw, xg).pow(2).mean(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        rows = better[:, :, None].expand(n, g, group_size).reshape(n, k)
        best_w = torch.where(rows, wc, best_w)
    before = _output_mse(w, fake_int4(w, group_size), x)
    after = _output_mse(w, fake_int4(best_w, group_size), x)
    # groups are chosen one by one (their errors add inside each output, cross terms unseen):
    # keep the weight as it was if the whole came out worse
    return (best_w, before, after) if after <= before else (w, before, before)


@torch.no_grad()
def apply_awq(model, calib_batches: list[torch.Tensor], group_size: int = 128, clip: bool = True) -> dict:
    """Scale (and clip) the model's linear weights in place for int4 group-wise RTN; the model
    stays float. Returns a small report: per layer and linear the chosen alpha, the output MSE on
    calibration inputs of plain RTN and of the scaled weights, the clip search's further factor on
    that error (`clip_gain`), and the mean ratio of AWQ's error to RTN's over all linears."""
    _check(model, group_size)
    if not calib_batches:
        raise AWQError("AWQ needs at least one calibration batch")
    stats = collect_input_stats(model, calib_batches)
    report = []
    for i, layer in enumerate(model.model.layers):
        report += _calibrate_layer(i, layer, stats[i], group_size, clip)
    ratios = [e["mse_awq"] * e.get("clip_gain", 1.0) / e["mse_rtn"] for e in report if e["mse_rtn"] > 0]
    return {
        "group_size": group_size,
        "clip": clip,
        "calibration_tokens": sum(int(b.numel()) for b in calib_batches),
        "mean_mse_ratio": sum(ratios) / max(len(ratios), 1),
        "layers": report,
    }


def _calibrate_layer(index: int, layer, st: dict[str, _InputStats], group_size: int, clip: bool) -> list[dict]:
    attn, mlp = layer.self_attn, layer.mlp
    lin = _linears(layer)
    rows = []  # (linear, alpha, mse rtn, mse scaled, s per column)
    for name, norm in (("qkv", layer.input_layernorm), ("gate_up", layer.post_attention_layernorm)):
        s, alpha, mse_rtn, mse = search_scale(lin[name].weight, st[name].x(), st[name].mean_abs(), group_size)
        _scale_columns(lin[name], s)
        norm.weight.div_(s.to(norm.weight.dtype))
        rows.append((name, alpha, mse_rtn, mse, s))

    # down: 1/s into the up rows of gate_up (silu(gate) * up is linear in up)
    inter = mlp.gate_up_proj.weight.shape[0] // 2
    s, alpha, mse_rtn, mse = search_scale(lin["down"].weight, st["down"].x(), st["down"].mean_abs(), group_size)
    _scale_columns(lin["down"], s)
    _scale_rows(mlp.gate_up_proj, inter, 2 * inter, 1.0 / s)
    rows.append(("down", alpha, mse_rtn, mse, s))

    # o: 1/s into the v rows of qkv, one s per kv-head channel shared by the query heads of its group
    nkv, hd = attn.num_kv_heads, attn.head_dim
    group = attn.num_heads // nkv

    def pool(m):
        return m.reshape(nkv, group, hd).mean(1).reshape(-1)

    def expand(s):
        return s.reshape(nkv, 1, hd).expand(nkv, group, hd).reshape(-1)

    s, alpha, mse_rtn, mse = search_scale(
        lin["o"].weight, st["o"].x(), st["o"].mean_abs(), group_size, pool=pool, expand=expand
    )
    _scale_columns(lin["o"], expand(s))
    v_start = attn.q_size + attn.kv_size
    _scale_rows(attn.qkv_proj, v_start, v_start + attn.kv_size, 1.0 / s)
    rows.append(("o", alpha, mse_rtn, mse, expand(s)))

    entries = []
    for name, alpha, mse_rtn, mse, s_cols in rows:
        entry = {"layer": index, "linear": name, "alpha": alpha, "mse_rtn": mse_rtn, "mse_awq": mse}
        if clip:
            # in the scaled coordinates: inputs x / s, the weight as scaled (its rows too)
            w = lin[name].weight
            clipped, before, after = search_clip(w, st[name].x() / s_cols, group_size)
            w.copy_(clipped.to(w.dtype))
            entry["clip_gain"] = after / before if before > 0 else 1.0
        entries.append(entry)
    return entries


def _scale_columns(linear, s: torch.Tensor) -> None:
    linear.weight.mul_(s.to(linear.weight.dtype))


def _scale_rows(linear, start: int, end: int, factor: torch.Tensor) -> None:
    linear.weight[start:end].mul_(factor.to(linear.weight.dtype)[:, None])
    if linear.bias is not None:
        linear.bias[start:end].mul_(factor.to(linear.bias.dtype))
