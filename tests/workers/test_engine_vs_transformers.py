"""Token-exact greedy outputs against `transformers.generate` on the same weights (float32),
for a concurrent batch of mixed-length prompts, under prefix caching, tiny prefill chunks and
a pool small enough to force preemption."""

import asyncio
import random

import pytest
import torch
import transformers

from workers.request import GenerateRequest, SamplingParams

NUM_NEW = 12


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 512) for _ in range(24)]  # 6 pages of 4: a shared system prompt
    prompts = [shared + [rng.randrange(3, 512) for _ in range(rng.randint(1, 16))] for _ in range(5)]
    prompts += [[rng.randrange(3, 512) for _ in range(rng.randint(1, 40))] for _ in range(5)]
    prompts.append(shared[:8])  # exactly two full pages
    return prompts


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def hf_outputs(model_dirs):
    """Greedy continuations from transformers, one prompt at a time (no padding effects)."""
    out = {}
    for arch, path in model_dirs.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # compare fixed-length continuations
        rows = []
        for p in PROMPTS:
            with torch.no_grad():
                ids = model.generate(torch.tensor([p]), max_new_tokens=NUM_NEW, do_sample=False, pad_token_id=2)
            rows.append(ids[0, len(p) :].tolist())
        out[arch] = rows
    return out


async def _run_all(engine) -> list[list[int]]:
    params = SamplingParams(max_tokens=NUM_NEW, ignore_eos=True)
    outs = await asyncio.gather(*(engine.complete(GenerateRequest(p, params)) for p in PROMPTS))
    return [o.token_ids for o in outs]


def test_reference_outputs_are_diverse(hf_outputs):
    # A tiny random model that repeats one token would make every comparison vacuous.
    for rows in hf_outputs.values():
        assert len({tuple(r) for r in rows}) == len(rows)
        assert sum(len(set(r)) for r in rows) / len(rows) >= 6


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize(
    "setting",
    [
        dict(enable_prefix_caching=False),
        dict(enable_prefix_caching=True),
        dict(max_num_batched_tokens=5),
        dict(num_pages=20, max_model_len=64),
    ],
    ids=["no-prefix-cache", "prefix-cache", "tiny-chunks", "preemption"],
)
async def test_greedy_outputs_equal_transformers(make_engine, hf_outputs, arch, setting):
    engine = make_engine(arch, **setting)
    got = await _run_all(engine)
    assert got == hf_outputs[arch]
    stats = engine.stats()
    if "num_pages" in setting:
        assert stats.num_preemptions > 0
    if setting.get("max_num_batched_tokens") == 5:
        assert stats.num_prefill_tokens >= sum(map(len, PROMPTS)) - stats.prefix_cache_hits
    # run the batch again: the second time the prompts' full pages come from the cache
    if setting.get("enable_prefix_caching"):
        before = engine.stats().prefix_cache_hits
        assert await _run_all(engine) == hf_outputs[arch]
        assert engine.stats().prefix_cache_hits - before >= sum((len(p) - 1) // 4 * 4 for p in PROMPTS)


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="CPU tensors through the Triton interpreter; on a GPU the _on_gpu tests run the same kernels compiled",
)
async def test_greedy_outputs_equal_transformers_with_triton_kernels(make_engine, hf_outputs):
    # On CPU the kernels run interpreted: slow, so one family and a budget that mixes prefill
    # chunks with decodes in the same steps.
    engine = make_engine("llama", kernels="triton", max_num_batched_tokens=24)
    assert engine.runner.ops.name == "triton"
    assert await _run_all(engine) == hf_outputs["llama"]


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@needs_gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize(
    "setting",
    [dict(), dict(enforce_eager=True), dict(max_num_batched_tokens=5), dict(num_pages=20, max_model_len=64)],
    ids=["graphs", "eager", "tiny-chunks", "preemption"],
)
async def test_greedy_outputs_equal_transformers_on_gpu(make_engine, hf_outputs, arch, setting):
    # float32 explicitly: 'auto' serves a float32 checkpoint in bfloat16 on GPU
    engine = make_engine(arch, device="cuda", dtype="float32", **setting)
    assert engine.runner.ops.name == "triton"
    assert bool(engine.runner.graphs) == (not setting.get("enforce_eager", False))
    assert await _run_all(engine) == hf_outputs[arch]
    if "num_pages" in setting:
        assert engine.stats().num_preemptions > 0


@needs_gpu
def test_gpu_pool_is_sized_from_memory_utilization(make_engine):
    engine = make_engine("llama", device="cuda", dtype="float32", num_pages=None, gpu_memory_utilization=0.5)
    _free, total = torch.cuda.mem_get_info()
    assert engine.pool.num_pages * engine.runner.page_bytes > 0.3 * total
    assert torch.cuda.memory_reserved() <= 0.5 * total + 2**30
