"""Pure-torch references of the attention kernels: the CPU path, and the oracle every Triton
kernel is tested against.

KV cache layout, per layer: `k_cache`, `v_cache` of shape [num_pages, page_size, num_kv_heads,
head_dim]. Token slot s lives in page s // page_size at offset s % page_size; slot -1 means
"padding, write nothing".

Attention inputs are flattened over the batch: `q` is [num_tokens, num_heads, head_dim] with the
new tokens of sequence b at rows query_start_loc[b]:query_start_loc[b+1]; `seq_lens[b]` is the
sequence's context length *after* this step (cached + new tokens), so the new tokens sit at
positions seq_lens[b] - n .. seq_lens[b] - 1 and each attends causally to everything before it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter new keys/values [num_tokens, num_kv_heads, head_dim] into their slots."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: list[int],
    seq_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its paged context (GQA aware)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for b, ctx_len in enumerate(seq_lens):
        start, end = query_start_loc[b], query_start_loc[b + 1]
        n = end - start
        if n == 0:
            continue
        num_pages = -(-ctx_len // page_size)
        pages = block_tables[b, :num_pages].long()
        k = k_cache[pages].reshape(-1, num_kv_heads, head_dim)[:ctx_len]
        v = v_cache[pages].reshape(-1, num_kv_heads, head_dim)[:ctx_len]
        q_pos = torch.arange(ctx_len - n, ctx_len, device=q.device)[:, None]
        k_pos = torch.arange(ctx_len, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        # [heads, n, D] x [heads, ctx, D]; kv heads repeated for GQA.
        qh = q[start:end].transpose(0, 1)
        kh = k.transpose(0, 1).repeat_interleave(group, dim=0).to(q.dtype)
        vh = v.transpose(0, 1).repeat_interleave(group, dim=0).to(q.dtype)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        out[start:end] = o.transpose(0, 1)
    return out
