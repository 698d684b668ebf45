"""Run a model over one whole token sequence outside the engine: one contiguous prefill through
the model's own forward (its kernel set, its paged attention over a private cache the size of the
sequence). Calibration (workers/quant/awq.py) and the quality harness (`kvfleet bench quality`)
read the hidden states or logits of every position; neither needs a scheduler or a page pool.
"""

from __future__ import annotations

import torch

from workers.layers.attention import AttentionMetadata

PAGE_SIZE = 16


def prefill_hidden(model, token_ids: torch.Tensor) -> torch.Tensor:
    """Hidden states [n, hidden] of every position of `token_ids` (1-D), computed as one prefill.

    The attention layers get a fresh cache for the call and their previous cache back after it,
    so a model the engine also holds is left as it was."""
    token_ids = token_ids.reshape(-1)
    n = token_ids.shape[0]
    if n < 1:
        raise ValueError("prefill needs at least one token")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    layers = model.attention_layers()
    num_pages = -(-n // PAGE_SIZE)
    saved = [(a.k_cache, a.v_cache) for a in layers]
    shape = (num_pages, PAGE_SIZE, layers[0].num_kv_heads, layers[0].head_dim)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=device),
        block_tables=torch.arange(num_pages, dtype=torch.int32, device=device)[None],
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        num_decodes=int(n == 1),
        max_query_len=n,
        num_splits=1,
    )
    try:
        for a in layers:
            a.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            a.v_cache = torch.zeros_like(a.k_cache)
        with torch.no_grad():
            return model(token_ids.to(device), torch.arange(n, device=device), meta)
    finally:
        for a, (k, v) in zip(layers, saved, strict=True):
            a.k_cache, a.v_cache = k, v


def prefill_logits(model, token_ids: torch.Tensor) -> torch.Tensor:
    """float32 logits [n, vocab] of every position (position i predicts token i + 1)."""
    with torch.no_grad():
        return model.compute_logits(prefill_hidden(model, token_ids)).float()
