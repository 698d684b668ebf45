"""KV memory: the bytes of a page, the cache tensors, and how many pages fit.

The KV cache is one k and one v tensor per attention layer, shape [num_pages, page_size,
num_kv_heads, head_dim], in the model's dtype or float8 (`kv_cache_dtype: fp8`): pages are counted
with the element size, so fp8 fits twice the pages of bf16 (four times float32's) in the same
bytes. On CPU the pool gets `cpu_kv_cache_gib`; on CUDA, what is left of `gpu_memory_utilization`
after the weights and the peak of the largest step, measured once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from workers.kv_cache_manager import cdiv
from workers.models.config import ModelConfig
from workers.runner.config import RunnerConfig

logger = logging.getLogger(__name__)


def kv_page_bytes(model_config: ModelConfig, page_size: int, num_kv_heads: int, dtype: torch.dtype) -> int:
    """Bytes of one KV page (keys and values of every layer) for `num_kv_heads` heads."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model_config.num_layers * page_size * num_kv_heads * model_config.head_dim * elem


def allocate_kv_cache(model, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> None:
    """Give every attention layer of `model` a fresh k and v cache of `shape` (num_pages, page_size,
    num_kv_heads, head_dim); 0 pages frees them. All of them are views of one tensor
    [num_layers, 2, *shape] (`model.kv_cache`), so that a set of pages of every layer moves in one
    index_select / index_copy_ (workers/runner/kv_pages.py)."""
    layers = list(model.attention_layers())
    kv = torch.zeros((len(layers), 2, *shape), dtype=dtype, device=device)
    model.kv_cache = kv
    for i, attn in enumerate(layers):
        attn.k_cache = kv[i, 0]
        attn.v_cache = kv[i, 1]


def num_pages_for(
    cfg: RunnerConfig, page_bytes: int, allocate: Callable[[int], None], profile_step: Callable[[int], None]
) -> int:
    """How many pages the pool gets. On CUDA: run the largest step (a full token budget of prefill
    plus logits for max_num_seqs rows, `profile_step`) with just enough pages for it (`allocate`),
    then give the pool what is left of gpu_memory_utilization beside its peak."""
    if cfg.device.type != "cuda":
        return max(1, int(cfg.cpu_kv_cache_gib * 2**30) // page_bytes)
    device = cfg.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    tokens = min(cfg.max_num_batched_tokens, cfg.max_model_len)
    pages = cdiv(tokens, cfg.page_size)
    allocate(pages)
    profile_step(tokens)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - pages * page_bytes
    allocate(0)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)
    budget = total * cfg.gpu_memory_utilization - peak - others
    num_pages = int(budget // page_bytes)
    logger.info(
        "KV pool: %d pages (%.2f GiB); step peak %.2f GiB; GPU %.1f GiB x %.2f",
        num_pages,
        num_pages * page_bytes / 2**30,
        peak / 2**30,
        total / 2**30,
        cfg.gpu_memory_utilization,
    )
    if num_pages < 1:
        raise RuntimeError(
            f"no GPU memory left for the KV cache: the weights and a {tokens}-token step take "
            f"{peak / 2**30:.1f} GiB; raise gpu_memory_utilization or lower max_num_batched_tokens"
        )
    return num_pages
