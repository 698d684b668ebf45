"""Serve a model from one GGUF file (llama.cpp's format): the architecture and hyperparameters from
its metadata (`ModelConfig`), its tensors read with the `gguf` package's reader, renamed to the Hugging
Face names `LlamaForCausalLM.load_weights` takes, and dequantized at load (float32 on the host, cast
to the model dtype as they are copied in).

Block layouts (llama.cpp's ggml-quants; each block covers 32 consecutive values of one row):
  Q8_0: f16 scale d, 32 x int8 q                  x = d * q
  Q4_0: f16 d, 16 bytes of 4-bit q (low nibbles    x = d * (q - 8)
        are values 0..15, high nibbles 16..31)
  Q4_1: f16 d, f16 min m, 16 bytes as Q4_0         x = d * q + m
K-quants are not read yet (the shipped SmolLM2 file has none): such a tensor fails at load, by name.

llama.cpp's converter permutes the rows of Llama's q/k projections (per head, from the halves layout
of Hugging Face's rotary to interleaved pairs); `unpermute` undoes it so the weights match
transformers' layout, which our rotary follows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from workers.models.config import ModelConfig, UnsupportedModelError
from workers.models.gguf_file import open_reader

read_config = ModelConfig.from_gguf  # the configuration from the metadata

log = logging.getLogger(__name__)

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# ---- dequantization -----------------------------------------------------------------------------

QK = 32  # values per block of the legacy quant types


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at byte `offset` of each block, as a float32 column."""
    return blocks[:, offset : offset + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 values 0..15: the low nibbles are values 0..15, the high 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    return _f16(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    return _f16(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8.0)


def _dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:]) + _f16(blocks, 2)


# type name -> (values per block, bytes per block, blocks (n, bytes) uint8 -> values (n, per block) float32)
_QUANTS: dict[str, tuple[int, int, Callable[[np.ndarray], np.ndarray]]] = {
    "Q8_0": (QK, 2 + QK, _dequant_q8_0),
    "Q4_0": (QK, 2 + QK // 2, _dequant_q4_0),
    "Q4_1": (QK, 4 + QK // 2, _dequant_q4_1),
}
_PLAIN = {"F32": np.float32, "F16": np.float16}
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", *_QUANTS)


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of shape `shape` (rows first, as numpy and torch order them) from a GGUF
    tensor's raw `data` (the reader's array: typed for plain types, bytes per row for quantized)."""
    if type_name in _PLAIN:
        return np.asarray(data).view(_PLAIN[type_name]).astype(np.float32).reshape(shape)
    if type_name == "BF16":
        raw = np.asarray(data).view(np.uint16).astype(np.uint32) << 16
        return raw.view(np.float32).reshape(shape)
    if type_name not in _QUANTS:
        raise UnsupportedModelError(
            f"GGUF tensor type {type_name} is not supported; kvfleet reads {', '.join(SUPPORTED_TENSOR_TYPES)}"
        )
    _, block_bytes, fn = _QUANTS[type_name]
    blocks = np.asarray(data).view(np.uint8).reshape(-1, block_bytes)
    return fn(blocks).reshape(shape)


def unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a q or k projection's rows (per head: pairs
    (2i, 2i+1) back to (i, i + head_dim/2)). Rows only: it applies as well to a quantized tensor's
    packed rows and their scales (workers/quant/gguf_blocks.py)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- tensors ------------------------------------------------------------------------------------


def hf_name(gguf_name: str) -> str:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    blk, _, rest = gguf_name.partition(".")
    layer, _, leaf = rest.partition(".")
    if blk == "blk" and layer.isdigit() and leaf in _LAYER_NAMES:
        return f"model.layers.{layer}.{_LAYER_NAMES[leaf]}"
    raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no place in a Llama model")


def iter_gguf_weights(
    path: str | Path, cfg: ModelConfig, only: set[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) of every tensor of the file (or of those GGUF names in
    `only`), dequantized one at a time; logs its progress. Every tensor's type is checked before the
    first is dequantized, so an unsupported file fails at once."""
    path = Path(path)
    reader = open_reader(path)
    tensors = [t for t in reader.tensors if only is None or t.name in only]
    for t in tensors:
        type_name = t.tensor_type.name
        if type_name not in SUPPORTED_TENSOR_TYPES:
            raise UnsupportedModelError(
                f"{path.name}: tensor {t.name} has GGUF type {type_name}, which kvfleet does not read "
                f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)})"
            )
        hf_name(t.name)
    log.info("loading %s: %d tensors, %.0f MB", path.name, len(tensors), path.stat().st_size / 1e6)
    start = last_log = time.monotonic()
    for i, t in enumerate(tensors):
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest-varying dimension first
        w = dequantize(t.data, t.tensor_type.name, shape)
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, cfg.num_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, cfg.num_kv_heads)
        yield hf_name(t.name), torch.from_numpy(np.ascontiguousarray(w))
        now = time.monotonic()
        if now - last_log > 2.0 or i + 1 == len(tensors):
            log.info("loading %s: %d/%d tensors dequantized (%.1fs)", path.name, i + 1, len(tensors), now - start)
            last_log = now
