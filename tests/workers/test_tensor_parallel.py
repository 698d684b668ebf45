"""Tensor parallelism on CPU: gloo, rank 0 in this process and rank 1 in a spawned process.
Greedy outputs of TP=2 must equal TP=1 token for token, and log-probabilities agree to 1e-4, on
tiny models with split KV heads (4 heads / 2 KV heads), one replicated KV head, and q/k-norm with
tied embeddings (Qwen3)."""

from __future__ import annotations

import asyncio

import pytest

from cluster.demo.model import build_model_dir
from tests.conftest import scaled
from workers.config import EngineConfig
from workers.engine import Engine
from workers.layers.parallel import TPInfo, shard_heads
from workers.request import GenerateRequest, SamplingParams

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Page:\n    def __init__(self", "x = [i * i for"]


@pytest.fixture(scope="module")
def tp_models(tmp_path_factory, tokenizer, model_dirs):
    root = tmp_path_factory.mktemp("tp-models")
    return {
        "llama-gqa": model_dirs["llama"],  # 4 heads, 2 KV heads: KV heads split over 2 ranks
        "llama-1kv": build_model_dir(root / "llama-1kv", "llama", tokenizer=tokenizer, seed=5, num_key_value_heads=1),
        "qwen3": model_dirs["qwen3"],  # q/k RMSNorm, tied embeddings
    }


def run(model_dir, tp: int) -> list:
    engine = Engine(
        EngineConfig(
            model=str(model_dir), device="cpu", page_size=4, num_pages=128, max_model_len=256, tensor_parallel_size=tp
        )
    )

    async def main():
        try:
            params = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=3)
            reqs = [GenerateRequest(engine.tokenizer.encode(p), params) for p in PROMPTS]
            return await asyncio.gather(*(engine.complete(r) for r in reqs))
        finally:
            await engine.shutdown()

    outs = asyncio.run(main())
    assert engine.pool.num_free_pages == engine.pool.num_pages, "pages leaked"
    return outs


@pytest.mark.parametrize("arch", ["llama-gqa", "llama-1kv", "qwen3"])
def test_tp2_greedy_output_and_logprobs_equal_tp1(tp_models, arch):
    one, two = run(tp_models[arch], 1), run(tp_models[arch], 2)
    for a, b in zip(one, two, strict=True):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert la.chosen.token_id == lb.chosen.token_id
            assert la.chosen.logprob == pytest.approx(lb.chosen.logprob, abs=1e-4)
            assert [t.token_id for t in la.top] == [t.token_id for t in lb.top]
            assert [t.logprob for t in la.top] == pytest.approx([t.logprob for t in lb.top], abs=1e-4)


def test_kv_heads_split_when_ranks_do_not_outnumber_them():
    s = shard_heads(32, 8, TPInfo(rank=3, size=4))
    assert (s.num_heads, s.num_kv_heads, s.q_start, s.kv_start) == (8, 2, 24, 6)


def test_kv_heads_replicate_when_ranks_outnumber_them():
    # 8 ranks, 2 KV heads: ranks 0-3 hold KV head 0, ranks 4-7 KV head 1, each with 4 query heads.
    shards = [shard_heads(32, 2, TPInfo(rank=r, size=8)) for r in range(8)]
    assert [s.kv_start for s in shards] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(s.num_kv_heads == 1 and s.num_heads == 4 for s in shards)
    # each rank's query heads use exactly the KV head it holds (GQA group = 16 query heads)
    assert all(s.q_start // 16 == s.kv_start and (s.q_start + 3) // 16 == s.kv_start for s in shards)


@pytest.mark.parametrize(("heads", "kv", "tp"), [(6, 2, 4), (8, 3, 2), (8, 2, 3)])
def test_impossible_splits_are_refused_with_a_reason(heads, kv, tp):
    with pytest.raises(ValueError, match=r"tensor_parallel_size|KV heads"):
        shard_heads(heads, kv, TPInfo(rank=0, size=tp))


def test_a_group_in_a_ray_placement_group_serves_and_a_dead_rank_fails_it_fast(serve_cluster, model_dirs):
    """The deployment's path: rank 0 in an actor of a placement group, rank 1 an actor in bundle 1.
    (Ray is the session cluster's; the group needs 2 bundles of 0.25 CPU.)"""
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # Rank 1's actor must start (a fresh Ray worker importing torch) and join rank 0 within the
    # group's timeout, and a collective with a dead rank fails within it at worst: 10 s on a quiet
    # machine, longer on a loaded one (a join once timed out at 10 s on a busy 2-core box).
    tp_timeout_s = scaled(10)

    @ray.remote
    class Host:
        def __init__(self, model: str, tp_timeout_s: float):
            self.engine = Engine(
                EngineConfig(
                    model=model,
                    device="cpu",
                    page_size=4,
                    num_pages=64,
                    max_model_len=128,
                    tensor_parallel_size=2,
                    tp_timeout_s=tp_timeout_s,
                )
            )

        async def greedy(self, ids: list[int]) -> list[int]:
            out = await self.engine.complete(GenerateRequest(ids, SamplingParams(max_tokens=8, ignore_eos=True)))
            return out.token_ids

        def ranks(self):
            return self.engine.ranks.in_ray, self.engine.ranks.alive(), self.engine.ranks._actors

    pg = placement_group([{"CPU": 0.25}, {"CPU": 0.25}], strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=scaled(60))
    try:
        host = Host.options(
            num_cpus=0.25,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0, placement_group_capture_child_tasks=True),
        ).remote(str(model_dirs["llama"]), tp_timeout_s)
        ids = [5, 17, 42, 99, 7]
        in_ray, alive, actors = ray.get(host.ranks.remote(), timeout=scaled(120))
        assert in_ray and alive and len(actors) == 1
        expected = run_one(model_dirs["llama"], ids)
        assert ray.get(host.greedy.remote(ids), timeout=scaled(60)) == expected

        ray.kill(actors[0])
        t0 = time.monotonic()
        with pytest.raises(Exception, match=r"engine|rank|Connection|closed|timed out"):
            ray.get(host.greedy.remote(ids), timeout=tp_timeout_s + scaled(50))
        assert time.monotonic() - t0 < tp_timeout_s + scaled(20), "a dead rank hung the engine"
        assert ray.get(host.ranks.remote())[1] is False  # the replica's health check fails on this
        ray.kill(host)
    finally:
        remove_placement_group(pg)


def run_one(model_dir, ids: list[int]) -> list[int]:
    engine = Engine(EngineConfig(model=str(model_dir), device="cpu", page_size=4, num_pages=64, max_model_len=128))

    async def main():
        try:
            out = await engine.complete(GenerateRequest(ids, SamplingParams(max_tokens=8, ignore_eos=True)))
            return out.token_ids
        finally:
            await engine.shutdown()

    return asyncio.run(main())
