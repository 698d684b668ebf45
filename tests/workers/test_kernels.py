"""Every Triton kernel against its pure-torch reference, on random data. On CPU they run under
TRITON_INTERPRET=1 (set by conftest), so the shapes stay tiny; on a GPU the same tests run the
compiled kernels."""

import pytest
import torch

from workers.kernels import reference, triton_attention, triton_norm
from workers.kernels.ops import get_ops
from workers.layers.attention import AttentionMetadata

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def make_cache(num_pages, page_size, kv_heads, head_dim):
    return rand(num_pages, page_size, kv_heads, head_dim), rand(num_pages, page_size, kv_heads, head_dim)


def random_tables(ctx_lens, page_size, num_pages, gen):
    """Distinct random pages per sequence, padded with 0 to a common width."""
    perm = torch.randperm(num_pages, generator=gen).tolist()
    width = max(-(-c // page_size) for c in ctx_lens)
    tables, used = [], 0
    for c in ctx_lens:
        n = -(-c // page_size)
        tables.append(perm[used : used + n] + [0] * (width - n))
        used += n
    return torch.tensor(tables, dtype=torch.int32, device=DEVICE)


def meta_for(q_lens, ctx_lens, tables, num_splits=2):
    num_decodes = sum(1 for n in q_lens if n == 1)
    assert all(n == 1 for n in q_lens[:num_decodes]), "decodes first"
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    return AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64, device=DEVICE),
        block_tables=tables,
        seq_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        num_decodes=num_decodes,
        max_query_len=max(q_lens),
        num_splits=num_splits,
        seq_lens_cpu=list(ctx_lens),
        query_start_loc_cpu=qsl,
    )


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(2, 2, 64), (4, 1, 64), (8, 1, 128), (8, 2, 128)])
def test_mixed_batch_attention_matches_reference(heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(heads * 100 + head_dim)
    page_size = 4
    # decodes first (contexts: shorter than a page, exactly a page, across boundaries), then
    # prefill chunks: a whole prompt, a chunk after a prefix hit, one shorter than a page
    q_lens = [1, 1, 1, 1, 9, 6, 3]
    ctx_lens = [3, 4, 13, 70, 9, 17, 3]
    tables = random_tables(ctx_lens, page_size, 64, gen)
    k_cache, v_cache = make_cache(64, page_size, kv_heads, head_dim)
    q = rand(sum(q_lens), heads, head_dim)
    meta = meta_for(q_lens, ctx_lens, tables, num_splits=3)
    got = get_ops("triton", DEVICE).attention(q, k_cache, v_cache, meta, head_dim**-0.5, None)
    want = get_ops("torch", DEVICE).attention(q, k_cache, v_cache, meta, head_dim**-0.5, None)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_attention_handles_splits_and_padding_rows(num_splits):
    gen = torch.Generator().manual_seed(num_splits)
    ctx_lens = [130, 5, 0]  # the last row is graph padding: an empty context
    tables = random_tables([max(c, 1) for c in ctx_lens], 16, 32, gen)
    k_cache, v_cache = make_cache(32, 16, 2, 64)
    q = rand(3, 8, 64)
    o = torch.full_like(q, float("nan"))
    seq_lens = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    triton_attention.decode_attention(q, o, k_cache, v_cache, tables, seq_lens, 0.125, 3, num_splits, None)
    want = reference.paged_attention(q[:2], k_cache, v_cache, tables[:2], [0, 1, 2], ctx_lens[:2], 0.125)
    torch.testing.assert_close(o[:2], want, atol=2e-4, rtol=2e-4)
    assert torch.equal(o[2], torch.zeros_like(o[2]))


def test_sliding_window_attention_matches_reference():
    gen = torch.Generator().manual_seed(7)
    q_lens, ctx_lens = [1, 1, 12], [40, 7, 30]
    tables = random_tables(ctx_lens, 4, 64, gen)
    k_cache, v_cache = make_cache(64, 4, 2, 64)
    q = rand(sum(q_lens), 4, 64)
    meta = meta_for(q_lens, ctx_lens, tables)
    got = get_ops("triton", DEVICE).attention(q, k_cache, v_cache, meta, 0.125, 8)
    want = get_ops("torch", DEVICE).attention(q, k_cache, v_cache, meta, 0.125, 8)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 64), (8, 2, 128)])
def test_rope_and_write_kv_matches_reference(heads, kv_heads, head_dim):
    tokens = 6
    qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim)  # q, k, v are strided views, as in the model
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))
    angles = torch.arange(64, dtype=torch.float32, device=DEVICE)[:, None] * torch.rand(head_dim // 2, device=DEVICE)
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    positions = torch.tensor([0, 5, 17, 3, 63, 9], device=DEVICE)
    slots = torch.tensor([0, 7, -1, 12, 3, 31], device=DEVICE)  # -1: padding, write nothing
    caches_ref = [torch.zeros(8, 4, kv_heads, head_dim, device=DEVICE) for _ in range(2)]
    caches_got = [c.clone() for c in caches_ref]
    want_q = reference.rope_and_write_kv(q.clone(), k.clone(), v.clone(), *caches_ref, cos, sin, positions, slots)
    q_in = q.clone()
    triton_attention.rope_and_write_kv(q_in, k, v, *caches_got, cos, sin, positions, slots)
    torch.testing.assert_close(q_in, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches_got[0], caches_ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches_got[1], caches_ref[1], atol=0, rtol=0)
    assert caches_got[0].abs().sum() > 0


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(with_residual):
    x, w = rand(5, 96), rand(96)
    res = rand(5, 96) if with_residual else None
    want = reference.rms_norm(x, w, 1e-6, None if res is None else res.clone())
    got = triton_norm.rms_norm(x, w, 1e-6, None if res is None else res.clone())
    if with_residual:
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_silu_and_mul_matches_reference():
    x = rand(3, 2 * 80)
    torch.testing.assert_close(triton_norm.silu_and_mul(x), reference.silu_and_mul(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- fp8 KV cache (kv_cache_dtype: fp8)
FP8 = torch.float8_e4m3fn


def test_fp8_kv_cache_attention_matches_reference():
    """Both paths read the same fp8 pages and upcast them: they agree as closely as with float pages."""
    gen = torch.Generator().manual_seed(3)
    q_lens, ctx_lens = [1, 1, 1, 7, 3], [5, 16, 40, 7, 20]
    tables = random_tables(ctx_lens, 4, 64, gen)
    k_cache, v_cache = (c.to(FP8) for c in make_cache(64, 4, 2, 64))
    q = rand(sum(q_lens), 8, 64)
    meta = meta_for(q_lens, ctx_lens, tables, num_splits=2)
    got = get_ops("triton", DEVICE).attention(q, k_cache, v_cache, meta, 0.125, None)
    want = get_ops("torch", DEVICE).attention(q, k_cache, v_cache, meta, 0.125, None)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    upcast = get_ops("torch", DEVICE).attention(q, k_cache.float(), v_cache.float(), meta, 0.125, None)
    torch.testing.assert_close(want, upcast, atol=0, rtol=0)


def test_rope_and_write_kv_into_fp8_cache_rounds_and_saturates_as_reference():
    tokens, heads, kv_heads, head_dim = 4, 4, 2, 64
    q, k, v = rand(tokens, heads, head_dim), rand(tokens, kv_heads, head_dim), rand(tokens, kv_heads, head_dim)
    v[1, 0, :4] = torch.tensor([1000.0, -1000.0, 448.0, 0.01])  # beyond E4M3's range: saturate to +-448
    angles = torch.arange(16, dtype=torch.float32, device=DEVICE)[:, None] * torch.rand(head_dim // 2, device=DEVICE)
    emb = torch.cat((angles, angles), dim=-1)
    positions = torch.tensor([0, 5, 3, 9], device=DEVICE)
    slots = torch.tensor([0, 6, -1, 3], device=DEVICE)
    caches_ref = [torch.zeros(2, 4, kv_heads, head_dim, device=DEVICE, dtype=FP8) for _ in range(2)]
    caches_got = [c.clone() for c in caches_ref]
    reference.rope_and_write_kv(q.clone(), k, v, *caches_ref, emb.cos(), emb.sin(), positions, slots)
    triton_attention.rope_and_write_kv(q.clone(), k, v, *caches_got, emb.cos(), emb.sin(), positions, slots)
    assert caches_got[1].float().view(-1, kv_heads, head_dim)[6, 0, :3].tolist() == [448.0, -448.0, 448.0]
    # the rotation may differ in the last float bit, which can flip an fp8 rounding: one E4M3 step
    torch.testing.assert_close(caches_got[0].float(), caches_ref[0].float(), atol=2e-3, rtol=0.13)
    torch.testing.assert_close(caches_got[1].float(), caches_ref[1].float(), atol=0, rtol=0)


@pytest.mark.parametrize("ctx_lens", [[13], [3, 4, 13, 70]])
def test_reference_decode_only_step_equals_dense_attention(ctx_lens):
    """The reference's decode-only shortcuts (one batched call; one sequence: its context sliced,
    no mask) give each query softmax attention over exactly its own context."""
    gen = torch.Generator().manual_seed(len(ctx_lens))
    page_size, heads, kv_heads, head_dim = 4, 4, 2, 64
    tables = random_tables(ctx_lens, page_size, 64, gen)
    k_cache, v_cache = make_cache(64, page_size, kv_heads, head_dim)
    q = rand(len(ctx_lens), heads, head_dim)
    meta = meta_for([1] * len(ctx_lens), ctx_lens, tables)
    got = get_ops("torch", DEVICE).attention(q, k_cache, v_cache, meta, head_dim**-0.5, None)
    for b, n in enumerate(ctx_lens):
        slots = [int(tables[b, p // page_size]) * page_size + p % page_size for p in range(n)]
        k = k_cache.flatten(0, 1)[slots].repeat_interleave(heads // kv_heads, dim=1)  # [n, heads, d]
        v = v_cache.flatten(0, 1)[slots].repeat_interleave(heads // kv_heads, dim=1)
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[b], k) * head_dim**-0.5, dim=-1)
        torch.testing.assert_close(got[b], torch.einsum("hn,nhd->hd", weights, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ctx_lens", [[13], [3, 4, 13, 70]])
def test_layers_of_a_decode_step_share_its_plan_and_gather_buffers_without_mixing_their_caches(ctx_lens):
    """Every layer of a decode-only step reuses the step's plan and gathers into the same two
    buffers: each layer still attends over its own cache, and an earlier layer's output is not
    changed by a later layer's gather."""
    gen = torch.Generator().manual_seed(7 + len(ctx_lens))
    page_size, heads, kv_heads, head_dim = 4, 4, 2, 64
    tables = random_tables(ctx_lens, page_size, 64, gen)
    meta = meta_for([1] * len(ctx_lens), ctx_lens, tables)
    layers = [make_cache(64, page_size, kv_heads, head_dim) for _ in range(3)]
    q = rand(len(ctx_lens), heads, head_dim)
    ops = get_ops("torch", DEVICE)
    got = [ops.attention(q, k, v, meta, head_dim**-0.5, None) for k, v in layers]
    for (k, v), out in zip(layers, got, strict=True):
        fresh_meta = meta_for([1] * len(ctx_lens), ctx_lens, tables)
        fresh = get_ops("torch", DEVICE).attention(q, k, v, fresh_meta, head_dim**-0.5, None)
        torch.testing.assert_close(out, fresh, atol=0, rtol=0)
    assert not torch.equal(got[0], got[1])
