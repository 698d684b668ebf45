"""Pure-torch references of the attention kernels: the CPU path, and the oracle every Triton
kernel is tested against.

KV cache layout, per layer: `k_cache`, `v_cache` of shape [num_pages, page_size, num_kv_heads,
head_dim], in the model's dtype or float8_e4m3fn (`kv_cache_dtype: fp8`, one fixed scale of 1.0:
values are stored as they are, rounded to E4M3 and saturated at +-448, and read back upcast).
Token slot s lives in page s // page_size at offset s % page_size; slot -1 means "padding, write
nothing".

Attention inputs are flattened over the batch: `q` is [num_tokens, num_heads, head_dim] with the
new tokens of sequence b at rows query_start_loc[b]:query_start_loc[b+1]; `seq_lens[b]` is the
sequence's context length *after* this step (cached + new tokens), so the new tokens sit at
positions seq_lens[b] - n .. seq_lens[b] - 1 and each attends causally to everything before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    all_valid: bool | None = None,
) -> None:
    """Scatter new keys/values [num_tokens, num_kv_heads, head_dim] into their slots. An fp8 cache
    (float8_e4m3fn, scale 1.0) stores them rounded to nearest, saturated at +-448. `all_valid`:
    whether no slot is -1, if the caller knows (else it is checked here)."""
    if all_valid is None:
        all_valid = bool((slot_mapping >= 0).all())
    if not all_valid:
        valid = slot_mapping >= 0
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    for new, cache in ((k, k_cache), (v, v_cache)):
        if cache.dtype == torch.float8_e4m3fn:  # CUDA's cast does not saturate; CPU's index_copy_ has no fp8
            new = new.clamp(-448.0, 448.0).to(cache.dtype).view(torch.uint8)
            cache = cache.view(torch.uint8)
        elif new.dtype != cache.dtype:
            new = new.to(cache.dtype)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, new)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: list[int],
    seq_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
    plan: DecodePlan | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its paged context (GQA aware).

    Sequences with one new token (decodes) go through one batched call; the others (prefill
    chunks) one by one, so that no query is padded to another sequence's length. `plan`: a
    decode-only step's `decode_plan`, if the caller keeps one for all layers of the step."""
    decodes = [b for b in range(len(seq_lens)) if query_start_loc[b + 1] - query_start_loc[b] == 1]
    if len(decodes) == len(seq_lens) == q.shape[0]:  # a decode-only step: row b is sequence b
        plan = plan or decode_plan(block_tables, seq_lens, k_cache.shape[1], sliding_window)
        return _decode_batch(q, k_cache, v_cache, plan, scale)
    out = torch.empty_like(q)
    if decodes:
        rows = [query_start_loc[b] for b in decodes]
        plan = decode_plan(block_tables[decodes], [seq_lens[b] for b in decodes], k_cache.shape[1], sliding_window)
        out[rows] = _decode_batch(q[rows], k_cache, v_cache, plan, scale)
    for b, ctx_len in enumerate(seq_lens):
        start, end = query_start_loc[b], query_start_loc[b + 1]
        if end - start > 1:
            out[start:end] = _prefill_one(
                q[start:end], k_cache, v_cache, block_tables[b], ctx_len, scale, sliding_window
            )
    return out


def _gather(cache: torch.Tensor, pages: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Flattened page ids [num_seqs * num_pages] -> [num_seqs, num_kv_heads, num_pages * page_size,
    head_dim]."""
    out = cache.index_select(0, pages)  # cheaper on CPU than cache[tables]
    return out.view(num_seqs, -1, *cache.shape[2:]).transpose(1, 2)


@dataclass
class DecodePlan:
    """What every layer of a decode-only step reads the same way: the pages to gather (each
    sequence's first `num_pages`, flattened, int64: CPU's index_select with an int32 index was
    slower, 160 SmolLM2 pages at 2 threads 0.78 ms against 0.11, at 1 thread 0.22 against 0.20),
    the additive mask of the keys each query may see (None for one sequence without a window: its
    context is cut by the view instead), and the gathered keys' view, [num_seqs, kv_heads,
    context, head_dim] over the gather's [pages, page_size, kv_heads, head_dim] rows. The layers
    gather into the same two buffers (one layer's attention ends before the next one's starts):
    into a fresh 2 MB tensor the same gather took 0.19 ms, into a reused one 0.10 (1 thread;
    measured 2026-12-06 on the 2-core AVX2 EPYC)."""

    pages: torch.Tensor
    num_seqs: int
    context: int  # one sequence: its length
    mask: torch.Tensor | None  # [num_seqs, 1, 1, num_pages * page_size] float, 0 or -inf
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # (keys, values), made by the first layer
    view: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (size, stride) of the gathered keys


def decode_plan(tables: torch.Tensor, ctx_lens: list[int], page_size: int, sliding_window: int | None) -> DecodePlan:
    num_pages = -(-max(ctx_lens) // page_size)
    pages = tables[:, :num_pages].reshape(-1).long()
    if len(ctx_lens) == 1 and sliding_window is None:
        return DecodePlan(pages, 1, ctx_lens[0], None)
    ctx = torch.tensor(ctx_lens, device=tables.device)[:, None]
    k_pos = torch.arange(num_pages * page_size, device=tables.device)[None, :]
    visible = k_pos < ctx  # the query is the last token: causality is the context length
    if sliding_window is not None:
        visible &= k_pos >= ctx - sliding_window
    # the float mask scaled_dot_product_attention would make of the boolean one in every layer
    mask = torch.zeros(visible.shape, device=tables.device).masked_fill_(~visible, float("-inf"))
    return DecodePlan(pages, len(ctx_lens), max(ctx_lens), mask[:, None, None, :])


def _decode_batch(q, k_cache, v_cache, plan: DecodePlan, scale):
    """One query per sequence. The query heads that share a KV head attend as the rows of one
    [group, head_dim] query (q [B, H, D] viewed [B, kv_heads, group, D]: head h reads KV head
    h // group, as enable_gqa's repeat_interleave): on CPU 2.5x faster than enable_gqa's 1-row
    queries at 16 sequences (measured 2026-12-05, SmolLM2-135M shapes)."""
    if plan.buffers is None:
        shape = (plan.pages.shape[0], *k_cache.shape[1:])
        plan.buffers = (k_cache.new_empty(shape), v_cache.new_empty(shape))
        page_size, kv_heads, head_dim = k_cache.shape[1:]
        context = plan.context if plan.mask is None else plan.mask.shape[-1]
        seq_stride = shape[0] // plan.num_seqs * page_size * kv_heads * head_dim
        plan.view = (plan.num_seqs, kv_heads, context, head_dim), (seq_stride, head_dim, kv_heads * head_dim, 1)
    k_buf, v_buf = plan.buffers
    size, stride = plan.view
    # one as_strided instead of view, transpose and (one sequence) the context's slice
    k = _as(torch.index_select(k_cache, 0, plan.pages, out=k_buf).as_strided(size, stride), q.dtype)
    v = _as(torch.index_select(v_cache, 0, plan.pages, out=v_buf).as_strided(size, stride), q.dtype)
    b, h, d = q.shape
    qg = q.reshape(b, size[1], h // size[1], d)
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=plan.mask, scale=scale).reshape(b, h, d)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`, without a dispatcher call when it already is (the usual CPU case)."""
    return t if t.dtype == dtype else t.to(dtype)


def _prefill_one(q, k_cache, v_cache, table, ctx_len: int, scale, sliding_window):
    n = q.shape[0]
    page_size = k_cache.shape[1]
    num_pages = -(-ctx_len // page_size)
    k = _gather(k_cache, table[:num_pages], 1)[0, :, :ctx_len].to(q.dtype)
    v = _gather(v_cache, table[:num_pages], 1)[0, :, :ctx_len].to(q.dtype)
    q_pos = torch.arange(ctx_len - n, ctx_len, device=q.device)[:, None]
    k_pos = torch.arange(ctx_len, device=q.device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return o.transpose(0, 1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """norm(x), or with `residual`: (norm(x + residual), x + residual). Float32 inside, as HF."""
    if residual is not None:
        x = x + residual
        residual = x
    if x.dtype == torch.float32:  # the same arithmetic in one fused op (CPU: 8 ops -> 1)
        out = F.rms_norm(x, weight.shape, weight, eps)
        return out if residual is None else (out, residual)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * n] (gate, up) -> silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_and_write_kv(q, k, v, k_cache, v_cache, cos, sin, positions, slot_mapping) -> torch.Tensor:
    """Rotate-half RoPE of q and k from float32 cos/sin tables [max_pos, head_dim], then write
    k, v into their slots. Returns the rotated q."""
    c, s = rope_rows(cos, sin, positions, q.dtype)
    return rope_rows_and_write_kv(q, k, v, k_cache, v_cache, c, s, slot_mapping)


def rope_rows(cos, sin, positions, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the tables that `positions` read, [num_tokens, 1, head_dim] in `dtype`: cos,
    and sin with its first half negated (`_rope` needs no negation then)."""
    half = cos.shape[-1] // 2
    s = sin[positions].to(dtype)
    return cos[positions].to(dtype)[:, None, :], torch.cat((-s[:, :half], s[:, half:]), dim=-1)[:, None, :]


def rope_rows_and_write_kv(q, k, v, k_cache, v_cache, c, s, slot_mapping, all_valid=None) -> torch.Tensor:
    """`rope_and_write_kv` with the rows of `rope_rows` (one step's layers share them)."""
    q, k = _rope(q, c, s), _rope(k, c, s)
    write_kv(k, v, k_cache, v_cache, slot_mapping, all_valid)
    return q


def _rope(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1): (x2, x1) is x's halves
    flipped, and the sign sits in `s`. Three ops instead of seven."""
    n, h, d = x.shape
    return torch.addcmul(x * c, x.reshape(n, h, 2, d // 2).flip(2).view(n, h, d), s)
