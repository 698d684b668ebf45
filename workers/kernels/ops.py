"""The kernel set a model runs with: the pure-torch references (CPU, and the oracle) or the
Triton kernels (GPU; CPU too under TRITON_INTERPRET=1, slowly). The model gets one at
construction; every layer calls through it, so the CPU and GPU paths are the same code."""

from __future__ import annotations

import torch

from workers.kernels import reference
from workers.layers.attention import AttentionMetadata


class TorchOps:
    name = "torch"
    rms_norm = staticmethod(reference.rms_norm)
    silu_and_mul = staticmethod(reference.silu_and_mul)

    def __init__(self):
        # What every layer of a step computes alike, computed once per step: the rotary rows of the
        # step's positions (checked with torch.equal: a compare instead of five ops in each layer),
        # whether its slot mapping has padding, and a decode-only step's gather plan (both keyed on
        # the step's tensors and metadata objects, which a step's layers share and steps do not).
        self._rope: tuple | None = None
        self._slots: tuple | None = None
        self._plan: tuple | None = None

    def rope_and_write_kv(self, q, k, v, k_cache, v_cache, cos, sin, positions, slot_mapping):
        last = self._rope
        if not (
            last is not None
            and last[0] is cos
            and last[1] is sin
            and last[2].dtype == q.dtype
            and last[3].shape == positions.shape
            and torch.equal(last[3], positions)
        ):
            c, s = reference.rope_rows(cos, sin, positions, q.dtype)
            last = self._rope = (cos, sin, c, positions.clone(), s)
        if self._slots is None or self._slots[0] is not slot_mapping:
            self._slots = (slot_mapping, bool((slot_mapping >= 0).all()))
        return reference.rope_rows_and_write_kv(
            q, k, v, k_cache, v_cache, last[2], last[4], slot_mapping, self._slots[1]
        )

    def decode_splits(self, num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
        return 1  # the reference attends each decode over its whole context at once

    def attention(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window: int | None):
        query_start_loc, seq_lens = meta.host_lists()
        plan = None
        if len(seq_lens) == q.shape[0] == meta.num_decodes:  # decode-only: one plan for every layer
            key = (meta, k_cache.shape[1], sliding_window)
            if self._plan is None or self._plan[0] is not meta or self._plan[1:3] != key[1:]:
                plan = reference.decode_plan(meta.block_tables, seq_lens, k_cache.shape[1], sliding_window)
                self._plan = (*key, plan)
            plan = self._plan[3]
        return reference.paged_attention(
            q, k_cache, v_cache, meta.block_tables, query_start_loc, seq_lens, scale, sliding_window, plan
        )


class TritonOps:
    name = "triton"

    def __init__(self, device: torch.device):
        from workers.kernels import triton_attention, triton_norm

        self._attn = triton_attention
        self.rms_norm = triton_norm.rms_norm
        self.silu_and_mul = triton_norm.silu_and_mul
        self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132

    def decode_splits(self, num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
        """How many context splits the decode kernel uses (fixed per batch size in a CUDA graph)."""
        return self._attn.decode_num_splits(num_seqs, num_kv_heads, max_seq_len, self._num_sms)

    def rope_and_write_kv(self, q, k, v, k_cache, v_cache, cos, sin, positions, slot_mapping):
        self._attn.rope_and_write_kv(q, k, v, k_cache, v_cache, cos, sin, positions, slot_mapping)
        return q

    def attention(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window: int | None):
        o = torch.empty_like(q)
        num_seqs = meta.seq_lens.shape[0]
        self._attn.decode_attention(
            q,
            o,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            scale,
            meta.num_decodes,
            meta.num_splits,
            sliding_window,
        )
        self._attn.prefill_attention(
            q,
            o,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            scale,
            meta.num_decodes,
            num_seqs - meta.num_decodes,
            meta.max_query_len,
            sliding_window,
        )
        return o


def get_ops(name: str, device: torch.device | str) -> TorchOps | TritonOps:
    """'auto': Triton on CUDA, the references elsewhere."""
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchOps()
    if name == "triton":
        return TritonOps(device)
    raise ValueError(f"unknown kernels {name!r}: choose auto, torch or triton")
