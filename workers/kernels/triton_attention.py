"""Triton kernels for paged attention; `reference.py` is their oracle.

- `rope_and_write_kv`: rotate q and k (rotate-half RoPE) and scatter k, v into their slots,
  one program per token; q is rotated in place, k only on its way into the cache.
- `prefill_attention`: flash-attention over pages for sequences with several new tokens
  (prefill chunks): one program per (block of queries, sequence, query head), causal over the
  cached context plus the new tokens, GQA by indexing the query head's KV head.
- `decode_attention`: flash-decoding for sequences with one new token: one program per
  (sequence, KV head, split of the context) computes all the query heads of that KV head's
  group at once (each K/V row is read once), then a second kernel merges the splits by their
  log-sum-exp. Splits let a few long sequences fill the GPU.

Layout as in reference.py: caches [num_pages, page_size, num_kv_heads, head_dim], in the model's
dtype or float8_e4m3fn (written saturated, read upcast to q's dtype in registers); the batch
is ordered decodes first: sequences [0, num_decodes) have one query each at rows 0..num_decodes-1.
All shapes the kernels see are fixed by their tensors, so a decode step can be graph-captured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_write_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    slot_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    t = tl.program_id(0)
    half: tl.constexpr = HEAD_DIM // 2
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, half)
    cos = tl.load(cos_ptr + pos * stride_cos + d)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + d)[None, :]

    qh = tl.arange(0, BLOCK_QH)[:, None]
    qmask = qh < NUM_Q_HEADS
    qp = q_ptr + t * stride_qt + qh * stride_qh + d[None, :]
    q1 = tl.load(qp, mask=qmask, other=0.0).to(tl.float32)
    q2 = tl.load(qp + half, mask=qmask, other=0.0).to(tl.float32)
    tl.store(qp, (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty), mask=qmask)
    tl.store(qp + half, (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty), mask=qmask)

    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        kh = tl.arange(0, BLOCK_KH)[:, None]
        kmask = kh < NUM_KV_HEADS
        kp = k_ptr + t * stride_kt + kh * stride_kh + d[None, :]
        k1 = tl.load(kp, mask=kmask, other=0.0).to(tl.float32)
        k2 = tl.load(kp + half, mask=kmask, other=0.0).to(tl.float32)
        # cache rows are contiguous: slot * kv_heads * head_dim
        cp = slot * NUM_KV_HEADS * HEAD_DIM + kh * HEAD_DIM + d[None, :]
        vp = v_ptr + t * stride_vt + kh * stride_vh + d[None, :]
        v1 = tl.load(vp, mask=kmask).to(tl.float32)
        v2 = tl.load(vp + half, mask=kmask).to(tl.float32)
        _store_kv(k_cache_ptr + cp, k1 * cos - k2 * sin, kmask, KV_FP8)
        _store_kv(k_cache_ptr + cp + half, k2 * cos + k1 * sin, kmask, KV_FP8)
        _store_kv(v_cache_ptr + cp, v1, kmask, KV_FP8)
        _store_kv(v_cache_ptr + cp + half, v2, kmask, KV_FP8)


@triton.jit
def _store_kv(ptr, x, mask, KV_FP8: tl.constexpr):
    """Store into the cache's dtype. For an fp8 cache (scale 1.0) the value is first rounded to the
    nearest E4M3 value (ties to even) and saturated at +-448 in float32, as torch's cast does, so the
    cast itself is exact: the same bytes on every GPU and in Triton's interpreter (whose own fp8
    rounding loses the carry into the exponent)."""
    if KV_FP8:
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        step_exp = tl.maximum(exponent, -6) - 3  # 3 mantissa bits; subnormals below 2**-6
        step = ((step_exp + 127) << 23).to(tl.float32, bitcast=True)
        y = x / step  # exact: a power of two; |y| < 16
        y = (y + 12582912.0) - 12582912.0  # 1.5 * 2**23: round half to even in float32
        x = y * step
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


def rope_and_write_kv(q, k, v, k_cache, v_cache, cos, sin, positions, slot_mapping) -> None:
    """q [T, Hq, D] (rotated in place), k, v [T, Hkv, D]; cos/sin [max_pos, D] float32 tables."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    _rope_write_kernel[(num_tokens,)](
        q,
        k,
        v,
        k_cache,
        v_cache,
        cos,
        sin,
        positions,
        slot_mapping,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_QH=triton.next_power_of_2(num_q_heads),
        BLOCK_KH=triton.next_power_of_2(num_kv_heads),
        KV_FP8=k_cache.dtype == torch.float8_e4m3fn,
    )


@triton.jit
def _attend_block(
    q,
    m_i,
    l_i,
    acc,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    table_row,
    n_offs,
    n_mask,
    allowed,
    kvh,
    qk_scale,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One online-softmax step over the keys `n_offs` of a sequence's pages (flash attention):
    gather their K/V rows through the block table, score, rescale the running max/sum/output."""
    d = tl.arange(0, HEAD_DIM)
    page = tl.load(block_tables_ptr + table_row + n_offs // PAGE_SIZE, mask=n_mask, other=0)
    rows = (page * PAGE_SIZE + n_offs % PAGE_SIZE) * NUM_KV_HEADS + kvh
    k = tl.load(k_cache_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=n_mask[:, None], other=0.0).to(q.dtype)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(allowed, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=n_mask[:, None], other=0.0).to(q.dtype)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr,
    o_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    scale,
    seq_offset,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    sliding_window,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
):
    mblock = tl.program_id(0)
    b = tl.program_id(1) + seq_offset
    h = tl.program_id(2)
    kvh = h // GROUP
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    if mblock * BLOCK_M >= q_len:
        return
    ctx_len = tl.load(seq_lens_ptr + b)
    m_offs = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m_offs < q_len
    q_pos = ctx_len - q_len + m_offs
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + (q_start + m_offs)[:, None] * stride_qt + h * stride_qh + d[None, :], mask=m_mask[:, None], other=0.0
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = scale * 1.4426950408889634
    end = tl.minimum(ctx_len, ctx_len - q_len + (mblock + 1) * BLOCK_M)
    start = 0
    if USE_WINDOW:
        start = tl.maximum(0, ctx_len - q_len + mblock * BLOCK_M - sliding_window + 1) // BLOCK_N * BLOCK_N
    for n0 in range(start, end, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        n_mask = n_offs < ctx_len
        allowed = (n_offs[None, :] <= q_pos[:, None]) & n_mask[None, :]
        if USE_WINDOW:
            allowed &= n_offs[None, :] > q_pos[:, None] - sliding_window
        m_i, l_i, acc = _attend_block(
            q,
            m_i,
            l_i,
            acc,
            k_cache_ptr,
            v_cache_ptr,
            block_tables_ptr,
            b * stride_bt,
            n_offs,
            n_mask,
            allowed,
            kvh,
            qk_scale,
            NUM_KV_HEADS,
            HEAD_DIM,
            PAGE_SIZE,
            IEEE,
        )
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        o_ptr + (q_start + m_offs)[:, None] * stride_ot + h * stride_oh + d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=m_mask[:, None],
    )


def prefill_attention(
    q,
    o,
    k_cache,
    v_cache,
    block_tables,
    query_start_loc,
    seq_lens,
    scale,
    first_seq: int,
    num_seqs: int,
    max_query_len: int,
    sliding_window: int | None,
) -> None:
    """Attention for sequences [first_seq, first_seq + num_seqs) of the batch, written into o."""
    if num_seqs == 0:
        return
    num_heads, head_dim = q.shape[1], q.shape[2]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    block_m = 64 if max_query_len > 32 else 16
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q,
        o,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        scale,
        first_seq,
        q.stride(0),
        q.stride(1),
        o.stride(0),
        o.stride(1),
        block_tables.stride(0),
        sliding_window or 0,
        NUM_KV_HEADS=num_kv_heads,
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_M=block_m,
        BLOCK_N=64,
        USE_WINDOW=sliding_window is not None,
        IEEE=q.dtype == torch.float32,
        num_warps=4,
        num_stages=2,
    )


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    part_o_ptr,
    part_lse_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_bt,
    sliding_window,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(seq_lens_ptr + b)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(0, ctx_len - sliding_window)
    span = ctx_len - lo
    per_split = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, ctx_len)

    g = tl.arange(0, GROUP_PAD)
    g_mask = g < GROUP
    heads = kvh * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=g_mask[:, None], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    qk_scale = scale * 1.4426950408889634
    for n0 in range(start, end, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        n_mask = n_offs < end
        m_i, l_i, acc = _attend_block(
            q,
            m_i,
            l_i,
            acc,
            k_cache_ptr,
            v_cache_ptr,
            block_tables_ptr,
            b * stride_bt,
            n_offs,
            n_mask,
            n_mask[None, :],
            kvh,
            qk_scale,
            NUM_KV_HEADS,
            HEAD_DIM,
            PAGE_SIZE,
            IEEE,
        )
    # partials: o normalised within the split, lse in base 2 (-inf for an empty split)
    lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    part = (b * NUM_KV_HEADS * GROUP + heads) * NUM_SPLITS + split
    tl.store(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=g_mask[:, None])
    tl.store(part_lse_ptr + part, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr,
    part_lse_ptr,
    o_ptr,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    base = (b * NUM_HEADS + h) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + s, mask=s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    parts = tl.load(part_o_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=(s < NUM_SPLITS)[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(o_ptr + b * stride_ot + h * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def decode_num_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int = 132, max_splits: int = 32
) -> int:
    """About two programs per SM (rounded up to a power of two), no split shorter than 256 tokens.
    Tuned on an H100 and checked on an H200 (64 x 4096 and 4 x 32768 tokens, Llama-3-8B heads: 1 and
    16 splits; 9 splits of 4 x 32768 ran 9% slower than 16 there)."""
    want = triton.next_power_of_2(triton.cdiv(2 * num_sms, max(1, num_seqs * num_kv_heads)))
    return int(max(1, min(max_splits, want, triton.cdiv(max_seq_len, 256))))


def decode_attention(
    q,
    o,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    scale,
    num_seqs: int,
    num_splits: int,
    sliding_window: int | None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 4,
) -> None:
    """Attention for the first `num_seqs` sequences (one query row each), written into o[:num_seqs]."""
    if num_seqs == 0:
        return
    num_heads, head_dim = q.shape[1], q.shape[2]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    n = num_seqs * num_heads * num_splits
    workspace = torch.empty(n * (head_dim + 1), dtype=torch.float32, device=q.device)
    part_o = workspace[: n * head_dim]
    part_lse = workspace[n * head_dim : n * (head_dim + 1)]
    ieee = q.dtype == torch.float32
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        part_o,
        part_lse,
        scale,
        q.stride(0),
        q.stride(1),
        block_tables.stride(0),
        sliding_window or 0,
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        NUM_SPLITS=num_splits,
        BLOCK_N=block_n,
        USE_WINDOW=sliding_window is not None,
        IEEE=ieee,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _decode_reduce_kernel[(num_seqs, num_heads)](
        part_o,
        part_lse,
        o,
        o.stride(0),
        o.stride(1),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        NUM_SPLITS=num_splits,
        SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
        num_warps=4,
    )
