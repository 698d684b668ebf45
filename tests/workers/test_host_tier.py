"""The host-memory tier and pages pulled between replicas, at the engine: greedy output is the same
whether a prompt's prefix pages were computed, restored from host memory, or inserted from another
engine's export; pages are accounted for on both sides (conftest.make_engine checks for leaks)."""

import dataclasses
import random

import pytest
import torch

from kvstore.transport import PullFailure, check_payload
from workers.request import GenerateRequest, SamplingParams

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def ids(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
async def test_evicted_prefix_pages_are_restored_from_host_memory_with_identical_greedy_output(make_engine, device):
    # 20 pages of 4 tokens: a 64-token prompt (16 pages) is evicted by the next two. On CUDA the
    # host tier is pinned memory and the pages cross the PCIe bus both ways.
    engine = make_engine(num_pages=20, max_model_len=80, host_kv_cache_gib=0.01, device=device)
    plain = make_engine(num_pages=256, max_model_len=80, device=device)
    a = ids(64, seed=1)
    first = await engine.complete(GenerateRequest([*a, 7], GREEDY))
    for seed in (2, 3):  # evict a's pages into the host tier
        await engine.complete(GenerateRequest([*ids(64, seed=seed), 7], GREEDY))
    assert engine.stats().num_host_stored_pages >= 16
    assert engine.kv_cache.pool.lookup_prefix(engine.kv_cache.hashes(_seq(a), 16)) == []
    again = await engine.complete(GenerateRequest([*a, 9], GREEDY))
    fresh = await plain.complete(GenerateRequest([*a, 9], GREEDY))
    assert again.num_cached_prompt_tokens == 64 and fresh.num_cached_prompt_tokens == 0
    assert again.token_ids == fresh.token_ids
    st = engine.stats()
    assert st.num_host_restored_pages == 16
    assert st.num_host_cached_pages <= st.num_host_pages
    assert first.num_cached_prompt_tokens == 0
    # restored pages are cached on the device again: a repeat reuses them without a copy
    await engine.complete(GenerateRequest([*a, 11], GREEDY))
    assert engine.stats().num_host_restored_pages == 16


async def test_without_a_host_tier_the_evicted_prefix_is_recomputed(make_engine):
    engine = make_engine(num_pages=20, max_model_len=80)
    a = ids(64, seed=1)
    await engine.complete(GenerateRequest([*a, 7], GREEDY))
    for seed in (2, 3):
        await engine.complete(GenerateRequest([*ids(64, seed=seed), 7], GREEDY))
    again = await engine.complete(GenerateRequest([*a, 9], GREEDY))
    assert again.num_cached_prompt_tokens == 0


async def test_pages_exported_by_one_engine_and_inserted_in_another_give_identical_greedy_output(make_engine):
    holder = make_engine()
    puller = make_engine()
    plain = make_engine()
    prompt = ids(48, seed=3)
    await holder.complete(GenerateRequest([*prompt, 5], GREEDY))
    hashes = holder.kv_cache.hashes(_seq(prompt), 12)
    # the puller computed the first 4 pages itself; it pulls the other 8
    await puller.complete(GenerateRequest([*prompt[:16], 5], GREEDY))
    payload = await holder.export_pages(hashes[4:])
    assert payload.num_pages == 8 and holder.pool.num_free_pages == holder.pool.num_pages
    assert check_payload(payload, puller.model_id, puller.page_io.layout, hashes[4:]) is None
    assert await puller.insert_pages(payload, hashes, 4) == 8
    out = await puller.complete(GenerateRequest([*prompt, 9], GREEDY))
    ref = await plain.complete(GenerateRequest([*prompt, 9], GREEDY))
    assert out.num_cached_prompt_tokens == 48 and ref.num_cached_prompt_tokens == 0
    assert out.token_ids == ref.token_ids
    assert holder.stats().num_exported_pages == 8 and puller.stats().num_inserted_pages == 8


async def test_pages_in_the_holders_host_tier_are_exported_too(make_engine):
    holder = make_engine(num_pages=20, max_model_len=80, host_kv_cache_gib=0.01)
    puller = make_engine(num_pages=64, max_model_len=80)
    a = ids(64, seed=4)
    await holder.complete(GenerateRequest([*a, 1], GREEDY))
    for seed in (5, 6):  # a's pages to host
        await holder.complete(GenerateRequest([*ids(64, seed=seed), 1], GREEDY))
    assert holder.pool.lookup_prefix(holder.kv_cache.hashes(_seq(a), 16)) == []
    hashes = holder.kv_cache.hashes(_seq(a), 16)
    payload = await holder.export_pages(hashes)
    assert payload.num_pages == 16
    assert await puller.insert_pages(payload, hashes, 0) == 16
    out = await puller.complete(GenerateRequest([*a, 2], GREEDY))
    ref = await holder.complete(GenerateRequest([*a, 2], GREEDY))
    assert out.num_cached_prompt_tokens == 64 and out.token_ids == ref.token_ids


@pytest.mark.parametrize("device", DEVICES)
async def test_a_run_partly_on_the_device_and_partly_in_host_memory_is_exported_in_order(make_engine, device):
    holder = make_engine(num_pages=20, max_model_len=80, host_kv_cache_gib=0.01, device=device)
    puller = make_engine(num_pages=64, max_model_len=80, device=device)
    a = ids(64, seed=8)
    await holder.complete(GenerateRequest([*a, 1], GREEDY))
    for seed in (5, 6):  # a's pages to host
        await holder.complete(GenerateRequest([*ids(64, seed=seed), 1], GREEDY))
    await holder.complete(GenerateRequest([*a[:32], 1], GREEDY))  # its first 8 back on the device
    hashes = holder.kv_cache.hashes(_seq(a), 16)
    assert len(holder.pool.lookup_prefix(hashes)) == 8 and holder.kv_cache.held_run(hashes) == 16
    payload = await holder.export_pages(hashes)
    plain = make_engine(device=device)  # computed a alone: every page on its device
    await plain.complete(GenerateRequest([*a, 1], GREEDY))
    assert bytes(payload.data) == bytes((await plain.export_pages(hashes)).data)
    assert await puller.insert_pages(payload, hashes, 0) == 16
    out = await puller.complete(GenerateRequest([*a, 2], GREEDY))
    ref = await plain.complete(GenerateRequest([*a, 2], GREEDY))
    assert out.num_cached_prompt_tokens == 64 and out.token_ids == ref.token_ids


def test_runs_split_a_run_of_pages_by_tier():
    from workers.page_io import _runs

    assert _runs([True, True, False, True]) == [(True, 0, 2), (False, 2, 3), (True, 3, 4)]
    assert _runs([False]) == [(False, 0, 1)] and _runs([]) == []


async def test_a_payload_of_another_prefix_model_or_layout_is_rejected(make_engine):
    holder = make_engine()
    prompt = ids(32, seed=6)
    await holder.complete(GenerateRequest([*prompt, 5], GREEDY))
    hashes = holder.kv_cache.hashes(_seq(prompt), 8)
    payload = await holder.export_pages(hashes)
    lay = holder.page_io.layout
    assert check_payload(payload, holder.model_id, lay, hashes) is None
    assert check_payload(payload, holder.model_id, lay, [h ^ 1 for h in hashes]) is PullFailure.MISMATCH
    assert check_payload(payload, "other-model", lay, hashes) is PullFailure.MISMATCH
    other = dataclasses.replace(lay, dtype="bfloat16")
    assert check_payload(payload, holder.model_id, other, hashes) is PullFailure.MISMATCH
    short = dataclasses.replace(payload, data=payload.data[:-1])  # a byte short
    assert check_payload(dataclasses.replace(payload, data=None), holder.model_id, lay, hashes) is PullFailure.MISMATCH
    assert check_payload(short, holder.model_id, lay, hashes) is PullFailure.MISMATCH
    # a holder that evicted the tail answers a shorter run: valid, the rest is recomputed
    partial = await holder.export_pages([*hashes[:3], 12345])
    assert partial.num_pages == 3 and check_payload(partial, holder.model_id, lay, [*hashes[:3], 12345]) is None


async def test_inserting_into_a_full_pool_keeps_the_held_run_and_inserts_what_fits(make_engine):
    holder = make_engine()
    puller = make_engine(num_pages=24, max_model_len=80)
    prompt = ids(64, seed=7)
    await holder.complete(GenerateRequest([*prompt, 5], GREEDY))
    hashes = holder.kv_cache.hashes(_seq(prompt), 16)
    await puller.complete(GenerateRequest([*prompt[:32], 5], GREEDY))  # holds 8 pages
    payload = await holder.export_pages(hashes[8:])
    assert await puller.insert_pages(payload, hashes, 8) == 8
    assert len(puller.pool.lookup_prefix(hashes)) == 16
    out = await puller.complete(GenerateRequest([*prompt, 5], GREEDY))
    assert out.num_cached_prompt_tokens == 64


async def test_a_restore_predicted_slower_than_recompute_is_skipped_with_identical_output(make_engine):
    engine = make_engine(num_pages=20, max_model_len=80, host_kv_cache_gib=0.01)
    plain = make_engine(num_pages=256, max_model_len=80)
    a = ids(64, seed=1)
    await engine.complete(GenerateRequest([*a, 7], GREEDY))
    for seed in (2, 3):  # evict a's pages into the host tier (and measure the prefill rate)
        await engine.complete(GenerateRequest([*ids(64, seed=seed), 7], GREEDY))
    assert engine.stats().num_host_stored_pages >= 16 and engine._restore_worth(16)  # nothing measured
    engine.host_tier._restore_bw = 1.0  # as if a restore had crawled at 1 byte/s
    assert not engine._restore_worth(16)
    again = await engine.complete(GenerateRequest([*a, 9], GREEDY))
    fresh = await plain.complete(GenerateRequest([*a, 9], GREEDY))
    assert again.num_cached_prompt_tokens == 0 and again.token_ids == fresh.token_ids
    st = engine.stats()
    assert st.num_host_restored_pages == 0 and st.num_host_skipped_restores == 1


def _seq(tokens):
    from workers.sequence import Sequence

    return Sequence("x", tokens, GREEDY)
