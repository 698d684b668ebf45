"""Quantized checkpoints: `kvfleet quantize SRC DST --scheme ...` writes a Hugging Face directory
whose linear layers are stored quantized, and loading it needs no calibration again.

On disk (our format; why not compressed-tensors: its asymmetric int4 stores *integer* zero points,
W = (q - zp) * s, while our int4 layout, which GGUF's Q4_1 and min/max RTN need exactly, has a float
zero W = (q - 8) * s + z; writing it as compressed-tensors would change the weights, so we say what
we write instead of pretending to be compressed-tensors):

- `config.json` as the source's, plus `"quantization_config": {"quant_method": "kvfleet",
  "scheme": "int4" | "int4-awq" | "int8" | "fp8" | "fp8-gptq", "group_size": G, "format": "kvfleet-v1"}`;
- `model.safetensors`: each linear checkpoint tensor `<name>.weight` replaced by the contract layout
  of workers/kernels/quant_reference.py under `<name>.qweight`, `<name>.scales` and (int4)
  `<name>.zeros`, float32 scales; every other tensor as the source had it (its dtype);
- the source's tokenizer and generation files, copied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from workers.quant.layers import QuantMergedLinear, _QuantLinear
from workers.quant.layout import QuantizationError
from workers.quant.quantize import input_columns, linear_layers, scheme_kind

QUANT_METHOD = "kvfleet"
FORMAT = "kvfleet-v1"
_MERGED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
           "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")  # fmt: skip


def read_quant_config(model_dir: str | Path) -> dict | None:
    """The `quantization_config` of a Hugging Face directory written by `kvfleet quantize` (None for
    a float checkpoint or a GGUF file); refuses other quantized formats by name."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    qcfg = json.loads(path.read_text()).get("quantization_config")
    if qcfg is None:
        return None
    if qcfg.get("quant_method") == "compressed-tensors":
        raise QuantizationError(
            f"{model_dir} is a compressed-tensors checkpoint: serve it as it is (quantization unset)"
        )
    if qcfg.get("quant_method") != QUANT_METHOD:
        raise QuantizationError(
            f"{model_dir} is quantized with {qcfg.get('quant_method')!r}, which kvfleet does not read; "
            "serve its float checkpoint with quantization int8 / int4 / fp8, or one written by `kvfleet quantize`"
        )
    scheme_kind(qcfg["scheme"])
    return qcfg


def saved_layer_kinds(model, qcfg: dict) -> dict:
    """Layer name -> (kind, group size) of every linear layer, for `prepare_empty`."""
    kind = scheme_kind(qcfg["scheme"])
    g = qcfg.get("group_size")
    return {name: (kind, g or input_columns(layer)) for name, layer in linear_layers(model)}


def save_quantized(model, src_dir: str | Path, dst_dir: str | Path, scheme: str, group_size: int) -> Path:
    """Write `model` (quantized with keep_layout=True, tensor parallelism 1) as a checkpoint."""
    from safetensors.torch import save_file

    src, dst = Path(src_dir), Path(dst_dir)
    config = json.loads((src / "config.json").read_text())
    dtype = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or "float32"))
    tensors: dict[str, torch.Tensor] = {}
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, _QuantLinear)}
    for name, layer in quantized.items():
        if layer.layout is None:
            raise QuantizationError(f"layer {name} kept no layout to save (quantize with keep_layout=True)")
        prefix, _, leaf = name.rpartition(".")
        if isinstance(layer, QuantMergedLinear):
            for proj, lo, rows in zip(_MERGED_PARTS[leaf], layer.offsets[:-1], layer.part_sizes, strict=True):
                for key, t in layer.layout.rows(lo, rows).tensors().items():
                    tensors[f"{prefix}.{proj}.{key}"] = t
                if layer.bias is not None:
                    tensors[f"{prefix}.{proj}.bias"] = layer.bias.data[lo : lo + rows].to(dtype)
        else:
            for key, t in layer.layout.tensors().items():
                tensors[f"{name}.{key}"] = t
            if layer.bias is not None:
                tensors[f"{name}.bias"] = layer.bias.data.to(dtype)
    skip = tuple(f"{n}." for n in quantized)
    for name, p in model.named_parameters():
        if not name.startswith(skip):
            tensors[name] = p.data.to(dtype)
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "scheme": scheme,
        "group_size": group_size,
        "format": FORMAT,
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in _COPIED:
        if (src / f).is_file():
            shutil.copy(src / f, dst / f)
    return dst
