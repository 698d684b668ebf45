"""GGUF blocks kept quantized (`quantization: gguf`): the linear layers' Q4_0 / Q4_1 / Q8_0 tensors
repacked, exactly, into the contract layouts with group 32 (llama.cpp's block), everything else
(norms, the embedding and the tied LM head) dequantized as workers/models/gguf.py does.

  Q4_0  d * (q - 8)          -> int4: scales d, zeros 0
  Q4_1  d * q + m            -> int4: scales d, zeros m + 8d   ((q - 8) * d + (m + 8d))
  Q8_0  d * q                -> int8: scales d

A block's 16 bytes hold values 0..15 in the low nibbles and 16..31 in the high ones; the int4
layout wants column 2j low and 2j + 1 high, so the codes are unpacked and packed again. llama.cpp's
rotary permutation of the q / k rows is undone on the packed rows and on their scales alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from workers.models.config import ModelConfig
from workers.models.gguf import QK, hf_name, iter_gguf_weights, unpermute
from workers.models.gguf_file import open_reader
from workers.quant.layout import Kind, QuantizationError, QuantWeight

# GGUF block type -> (layout kind, bytes per block)
BLOCK_TYPES: dict[str, tuple[Kind, int]] = {
    "Q4_0": ("int4", 2 + QK // 2),
    "Q4_1": ("int4", 4 + QK // 2),
    "Q8_0": ("int8", 2 + QK),
}
GROUP_SIZE = QK
_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# checkpoint projection -> the model's layer that holds it
_LAYER_OF = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def _is_linear(gguf_name: str) -> bool:
    parts = gguf_name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in _LINEARS


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    return blocks[:, offset : offset + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def repack(data: np.ndarray, type_name: str, rows: int, cols: int) -> QuantWeight:
    """One GGUF tensor's raw blocks -> the contract layout (group 32), exactly."""
    kind, block_bytes = BLOCK_TYPES[type_name]
    blocks = np.asarray(data).view(np.uint8).reshape(-1, block_bytes)
    groups = cols // QK
    d = _f16(blocks, 0).reshape(rows, groups)
    if kind == "int8":
        q = blocks[:, 2:].view(np.int8).reshape(rows, cols)
        return QuantWeight("int8", torch.from_numpy(q.copy()), torch.from_numpy(d))
    qs = blocks[:, 4:] if type_name == "Q4_1" else blocks[:, 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # [blocks, 32] in value order
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).reshape(rows, cols // 2)
    zeros = _f16(blocks, 2).reshape(rows, groups) + 8.0 * d if type_name == "Q4_1" else np.zeros_like(d)
    return QuantWeight("int4", torch.from_numpy(packed), torch.from_numpy(d), torch.from_numpy(zeros))


def _unpermute_rows(w: QuantWeight, num_heads: int) -> QuantWeight:
    fix = lambda t: None if t is None else torch.from_numpy(np.ascontiguousarray(unpermute(t.numpy(), num_heads)))  # noqa: E731
    return QuantWeight(w.kind, fix(w.qweight), fix(w.scales), fix(w.zeros))


def linear_kinds(path: str | Path) -> dict[str, tuple[Kind, int]]:
    """Which layer of the model each linear tensor of the file fills, and its layout kind (group 32).
    Refuses, by tensor, a linear that is not in a block type kept quantized, and a merged layer
    whose parts differ in kind."""
    reader = open_reader(Path(path))
    kinds: dict[str, tuple[Kind, int]] = {}
    for t in reader.tensors:
        if not _is_linear(t.name):
            continue
        type_name = t.tensor_type.name
        if type_name not in BLOCK_TYPES:
            raise QuantizationError(
                f"{Path(path).name}: tensor {t.name} is {type_name}, which quantization gguf does not keep "
                f"(it keeps {', '.join(BLOCK_TYPES)}); set quantization: none to serve the file dequantized"
            )
        module, _, _ = hf_name(t.name).rpartition(".")
        prefix, _, proj = module.rpartition(".")
        layer = f"{prefix}.{_LAYER_OF.get(proj, proj)}"
        kind = BLOCK_TYPES[type_name][0]
        if kinds.get(layer, (kind,))[0] != kind:
            raise QuantizationError(
                f"{Path(path).name}: layer {layer} mixes {kinds[layer][0]} and {kind} block types "
                "(quantization gguf needs one kind per merged projection); set quantization: none"
            )
        kinds[layer] = (kind, GROUP_SIZE)
    return kinds


def iter_gguf_quantized(path: str | Path, cfg: ModelConfig) -> Iterator[tuple[str, object]]:
    """(Hugging Face name, QuantWeight) for the linear tensors, (name, float32 tensor) for the rest."""
    path = Path(path)
    reader = open_reader(path)
    by_name = {t.name: t for t in reader.tensors}
    rest = [t.name for t in reader.tensors if not _is_linear(t.name)]
    for name, t in by_name.items():
        if not _is_linear(name):
            continue
        rows, cols = (int(n) for n in reversed(t.shape))
        w = repack(t.data, t.tensor_type.name, rows, cols)
        if name.endswith("attn_q.weight"):
            w = _unpermute_rows(w, cfg.num_heads)
        elif name.endswith("attn_k.weight"):
            w = _unpermute_rows(w, cfg.num_kv_heads)
        yield hf_name(name), w
    yield from iter_gguf_weights(path, cfg, only=set(rest))
