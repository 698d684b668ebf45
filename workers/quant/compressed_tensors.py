"""Reading compressed-tensors checkpoints (what llm-compressor writes and vLLM reads) straight into
the quantized layers, so that the int4 / int8 / fp8 kernels serve them as they are.

`config.json`'s `quantization_config` has `quant_method: "compressed-tensors"`, a `format` (or one
per config group), `config_groups` whose `targets` ("Linear", a module name, or "re:<regex>") pick
the linear layers and whose `weights` say how they are stored, and an `ignore` list (lm_head).
Per layer `<p>` the safetensors hold, by format:

- `pack-quantized` (int4 / int8 weights): `<p>.weight_packed` int32 [N, ceil(K * bits / 32)], value
  i of a row at bits [bits * i, bits * (i + 1)) counted over the row's words from the low bit, each
  stored as q + 2**(bits - 1) (unsigned); `<p>.weight_shape` [N, K]; `<p>.weight_scale` [N, K // G]
  (group), [N, 1] (channel) or one value (tensor); asymmetric adds `<p>.weight_zero_point` packed
  the same way along the rows (dim 0), [ceil(N * bits / 32), K // G].
- `naive-quantized` / `int-quantized`: `<p>.weight` int8 holding q, `<p>.weight_scale` (and the
  zero point, unpacked).
- `float-quantized`: `<p>.weight` float8_e4m3fn, `<p>.weight_scale` [N, 1] or one value.

W = (q - zp) * scale with q and zp signed. Onto the layouts of workers/kernels/quant_reference.py:
int4 codes u = q + 8 and zeros = -zp * scale (so (u - 8) * s + z = (q - zp) * s); int8 q as it is
(symmetric only); fp8 the weight and one scale per row (a tensor scale repeated over the rows).
A channel scale is one group of the layer's input columns (of this rank's share, under tensor
parallelism: the scale then repeats once per share); a group the CPU int4 kernel does not take
(channel, 512) is cut into groups it takes, each with the same scale and zero (exact). Everything
else is refused by name.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from workers.kernels import quant_reference as qr
from workers.layers.parallel import RowParallelLinear
from workers.quant.backends import CPU_KERNELS, check_device, get_backend
from workers.quant.layout import Kind, QuantizationError, QuantWeight
from workers.quant.quantize import GROUP_SIZES_CPU_INT4, input_columns, linear_layers

log = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
FORMATS = ("pack-quantized", "naive-quantized", "int-quantized", "float-quantized")
_WORKS = (
    "kvfleet reads weight-only int4 (symmetric or asymmetric) and symmetric int8 with group or channel "
    "scales, and fp8 E4M3 with channel or tensor scales (formats pack-quantized, naive-quantized, "
    "int-quantized, float-quantized), activations unquantized or dynamic per token"
)


@dataclass(frozen=True)
class WeightScheme:
    """How one config group stores its weights."""

    group: str  # the config group's name, for messages
    fmt: str
    kind: Kind
    bits: int
    strategy: str  # group / channel / tensor
    group_size: int | None
    symmetric: bool

    def leaves(self) -> tuple[str, ...]:
        base = (
            ("weight_packed", "weight_scale", "weight_shape")
            if self.fmt == "pack-quantized"
            else ("weight", "weight_scale")
        )
        return base if self.symmetric else (*base, "weight_zero_point")


@dataclass
class CTConfig:
    groups: list[tuple[list[str], WeightScheme]]
    ignore: list[str]
    notes: list[str]  # what an activation scheme becomes here (logged at load)

    def scheme_for(self, name: str) -> WeightScheme | None:
        """The scheme of checkpoint module `name` (model.layers.0.self_attn.q_proj); None: ignored or untargeted."""
        if any(_matches(p, name) for p in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(t == "Linear" or _matches(t, name) for t in targets):
                return scheme
        return None


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


def _refuse(where: str, field: str, value, instead: str = "") -> QuantizationError:
    return QuantizationError(
        f"compressed-tensors checkpoint {where}: {field} = {value!r} is not supported; {instead or _WORKS}"
    )


def read_ct_config(model_dir: str | Path) -> CTConfig | None:
    """The parsed compressed-tensors config of a Hugging Face directory; None if it is not one."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    qcfg = json.loads(path.read_text()).get("quantization_config")
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != QUANT_METHOD:
        return None
    return parse_ct_config(qcfg, str(model_dir))


def parse_ct_config(qcfg: dict, where: str = "") -> CTConfig:
    sparsity = qcfg.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise _refuse(
            where, "sparsity_config.format", sparsity.get("format"), "sparse checkpoints are not read: use a dense one"
        )
    for field in ("kv_cache_scheme", "transform_config"):
        if qcfg.get(field):
            instead = "rotated/transformed weights are not read"
            if field == "kv_cache_scheme":
                instead = (
                    "kvfleet keeps no static KV-cache scales: use a checkpoint without it (and kv_cache_dtype: fp8 "
                    "for a dynamically scaled fp8 KV cache)"
                )
            raise _refuse(where, field, qcfg[field], instead)
    status = qcfg.get("quantization_status", "compressed")
    if status != "compressed":
        raise _refuse(
            where, "quantization_status", status, "only compressed checkpoints (as llm-compressor saves them) are read"
        )
    groups, notes = [], []
    for name, group in (qcfg.get("config_groups") or {}).items():
        scheme, note = _weight_scheme(
            f"{where} config_groups.{name}", name, group, group.get("format") or qcfg.get("format")
        )
        groups.append((list(group.get("targets") or []), scheme))
        if note:
            notes.append(note)
    if not groups:
        raise _refuse(where, "config_groups", qcfg.get("config_groups"), "the checkpoint names no quantized layers")
    return CTConfig(groups, list(qcfg.get("ignore") or []), notes)


def _weight_scheme(where: str, name: str, group: dict, fmt) -> tuple[WeightScheme, str]:
    w = group.get("weights")
    if not w:
        raise _refuse(where, "weights", w, "activation-only quantization is not read: " + _WORKS)
    if fmt not in FORMATS:
        raise _refuse(where, "format", fmt)
    wtype, bits = w.get("type", "int"), int(w.get("num_bits", 8))
    strategy, gsize, symmetric = w.get("strategy"), w.get("group_size"), bool(w.get("symmetric", True))
    if w.get("dynamic"):
        raise _refuse(where, "weights.dynamic", w.get("dynamic"))
    if w.get("actorder") in ("group", "dynamic", True):
        raise _refuse(
            where,
            "weights.actorder",
            w.get("actorder"),
            "GPTQ's act-order g_idx is not read: use actorder 'weight' or none",
        )
    if wtype == "float":
        if (bits, fmt) != (8, "float-quantized"):
            raise _refuse(
                where, "weights (float)", f"{bits} bits, {fmt}", "fp8 weights are read as float-quantized E4M3"
            )
        if strategy not in ("channel", "tensor"):
            raise _refuse(
                where,
                "weights.strategy",
                strategy,
                "fp8 weights are read with channel or tensor scales (no block scales)",
            )
        if not symmetric:
            raise _refuse(where, "weights.symmetric", False, "fp8 weights are read symmetric")
        kind: Kind = "fp8"
    elif wtype == "int":
        if bits not in (4, 8) or fmt == "float-quantized":
            raise _refuse(
                where, "weights.num_bits", bits, "int weights of 4 or 8 bits are read (pack-, naive- or int-quantized)"
            )
        if strategy not in ("group", "channel"):
            raise _refuse(where, "weights.strategy", strategy, "int weights are read with group or channel scales")
        if strategy == "group" and not gsize:
            raise _refuse(where, "weights.group_size", gsize, "group strategy needs a group_size")
        if bits == 8 and not symmetric:
            raise _refuse(
                where, "weights.symmetric", False, "int8 weights are read symmetric only; asymmetric works for int4"
            )
        kind = "int4" if bits == 4 else "int8"
    else:
        raise _refuse(where, "weights.type", wtype)
    if group.get("output_activations"):
        raise _refuse(where, "output_activations", group["output_activations"], "output quantization is not read")
    note = ""
    act = group.get("input_activations")
    if act:
        if not act.get("dynamic") or act.get("strategy") not in ("token", None):
            raise _refuse(
                where, "input_activations", f"{act.get('type')} {act.get('strategy')} dynamic={act.get('dynamic')}",
                "static activation scales (W8A8 static, FP8 static) are not read: a checkpoint with dynamic "
                "per-token activations, or weight-only, works",
            )  # fmt: skip
        if kind == "fp8" and act.get("type") == "float":
            note = (
                f"config group {name}: fp8 weights with dynamic per-token fp8 activations run as kvfleet's fp8: "
                "weight-only for small batches, per-token fp8 activations with fp8 tensor cores from 64 rows on"
            )
        else:
            note = (
                f"config group {name}: input activations {act.get('type')}{act.get('num_bits')} dynamic per token "
                f"are served unquantized ({kind} weight-only, activations in the model dtype)"
            )
    return WeightScheme(name, fmt, kind, bits, strategy, gsize if strategy == "group" else None, symmetric), note


# ---- which layers: model layer name -> (kind, group size), checkpoint module -> (scheme, group size)


def plan_layers(model: nn.Module, ct: CTConfig, device: torch.device, backend: str = "auto"):
    """Check every projection against its config group and the device; returns `(kinds, parts)`:
    kinds maps a model layer to (kind, this rank's group size) for `prepare_empty`, parts maps a
    checkpoint module (q_proj, ...) to (scheme, that group size)."""
    merged_parts: dict[str, list[str]] = {}
    for proj, (merged, part) in getattr(model, "_MERGED", {}).items():
        merged_parts.setdefault(merged, []).insert(part, proj)
    if getattr(model, "lm_head", None) is not None and ct.scheme_for("lm_head") is not None:
        raise QuantizationError(
            f"compressed-tensors: lm_head is quantized by config group {ct.scheme_for('lm_head').group}; kvfleet keeps "
            "the LM head in the model dtype: a checkpoint with lm_head in `ignore` (llm-compressor's default) works"
        )
    kinds, parts = {}, {}
    for name, layer in linear_layers(model):
        prefix, _, leaf = name.rpartition(".")
        names = [f"{prefix}.{p}" for p in merged_parts[leaf]] if leaf in merged_parts else [name]
        schemes = [ct.scheme_for(n) for n in names]
        if all(s is None for s in schemes):
            continue
        shapes = {None if s is None else (s.kind, s.strategy, s.group_size, s.symmetric) for s in schemes}
        if len(shapes) > 1:
            raise QuantizationError(
                f"compressed-tensors: {', '.join(names)} are stored differently ({sorted(map(str, shapes))}); "
                f"kvfleet runs them as one layer {name}: quantize all of them with one scheme, or none "
                "(list all in `ignore`)"
            )
        scheme = schemes[0]
        k = input_columns(layer)
        g = scheme.group_size or k
        where = f"layer {name} (config group {scheme.group})"
        if k % g:
            raise QuantizationError(
                f"compressed-tensors {where}: group_size {g} does not divide its {k} input columns"
                + (" (this rank's share): a smaller tensor_parallel_size works" if _sharded(layer) else "")
            )
        check_device(scheme.kind, device)
        chosen = get_backend(scheme.kind, device, backend)
        if scheme.kind == "int4" and chosen.name in CPU_KERNELS and g not in GROUP_SIZES_CPU_INT4:
            # a scale shared by g columns is the same scale on each of g // d smaller groups: exact
            fits = [d for d in sorted(GROUP_SIZES_CPU_INT4, reverse=True) if g % d == 0]
            if not fits:
                raise QuantizationError(
                    f"compressed-tensors {where}: int4 group size {g} has no CPU kernel; on CPU int4 takes group "
                    f"sizes {', '.join(map(str, GROUP_SIZES_CPU_INT4))} or multiples of them (a GPU takes any that "
                    "divides the layer)"
                )
            g = fits[0]
        kinds[name] = (scheme.kind, g)
        for n in names:
            parts[n] = (scheme, g)
    if not kinds:
        raise QuantizationError("compressed-tensors: no projection of this model is targeted by a config group")
    return kinds, parts


def _sharded(layer: nn.Module) -> bool:
    return isinstance(layer, RowParallelLinear) and layer.tp.size > 1


# ---- tensors: the checkpoint's leaves of one module -> one QuantWeight


def iter_ct_weights(tensors: Iterable[tuple[str, object]], parts: dict) -> Iterator[tuple[str, object]]:
    """Pass the checkpoint's float tensors through; gather each quantized module's leaves and yield
    `<module>.weight` as a `QuantWeight` once they are all read (the layers slice it per rank)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        module, _, leaf = name.rpartition(".")
        if module not in parts:
            yield name, tensor
            continue
        scheme, g = parts[module]
        if leaf == "bias":
            yield name, tensor
            continue
        optional = ("weight_zero_point",) if scheme.symmetric else ()
        if leaf not in scheme.leaves() + optional:
            raise QuantizationError(
                f"compressed-tensors layer {module}: tensor {leaf!r} is not read (config group {scheme.group}, "
                f"format {scheme.fmt} expects {', '.join(scheme.leaves())}); {_WORKS}"
            )
        got = pending.setdefault(module, {})
        got[leaf] = tensor[:] if not isinstance(tensor, torch.Tensor) else tensor
        if all(leaf in got for leaf in scheme.leaves()):
            yield f"{module}.weight", to_layout(scheme, pending.pop(module), g, module)
    if pending:
        module, got = next(iter(pending.items()))
        missing = [leaf for leaf in parts[module][0].leaves() if leaf not in got]
        raise QuantizationError(f"compressed-tensors layer {module}: the checkpoint lacks {', '.join(missing)}")


def unpack_int32(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 [R, W] -> the first `count` unsigned values of each row, int32 [R, count]."""
    per = 32 // bits
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    values = (p[..., None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], -1)[:, :count].to(torch.int32)


def _scales(scale: torch.Tensor, n: int, groups: int, where: str) -> torch.Tensor:
    s = scale.float()
    if s.numel() == 1:
        return s.reshape(1, 1).expand(n, groups).contiguous()
    if s.dim() == 1:
        s = s[:, None]
    if tuple(s.shape) != (n, groups):
        raise QuantizationError(
            f"compressed-tensors layer {where}: weight_scale of shape {tuple(scale.shape)}, expected ({n}, {groups})"
        )
    return s


def to_layout(scheme: WeightScheme, leaves: dict[str, torch.Tensor], group_size: int, where: str) -> QuantWeight:
    """One module's checkpoint tensors -> a `QuantWeight` of `group_size` (a channel scale repeats
    over the groups when a rank holds a share of the input columns)."""
    if scheme.kind == "fp8":
        w = leaves["weight"]
        if w.dtype != torch.float8_e4m3fn:
            raise QuantizationError(
                f"compressed-tensors layer {where}: fp8 weight of dtype {w.dtype}, expected float8_e4m3fn"
            )
        return QuantWeight("fp8", w, _scales(leaves["weight_scale"], w.shape[0], 1, where)[:, 0].contiguous())
    if scheme.fmt == "pack-quantized":
        n, k = (int(v) for v in leaves["weight_shape"].tolist())
        q = unpack_int32(leaves["weight_packed"], scheme.bits, k) - (1 << (scheme.bits - 1))
    else:
        q = leaves["weight"].to(torch.int32)
        n, k = q.shape
    lo, hi = -(1 << (scheme.bits - 1)), (1 << (scheme.bits - 1)) - 1
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise QuantizationError(f"compressed-tensors layer {where}: int{scheme.bits} codes outside [{lo}, {hi}]")
    stored_g = scheme.group_size or k
    groups = k // stored_g
    scales = _scales(leaves["weight_scale"], n, groups, where)
    zp = leaves.get("weight_zero_point")
    if zp is not None and scheme.fmt == "pack-quantized" and not scheme.symmetric:
        zp = (unpack_int32(zp.T.contiguous(), scheme.bits, n) - (1 << (scheme.bits - 1))).T
    if zp is not None:
        zp = zp.reshape(n, groups).float() if zp.numel() > 1 else zp.float().reshape(1, 1).expand(n, groups)
        if scheme.symmetric:
            if zp.any():
                raise QuantizationError(
                    f"compressed-tensors layer {where}: a symmetric scheme with nonzero weight_zero_point"
                )
            zp = None
    if scheme.kind == "int8":
        out = QuantWeight("int8", q.to(torch.int8), scales)
    else:
        zeros = torch.zeros_like(scales) if zp is None else -zp * scales
        out = QuantWeight("int4", qr.pack_int4(q + 8), scales, zeros)
    if group_size != stored_g:  # a group (or channel) split into smaller ones, each with its scale
        rep = stored_g // group_size
        out = QuantWeight(
            out.kind, out.qweight, *(t.repeat_interleave(rep, dim=1) for t in (out.scales, out.zeros) if t is not None)
        )
    return out


def log_notes(ct: CTConfig, model_dir) -> None:
    for note in ct.notes:
        log.warning("%s: %s", model_dir, note)
