"""`quantize_model`: one handler per scheme rewrites a loaded float model's linear layers in place
(QKV, O, gate/up, down; the embedding and the LM head stay in the model dtype), each rank's
shard on its own, so scales follow the rows and columns that rank holds. On CPU the loader also
gives a quantized model an int8 logits matmul (`quantize_logits_head`).

| scheme    | layout (workers/kernels/quant_reference.py)   | CPU kernel               | CUDA kernel |
| --------- | --------------------------------------------- | ------------------------ | ----------- |
| int8      | int8 symmetric, group `group_size`            | avx2 (aten), per channel* | Triton      |
| int4      | int4 asymmetric, group `group_size`           | avx2 (aten)              | Triton      |
| int4-awq  | int4 after AWQ scaling (workers/quant/awq.py) | avx2 (aten)              | Triton      |
| fp8       | E4M3, per output channel                      | refused                  | Triton      |
| fp8-gptq  | fp8's, calibrated (workers/quant/fp8_calib.py) | refused                  | Triton      |

* aten's int8 kernel takes one scale per output row, so on CPU int8 is quantized per channel (group =
  the layer's input columns) whatever `group_size` says; the avx2 kernel keeps that rule (a machine
  where it cannot build falls back to aten with the same model), and it is also the cheapest to read.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.layers.basic import MergedLinear
from workers.layers.parallel import RowParallelLinear
from workers.quant.backends import CPU_KERNELS, Backend, check_device, get_backend
from workers.quant.layers import QuantLogitsHead, QuantMergedLinear, QuantRowParallelLinear, _QuantLinear
from workers.quant.layout import Kind, QuantizationError, QuantWeight, quantize_rtn

SCHEMES = ("fp8", "fp8-gptq", "int8", "int4", "int4-awq")
GROUP_SIZES_CPU_INT4 = (32, 64, 128, 256)  # what aten's int4 CPU kernel takes


def scheme_kind(scheme: str) -> Kind:
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return scheme.split("-")[0]  # type: ignore[return-value]  # a calibrated scheme keeps its kind's layout


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every float or quantized projection a scheme rewrites."""
    kinds = (MergedLinear, RowParallelLinear, _QuantLinear)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def input_columns(layer: nn.Module) -> int:
    """The input columns this rank's layer holds (a row-parallel layer's share of them)."""
    if isinstance(layer, _QuantLinear):
        return layer.in_features
    return layer.weight.shape[1]


def effective_group_size(kind: Kind, group_size: int, columns: int, backend: Backend) -> int:
    return columns if kind == "fp8" or (kind == "int8" and backend.name in CPU_KERNELS) else group_size


def check_group_size(model: nn.Module, kind: Kind, group_size: int, backend: Backend) -> None:
    """Refuse, naming the layer, a group size that does not divide a layer's (per-rank) input
    columns, or that the backend's kernel does not take."""
    if kind == "int4" and backend.name in CPU_KERNELS and group_size not in GROUP_SIZES_CPU_INT4:
        raise QuantizationError(
            f"int4 on CPU takes group sizes {', '.join(map(str, GROUP_SIZES_CPU_INT4))}, not {group_size}"
        )
    if group_size < 1:
        raise QuantizationError(f"quantization_group_size must be positive, got {group_size}")
    for name, layer in linear_layers(model):
        k = input_columns(layer)
        g = effective_group_size(kind, group_size, k, backend)
        if k % g or (kind == "int4" and g % 2):
            divisors = [d for d in (256, 128, 64, 32, 16) if k % d == 0]
            sharded = (
                " (this rank's share under tensor parallelism)"
                if isinstance(layer, RowParallelLinear) and layer.tp.size > 1
                else ""
            )
            hint = f"; group sizes that divide it: {', '.join(map(str, divisors))}" if divisors else ""
            raise QuantizationError(
                f"{kind} group size {group_size} does not divide the {k} input columns{sharded} of layer {name}{hint}"
            )


def quantize_model(
    model: nn.Module,
    scheme: str,
    group_size: int = 128,
    *,
    backend: str = "auto",
    calib_batches: list[torch.Tensor] | None = None,
    keep_layout: bool = False,
) -> dict | None:
    """Quantize `model`'s linear layers in place on their device. `backend`: 'auto' (aten on CPU,
    Triton on CUDA), 'aten', 'triton' or 'reference'. `int4-awq` first calls
    workers.quant.awq.apply_awq(model, calib_batches, group_size) and returns its report;
    `fp8-gptq` calls workers.quant.fp8_calib.apply_fp8_gptq(model, calib_batches), whose weights
    replace RTN's, and returns its report.
    `keep_layout` keeps the contract-layout tensors beside the backend's (for saving)."""
    kind = scheme_kind(scheme)
    device = next(model.parameters()).device
    if backend != "reference":  # the reference runs anywhere (saving an fp8 checkpoint on a CPU)
        check_device(kind, device)
    chosen = get_backend(kind, device, backend)
    check_group_size(model, kind, group_size, chosen)
    report, calibrated = None, {}
    if scheme == "int4-awq":
        report = _apply_awq(model, calib_batches, group_size)
    elif scheme == "fp8-gptq":
        calibrated, report = _apply_fp8_gptq(model, calib_batches)
    for name, layer in linear_layers(model):
        if isinstance(layer, _QuantLinear):
            raise QuantizationError(f"layer {name} is already quantized ({layer.kind})")
        g = effective_group_size(kind, group_size, input_columns(layer), chosen)
        if name in calibrated:
            cls = QuantMergedLinear if isinstance(layer, MergedLinear) else QuantRowParallelLinear
            new = cls.from_float(layer, kind, g, lambda w, q=calibrated[name]: q.to(w.device))
        elif isinstance(layer, MergedLinear):
            new = QuantMergedLinear.from_float(layer, kind, g, lambda w, g=g: quantize_rtn(w, kind, g))
        else:
            new = QuantRowParallelLinear.from_float(
                layer, kind, g, lambda w, g=g, tp=layer.tp: _rtn_shard(w, kind, g, tp)
            )
        new.finalize(chosen, keep_layout=keep_layout)
        _replace(model, name, new)
    return report


def _rtn_shard(w: torch.Tensor, kind: Kind, group_size: int, tp) -> QuantWeight:
    """RTN of a row-parallel layer's shard. A per-output-channel scale (fp8; int8 on the CPU
    kernel) spans the whole row, which the ranks hold in pieces: its absmax is reduced over them,
    so every rank quantizes with the scales one rank would use (TP=2 computes what TP=1 does)."""
    if tp.size == 1 or (kind != "fp8" and group_size != w.shape[1]):
        return quantize_rtn(w, kind, group_size)
    absmax = tp.all_reduce_max(w.float().abs().amax(1))
    wf = w.float()
    if kind == "fp8":
        scales = (absmax / 448.0).clamp_min(1e-12)
        return QuantWeight("fp8", (wf / scales[:, None]).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn), scales)
    scales = (absmax / 127.0).clamp_min(1e-10)
    codes = torch.round(wf / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return QuantWeight("int8", codes, scales[:, None])


def _apply_awq(model, calib_batches, group_size: int) -> dict:
    try:
        from workers.quant.awq import apply_awq
    except ImportError as e:
        raise QuantizationError("int4-awq needs workers/quant/awq.py, which this build lacks; use int4 (RTN)") from e
    if not calib_batches:
        raise QuantizationError("int4-awq needs calibration batches (token id tensors); none were given")
    return apply_awq(model, calib_batches, group_size)


def _apply_fp8_gptq(model, calib_batches) -> tuple[dict, dict]:
    from workers.quant.fp8_calib import apply_fp8_gptq

    if not calib_batches:
        raise QuantizationError("fp8-gptq needs calibration batches (token id tensors); none were given")
    return apply_fp8_gptq(model, calib_batches)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def prepare_empty(model: nn.Module, kinds: dict[str, tuple[Kind, int]]) -> None:
    """Replace the named float layers with empty quantized ones (kind, group size) that a
    quantized checkpoint or a GGUF file then loads into."""
    modules = dict(model.named_modules())
    for name, (kind, g) in kinds.items():
        layer = modules[name]
        device = layer.weight.device
        bias = layer.bias is not None
        if isinstance(layer, MergedLinear):
            new = QuantMergedLinear(layer.parts, layer.weight.shape[1], kind, g, bias, device)
        else:
            new = QuantRowParallelLinear(
                layer.in_size * layer.tp.size, layer.weight.shape[0], kind, g, bias, layer.tp, device
            )
        if bias:
            new.bias.data = new.bias.data.to(layer.bias.dtype)
        _replace(model, name, new)


def finalize_model(model: nn.Module, backend: str = "auto", keep_layout: bool = False) -> None:
    """After loading into empty quantized layers: check every one was filled, prepare its kernel."""
    device = next(model.buffers()).device
    for name, layer in model.named_modules():
        if isinstance(layer, _QuantLinear):
            missing = layer.missing()
            if missing:
                raise QuantizationError(f"the checkpoint did not fill quantized layer {name} (missing {missing})")
            check_device(layer.kind, device)
            layer.finalize(get_backend(layer.kind, device, backend), keep_layout=keep_layout)


def quantize_logits_head(model: nn.Module, backend: str = "auto") -> None:
    """CPU, tensor parallelism 1: the logits matmul in int8 per vocabulary row (`QuantLogitsHead`),
    through the int8 backend `backend` picks ('auto': aten). Elsewhere nothing changes: a GPU keeps
    its float head (the Triton kernels and CUDA graphs are untouched)."""
    device = model.model.embed_tokens.weight.device
    if device.type != "cpu" or model.tp.size != 1:
        return
    weight = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    model.logits_head = QuantLogitsHead(weight, get_backend("int8", device, backend))


def calibration_batches(model_dir, num_seqs: int = 16, seq_len: int = 512) -> list[torch.Tensor]:
    """The calibrated schemes' (int4-awq, fp8-gptq) batches: the shipped text (workers/quant/calibration.py) through the
    model's tokenizer."""
    from workers.models.tokenizer import load_tokenizer

    try:
        from workers.quant.calibration import load_calibration_batches
    except ImportError as e:
        raise QuantizationError("int4-awq needs workers/quant/calibration.py, which this build lacks; use int4") from e
    return load_calibration_batches(load_tokenizer(model_dir), num_seqs, seq_len)
