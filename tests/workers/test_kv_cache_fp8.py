"""The fp8 KV cache (`kv_cache_dtype: fp8`): pages of float8 E4M3 hold twice the pages of bf16 in
the same memory, and greedy output stays close to a full-precision cache on a trained model
(the agreement is printed: `pytest -s` shows it)."""

import asyncio
from pathlib import Path

import pytest
import torch

from workers.config import EngineConfig
from workers.engine import Engine
from workers.models.config import ModelConfig
from workers.request import GenerateRequest, SamplingParams
from workers.runner.config import resolve_kv_cache_dtype
from workers.runner.memory import kv_page_bytes, num_pages_for
from workers.runner.model_runner import ModelRunner

PYCODER = Path(__file__).parents[2] / "cluster" / "demo_models" / "kvfleet-pycoder"
PROMPTS = [
    "import os\nimport sys\n\ndef main(",
    "class Queue:\n    def __init__(self",
    "def read_config(path):\n    with open(",
    "    for key, value in",
    "import re\n\n_PATTERN = re.compile(",
    "def _check(self, name):\n    if not",
    "try:\n    import threading\nexcept ImportError:\n",
    '"""Utilities for',
]
NUM_NEW = 16


def test_fp8_pages_take_half_the_bytes_of_bf16_so_the_same_memory_holds_twice_the_pages():
    mc = ModelConfig.from_dir(PYCODER)
    bf16 = kv_page_bytes(mc, 16, mc.num_kv_heads, torch.bfloat16)
    fp8 = kv_page_bytes(mc, 16, mc.num_kv_heads, torch.float8_e4m3fn)
    assert bf16 == 2 * fp8 == 2 * (2 * mc.num_layers * 16 * mc.num_kv_heads * mc.head_dim)

    class Cfg:  # the CPU branch of num_pages_for reads these two fields only
        device = torch.device("cpu")
        cpu_kv_cache_gib = 4096 * bf16 / 2**30  # 4096 bf16 pages

    def pages(page_bytes):
        return num_pages_for(Cfg, page_bytes, allocate=None, profile_step=None)

    assert (pages(bf16), pages(fp8)) == (4096, 8192)


def test_kv_cache_dtype_resolves_to_e4m3_and_auto_keeps_the_model_dtype():
    assert resolve_kv_cache_dtype("fp8", torch.device("cpu")) == torch.float8_e4m3fn
    assert resolve_kv_cache_dtype("auto", torch.device("cpu")) is None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


async def _greedy(engine: Engine) -> list[list[int]]:
    params = SamplingParams(max_tokens=NUM_NEW, ignore_eos=True)
    reqs = [GenerateRequest(engine.tokenizer.encode(p), params) for p in PROMPTS]
    outs = await asyncio.gather(*(engine.complete(r) for r in reqs))
    return [o.token_ids for o in outs]


def _engine(**overrides) -> Engine:
    kwargs = dict(model=str(PYCODER), page_size=4, num_pages=256, max_model_len=256)
    return Engine(EngineConfig(**{**kwargs, **overrides}))


def _agreement(kv_auto: list[list[int]], kv_fp8: list[list[int]]) -> tuple[float, int]:
    same = sum(_common_prefix(a, b) for a, b in zip(kv_auto, kv_fp8, strict=True))
    identical = sum(a == b for a, b in zip(kv_auto, kv_fp8, strict=True))
    return same / (NUM_NEW * len(PROMPTS)), identical


def _run_pair(**overrides) -> tuple[list[list[int]], list[list[int]], Engine]:
    results, engines = [], []
    for kv in ("auto", "fp8"):
        engine = _engine(kv_cache_dtype=kv, **overrides)
        engines.append(engine)
        try:
            results.append(asyncio.run(_greedy(engine)))
        finally:
            engine._executor.shutdown(wait=True)
    return results[0], results[1], engines[1]


def _check_fp8_engine(engine: Engine) -> None:
    runner: ModelRunner = engine.runner
    assert runner.cfg.kv_dtype == torch.float8_e4m3fn
    assert all(a.k_cache.dtype == torch.float8_e4m3fn for a in runner.model.attention_layers())
    assert engine.pool.num_free_pages == engine.pool.num_pages


def test_fp8_kv_cache_greedy_output_agrees_with_a_float32_cache_on_cpu():
    kv_auto, kv_fp8, engine = _run_pair(device="cpu")
    _check_fp8_engine(engine)
    agreement, identical = _agreement(kv_auto, kv_fp8)
    print(
        f"\nfp8 KV vs float32 KV (CPU, reference kernels): {agreement:.1%} of greedy tokens before the "
        f"first divergence, {identical}/{len(PROMPTS)} continuations identical"
    )
    # a cache read back wrong (zeros, a wrong scale, another slot) agrees on almost nothing
    assert agreement >= 0.5 and identical >= len(PROMPTS) // 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fp8_kv_cache_greedy_output_agrees_with_a_bf16_cache_on_gpu_with_triton():
    kv_auto, kv_fp8, engine = _run_pair(device="cuda", dtype="bfloat16", max_num_seqs=16)
    assert engine.runner.ops.name == "triton" and len(engine.runner.graphs) > 0
    _check_fp8_engine(engine)
    agreement, identical = _agreement(kv_auto, kv_fp8)
    print(
        f"\nfp8 KV vs bf16 KV (GPU, Triton, CUDA graphs): {agreement:.1%} of greedy tokens before the "
        f"first divergence, {identical}/{len(PROMPTS)} continuations identical"
    )
    assert agreement >= 0.5 and identical >= len(PROMPTS) // 2
