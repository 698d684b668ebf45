"""Pulls between two engines in one process through an in-process `PageTransport`: the cost model,
the deadline, and every fault (slow or dead holder, mismatched or evicted pages, no index) leave
the request served with identical greedy output, counted, and no page held on either side
(conftest.make_engine checks the pools at teardown). A holder answers an export, and a puller
inserts pages, while its engine step runs; exported pages are referenced only for the copy."""

import asyncio
import dataclasses
import gc
import random
import threading

import numpy as np
import pytest
import torch

from kvstore.hashing import page_hashes
from kvstore.transport import PullFailure, TransportError
from tests.conftest import scaled
from workers.config import KVTransferConfig
from workers.kv_transfer import PULL_PHASES, KVPuller, PullCostModel
from workers.request import GenerateRequest, SamplingParams

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
FAST = KVTransferConfig(enabled=True, timeout_s=2.0, assumed_bandwidth_gib_s=100.0, assumed_prefill_tokens_s=10.0)


def ids(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


class InProcess:
    """A transport to engines of this process; `tamper` changes what the holder sends."""

    def __init__(self, engines, delay_s=0.0, tamper=None, fail=None):
        self.engines, self.delay_s, self.tamper, self.fail = engines, delay_s, tamper, fail
        self.calls = 0

    async def fetch(self, replica_id, hashes, timeout_s):
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        payload = await self.engines[replica_id].export_pages(list(hashes))
        await asyncio.sleep(self.delay_s)
        return self.tamper(payload) if self.tamper else payload


async def setup(make_engine, **transport):
    holder, puller = make_engine(replica_id="A"), make_engine(replica_id="B")
    prompt = [*ids(64, seed=11), 3]
    await holder.complete(GenerateRequest(prompt, GREEDY))
    request = GenerateRequest(prompt, GREEDY, page_hashes=page_hashes(prompt, 4, puller.model_id))
    return holder, puller, request, InProcess({"A": holder}, **transport)


def located(answer):
    async def locate(hashes):
        return None if answer is None else dict(answer)

    return locate


async def test_a_pull_inserts_the_holders_pages_and_the_output_is_identical(make_engine):
    holder, puller, request, transport = await setup(make_engine)
    p = KVPuller(puller, transport, located({"A": 16, "B": 0}), FAST)
    assert await p.prepare(request) == 16
    out = await puller.complete(dataclasses.replace(request, request_id="r2"))
    ref = await holder.complete(dataclasses.replace(request, request_id="r3"))
    assert out.num_cached_prompt_tokens == 64 and out.token_ids == ref.token_ids
    assert (p.stats.num_pulls, p.stats.num_pages) == (1, 16)
    assert p.stats.num_bytes == 16 * puller.page_io.layout.page_bytes and p.stats.bandwidth_bytes_s > 0
    assert not any(p.stats.fallbacks.values())
    # the holder's read is timed and stamped: the pull's transport time splits around it
    assert 0 < p.stats.read_time_s <= p.stats.fetch_time_s <= p.stats.time_s
    assert p.stats.request_time_s >= 0 and p.stats.reply_time_s >= 0
    # ... and into phases (the kvfleet_kv_pull_phase_seconds_total metric), each measured
    ph = p.stats.phase_s
    assert list(ph) == list(PULL_PHASES) and all(t >= 0 for t in ph.values())
    assert ph["holder_gather"] > 0 and ph["scatter"] > 0 and ph["check"] > 0
    holder_s = ph["holder_lookup"] + ph["holder_gather"] + ph["holder_serialize"]
    assert holder_s == pytest.approx(p.stats.read_time_s)
    assert await p.prepare(dataclasses.replace(request, request_id="r4")) == 0  # held now: no call
    assert transport.calls == 1


async def test_the_cost_model_recomputes_when_moving_pages_is_predicted_slower(make_engine):
    _holder, puller, request, transport = await setup(make_engine)
    slow_link = KVTransferConfig(enabled=True, assumed_bandwidth_gib_s=1e-6, assumed_prefill_tokens_s=1e6)
    p = KVPuller(puller, transport, located({"A": 16}), slow_link)
    assert await p.prepare(request) == 0
    assert p.stats.fallbacks["not_worth"] == 1 and transport.calls == 0


async def test_faults_fall_back_to_recompute_and_are_counted(make_engine):
    holder, puller, request, _ = await setup(make_engine)
    ref = await holder.complete(dataclasses.replace(request, request_id="ref"))

    def wrong_hashes(payload):
        return dataclasses.replace(payload, hashes=tuple(h ^ 1 for h in payload.hashes))

    cases = [
        (InProcess({"A": holder}, delay_s=1.0), located({"A": 16}), "timeout"),
        (InProcess({}, fail=ConnectionError("holder died")), located({"A": 16}), "error"),
        (InProcess({}, fail=TransportError(PullFailure.ERROR, "actor died")), located({"A": 16}), "error"),
        (InProcess({"A": holder}, tamper=wrong_hashes), located({"A": 16}), "mismatch"),
        (InProcess({"A": holder}), located(None), "index_down"),
    ]
    config = FAST.model_copy(update={"timeout_s": 0.2})
    for i, (transport, locate, reason) in enumerate(cases):
        p = KVPuller(puller, transport, locate, config)
        assert await p.prepare(dataclasses.replace(request, request_id=f"p{i}")) == 0, reason
        assert p.stats.fallbacks[reason] == 1, reason
        assert puller.kv_cache.held_run(request.page_hashes) == 0
    out = await puller.complete(dataclasses.replace(request, request_id="served"))
    assert out.num_cached_prompt_tokens == 0 and out.token_ids == ref.token_ids
    assert holder.pool.num_free_pages == holder.pool.num_pages


async def test_pages_evicted_on_the_holder_between_lookup_and_pull_are_recomputed(make_engine):
    holder, puller, request, transport = await setup(make_engine)
    holder.pool.reset_prefix_cache()  # the holder evicted everything after the index said it held it
    p = KVPuller(puller, transport, located({"A": 16}), FAST)
    assert await p.prepare(request) == 0
    assert p.stats.fallbacks["evicted"] == 1
    # a partial answer: the holder keeps 8 of the 16 pages; those 8 are pulled, the rest computed
    half = [*ids(64, seed=11)[:32], 3]
    await holder.complete(GenerateRequest(half, GREEDY))
    p2 = KVPuller(puller, transport, located({"A": 16}), FAST)
    assert await p2.prepare(dataclasses.replace(request, request_id="again")) == 8
    assert p2.stats.fallbacks["evicted"] == 1
    out = await puller.complete(dataclasses.replace(request, request_id="served"))
    assert out.num_cached_prompt_tokens == 32


class Gate:
    """Holds an engine's steps in its step thread until released: a step that takes as long as
    the test needs (a long prefill on a loaded replica)."""

    def __init__(self, engine):
        self.started, self.release = threading.Event(), threading.Event()
        inner = engine.runner.execute

        def execute(out):
            self.started.set()
            assert self.release.wait(60), "the gate was never released"
            return inner(out)

        engine.runner.execute = execute

    async def wait_started(self):
        for _ in range(6000):
            if self.started.is_set():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("no step started")


async def test_an_export_and_an_insert_are_answered_while_a_step_runs(make_engine):
    holder, puller, request, _ = await setup(make_engine)
    ref = await holder.complete(dataclasses.replace(request, request_id="ref"))
    gates = [Gate(holder), Gate(puller)]
    busy = [asyncio.create_task(e.complete(GenerateRequest(ids(40, seed=5), GREEDY))) for e in (holder, puller)]
    for g in gates:
        await g.wait_started()
    hashes = list(request.page_hashes)
    payload = await asyncio.wait_for(holder.export_pages(hashes), 30)
    assert payload.num_pages == 16 and holder._step_running  # answered inside the holder's step
    assert all(holder.pool.ref_counts[holder.pool.cached_page(h)] == 0 for h in hashes)  # released
    assert await asyncio.wait_for(puller.insert_pages(payload, hashes, 0), 30) == 16
    assert puller._step_running
    for g in gates:
        g.release.set()
    await asyncio.gather(*busy)
    out = await puller.complete(dataclasses.replace(request, request_id="r2"))
    assert out.num_cached_prompt_tokens == 64 and out.token_ids == ref.token_ids


async def test_exported_pages_survive_evictions_during_the_copy_and_are_released_after(make_engine):
    holder = make_engine(replica_id="A", num_pages=64)
    prompt = [*ids(64, seed=11), 3]
    await holder.complete(GenerateRequest(prompt, GREEDY))
    hashes = page_hashes(prompt, 4, holder.model_id)
    before = holder.page_io.export(hashes)
    pages = [holder.pool.cached_page(h) for h in hashes]
    taken = []

    def read(device, host, order):
        def storm():  # another thread takes every free page, as a step's allocation would
            with holder.kv_cache.lock:
                taken.extend(holder.pool.allocate(holder.pool.num_free_pages))

        t = threading.Thread(target=storm)
        t.start()
        t.join(30)
        assert not t.is_alive(), "the export held the KV-cache manager's lock while it copied"
        assert [holder.pool.cached_page(h) for h in hashes] == pages == device  # not evicted
        return holder.page_io.device.gather(device)

    n, data = holder.kv_cache.export(hashes, read)
    assert n == 16 and len(taken) == holder.pool.num_pages - 16
    assert torch.equal(data.view(torch.uint8).reshape(-1), torch.from_numpy(before.data))
    holder.pool.free(taken)
    assert holder.pool.num_free_pages == holder.pool.num_pages  # the export's references are gone

    def broken(device, host, order):
        raise RuntimeError("the copy failed")

    with pytest.raises(RuntimeError, match="copy failed"):
        holder.kv_cache.export(hashes, broken)
    assert holder.pool.num_free_pages == holder.pool.num_pages


def test_the_cost_model_fits_a_fixed_latency_beside_the_bandwidth():
    latency, bw = 0.004, 1e9  # 4 ms a pull, 1 GB/s
    model = PullCostModel(0.0005, 5e8)
    for size in (1e6, 8e6, 2e6, 16e6, 4e6, 1e6, 12e6):
        model.observe(int(size), latency + size / bw)
    assert model.latency_s == pytest.approx(latency, rel=1e-3) and model.bandwidth == pytest.approx(bw, rel=1e-3)
    page_bytes, page_size, prefill = 200_000, 16, 8000.0  # a page: 0.2 ms to move, 2 ms to compute
    assert not model.worth(1, page_bytes, page_size, prefill)  # 4.2 ms against 2 ms
    assert not model.worth(2, page_bytes, page_size, prefill)  # 4.4 against 4
    assert model.worth(3, page_bytes, page_size, prefill)  # 4.6 against 6
    assert model.worth(100, page_bytes, page_size, prefill)
    # without the latency term (the old model) a single page looked worth it
    assert PullCostModel(0.0, bw).worth(1, page_bytes, page_size, prefill)


def test_the_cost_model_keeps_a_measured_latency_while_pulls_are_all_one_size():
    model = PullCostModel(0.010, 1e8)
    model.observe_latency(0.003)  # an empty call: the fixed part
    assert model.latency_s == 0.003
    for _ in range(5):
        model.observe(4_000_000, 0.003 + 4e6 / 2e9)
    assert model.latency_s == pytest.approx(0.003) and model.bandwidth == pytest.approx(2e9, rel=0.2)
    model.observe(4_000_000, 0.001)  # faster than the latency alone: the latency comes down
    assert model.latency_s < 0.003


async def test_a_pull_too_small_to_pay_for_its_latency_is_not_attempted_nor_located(make_engine):
    _holder, puller, request, transport = await setup(make_engine)
    asked = []

    async def locate(hashes):
        asked.append(len(hashes))
        return {"A": 16}

    # 16 pages of 4 tokens at 1000 tokens/s: 64 ms to compute; a 1 s round trip cannot pay
    slow_start = FAST.model_copy(update={"assumed_latency_ms": 1000.0, "assumed_prefill_tokens_s": 1000.0})
    p = KVPuller(puller, transport, locate, slow_start)
    assert await p.prepare(request) == 0
    assert p.stats.fallbacks["not_worth"] == 1 and not asked and transport.calls == 0


async def test_room_for_pulled_pages_is_made_while_they_travel_and_unused_room_is_given_back(make_engine):
    holder, puller, request, _ = await setup(make_engine)
    free = puller.pool.num_free_pages
    seen = []

    class Watching(InProcess):
        async def fetch(self, replica_id, hashes, timeout_s):
            payload = await super().fetch(replica_id, hashes, timeout_s)
            # the pages "travel" until the room for them is made (on the reserving thread)
            for _ in range(int(scaled(10) / 0.01)):
                if puller.pool.num_free_pages == free - 16:
                    break
                await asyncio.sleep(0.01)
            seen.append(puller.pool.num_free_pages)
            return payload

    p = KVPuller(puller, Watching({"A": holder}), located({"A": 16}), FAST)
    assert await p.prepare(request) == 16
    assert seen == [free - 16]  # reserved before the payload arrived
    assert puller.pool.num_free_pages == free  # inserted as unreferenced cached pages
    assert p.stats.phase_s["reserve"] > 0
    # a reservation the insert cannot fill (the puller computed half the pages meanwhile): the
    # rest goes back, and the pages cached meanwhile are kept, not overwritten
    other = make_engine(replica_id="C")
    hashes = list(request.page_hashes)
    reservation = other.reserve_pages(hashes, 0)
    assert len(reservation.pages) == 16 and other.pool.num_free_pages == other.pool.num_pages - 16
    half = [*ids(64, seed=11)[:32], 3]
    await other.complete(GenerateRequest(half, GREEDY))
    payload = await holder.export_pages(hashes)
    assert await other.insert_pages(payload, hashes, 0, reservation=reservation) == 8
    assert other.pool.num_free_pages == other.pool.num_pages and other.kv_cache.held_run(hashes) == 16
    ref = await holder.complete(dataclasses.replace(request, request_id="ref"))
    out = await other.complete(dataclasses.replace(request, request_id="c"))
    assert out.num_cached_prompt_tokens == 64 and out.token_ids == ref.token_ids
    # released unused (a failed pull): every page back, nothing cached from it
    again = other.reserve_pages([h ^ 7 for h in hashes], 0)
    other.release_pages(again)
    other.release_pages(again)  # idempotent
    assert other.pool.num_free_pages == other.pool.num_pages


async def test_an_exports_buffer_is_reused_only_once_the_payload_that_had_it_is_gone(make_engine):
    holder = make_engine(replica_id="A")
    prompt = [*ids(64, seed=11), 3]
    await holder.complete(GenerateRequest(prompt, GREEDY))
    hashes = page_hashes(prompt, 4, holder.model_id)
    first = holder.page_io.export(hashes)
    want, at = bytes(first.data), first.data.ctypes.data
    second = holder.page_io.export(hashes[:8])  # the first payload is still held: a buffer of its own
    assert not np.shares_memory(first.data, second.data) and bytes(first.data) == want
    whole = torch.from_numpy(first.data.copy())
    lay = holder.page_io.layout
    pages = whole.view(lay.num_layers, 2, 16, -1)[:, :, :8].contiguous().view(-1)
    assert bytes(second.data) == pages.numpy().tobytes()
    del first
    gc.collect()
    third = holder.page_io.export(hashes)  # the first's buffer, free again
    assert third.data.ctypes.data == at and bytes(third.data) == want


async def test_an_insert_around_pages_cached_here_writes_each_run_of_the_payload_in_place(make_engine):
    holder, puller, request, _ = await setup(make_engine)
    hashes = list(request.page_hashes)
    # pages 4..7 cached here already (an earlier, partial insert): the payload's pages 0..3 and
    # 8..15 go in, as two runs read in place from the payload's buffer, and 4..7 are kept
    middle = await holder.export_pages(hashes[4:8])
    assert middle.num_pages == 4 and await puller.insert_pages(middle, hashes, 4) == 4
    kept = [puller.pool.cached_page(h) for h in hashes[4:8]]
    payload = await holder.export_pages(hashes)
    assert await puller.insert_pages(payload, hashes, 0) == 12
    assert [puller.pool.cached_page(h) for h in hashes[4:8]] == kept
    pages = [puller.pool.cached_page(h) for h in hashes]
    device = puller.page_io.device
    sent = torch.from_numpy(payload.data.copy()).view(device.k[0].dtype)
    assert torch.equal(device.gather(pages), sent.view(len(device.k), 2, 16, *device.k[0].shape[1:]))
    assert puller.pool.num_free_pages == puller.pool.num_pages
    ref = await holder.complete(dataclasses.replace(request, request_id="ref"))
    out = await puller.complete(dataclasses.replace(request, request_id="out"))
    assert out.num_cached_prompt_tokens == 64 and out.token_ids == ref.token_ids


async def test_a_pull_cancelled_while_the_pages_travel_gives_its_room_back(make_engine):
    holder, puller, request, _ = await setup(make_engine)
    free = puller.pool.num_free_pages

    class Stuck(InProcess):
        async def fetch(self, replica_id, hashes, timeout_s):
            await asyncio.sleep(3600)

    async def until(cond):
        for _ in range(int(scaled(10) / 0.01)):
            if cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    p = KVPuller(puller, Stuck({"A": holder}), located({"A": 16}), FAST)
    # cancelled once the room is made (on the reserving thread): given back at once
    task = asyncio.ensure_future(p.prepare(request))
    await until(lambda: puller.pool.num_free_pages == free - 16)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert puller.pool.num_free_pages == free
    # cancelled before the room is made (the reserving thread waits for the KV-cache lock):
    # given back once it is made
    with puller.kv_cache.lock:
        task = asyncio.ensure_future(p.prepare(dataclasses.replace(request, request_id="again")))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: puller.pool.num_free_pages == free)
    p.close()
    assert puller.pool.num_free_pages == free


async def test_a_request_waits_while_pages_are_reserved_for_a_pull_in_flight(make_engine):
    engine = make_engine(replica_id="B", num_pages=24, max_model_len=96)
    prompt = [*ids(64, seed=3), 3]  # 17 pages and more for its tokens: more than the pool has free
    reservation = engine.reserve_pages(page_hashes(ids(64, seed=4), 4, engine.model_id), 0)
    assert len(reservation.pages) == 16 and engine.kv_cache.num_reservations == 1
    # given back from the reserving thread a moment later (a pull that failed): the request is
    # then admitted, instead of the engine stopping for want of pages while nothing runs
    threading.Timer(0.2, engine.release_pages, (reservation,)).start()
    out = await asyncio.wait_for(engine.complete(GenerateRequest(prompt, GREEDY)), scaled(30))
    assert len(out.token_ids) == GREEDY.max_tokens and engine.kv_cache.num_reservations == 0
