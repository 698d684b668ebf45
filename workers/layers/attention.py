"""Paged attention as a layer: the per-step metadata and the backend that computes it.

The model runner builds one `AttentionMetadata` per step and the model hands it to every
attention layer with the layer's own KV cache. A backend is an object with `write_kv` and
`forward` over that metadata; the pure-torch reference serves CPU, and the Triton kernels
(workers/kernels) plug in behind the same two calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.kernels import reference


@dataclass
class AttentionMetadata:
    """Where each new token's K/V goes and which context each sequence's queries see."""

    slot_mapping: torch.Tensor  # [num_tokens] int64 on device; -1 = padding
    block_tables: torch.Tensor  # [num_seqs, max_pages] int32 on device
    query_start_loc: list[int]  # [num_seqs + 1] host copy
    seq_lens: list[int]  # [num_seqs] context length after the step, host copy
    max_query_len: int
    max_seq_len: int


class TorchAttentionBackend:
    name = "torch"

    def write_kv(self, k, v, k_cache, v_cache, meta: AttentionMetadata) -> None:
        reference.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)

    def forward(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window: int | None):
        return reference.paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale, sliding_window
        )


def get_backend(name: str, device: torch.device) -> TorchAttentionBackend:
    if name in ("auto", "torch"):
        return TorchAttentionBackend()
    raise ValueError(f"unknown attention_backend {name!r}")
