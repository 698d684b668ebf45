"""The host-memory tier under the KV-cache manager, on small CPU tensors: what is copied where,
the host LRU, pins during a restore, and that neither pool keeps a reference afterwards."""

import pytest
import torch

from kvstore.page_pool import KVTier, PagePool
from workers.kv_cache_manager import KVCacheManager, PageLocation
from workers.kv_tiers import MAX_STORES_IN_FLIGHT, HostTier
from workers.request import SamplingParams
from workers.runner.kv_pages import KVPages, copy_pages
from workers.sequence import Sequence

PS = 2


def setup(device_pages=6, host_pages=4):
    k = [torch.zeros(device_pages, PS, 1, 2) for _ in range(2)]
    v = [torch.zeros(device_pages, PS, 1, 2) for _ in range(2)]
    device = KVPages(k, v)
    host = HostTier(device, host_pages, PS, "r")
    kv = KVCacheManager(PagePool(device_pages, PS, replica_id="r"), "m", host)
    return device, host, kv


def run(kv, device, tokens, rid):
    """Admit, 'compute' (write each page's KV as its first token id), commit and free a sequence."""
    seq = Sequence(rid, tokens, SamplingParams())
    n = (len(tokens) - 1) // PS
    hit = kv.lookup(seq, n)
    assert kv.allocate(seq, len(tokens), hit)
    for i in range(hit.num_pages, len(seq.block_table)):
        for t in device.k + device.v:
            t[seq.block_table[i]] = float(tokens[i * PS])
    kv.commit(seq, len(tokens))
    pages = list(seq.block_table)
    kv.free(seq)
    return hit, pages


def test_evicted_pages_go_to_host_and_come_back_with_their_kv():
    device, host, kv = setup()
    a = [10, 11, 12, 13, 14, 15, 9]  # 3 full pages
    run(kv, device, a, "a")
    run(kv, device, [20, 21, 22, 23, 24, 25, 9], "b")  # 6 pages in all: a's pages are evicted
    run(kv, device, [30, 31, 32, 33, 9], "c")
    assert host.stats().num_stored_pages >= 3
    hit, pages = run(kv, device, a, "a2")
    assert hit.locations == [PageLocation.HOST] * 3
    assert [device.k[0][p, 0, 0, 0].item() for p in pages[:3]] == [10.0, 12.0, 14.0]
    assert host.stats().num_restored_pages == 3
    again, _ = run(kv, device, a, "a3")
    assert again.locations == [PageLocation.GPU] * 3  # cached on the device again
    assert all(rc == 0 for rc in host.pool.ref_counts) and all(rc == 0 for rc in kv.pool.ref_counts)
    events = host.take_events()
    assert events and all(e.tier is KVTier.HOST for e in events)


def test_a_mixed_hit_restores_its_host_pages_pinned_against_host_eviction():
    device, host, kv = setup(device_pages=4, host_pages=1)
    run(kv, device, [1, 2, 3, 4, 9], "a")  # 2 full pages + 1
    run(kv, device, [5, 6, 7, 8, 9], "b")  # evicts a's tail page (released first) into the 1 host page
    seq = Sequence("a2", [1, 2, 3, 4, 9], SamplingParams())
    hit = kv.lookup(seq, 2)
    assert hit.locations == [PageLocation.GPU, PageLocation.HOST]
    stored = host.stats().num_stored_pages
    # the allocation evicts b's pages; the host tier's only page is a's, pinned: b's are not stored
    assert kv.allocate(seq, 5, hit)
    assert host.stats().num_stored_pages == stored
    assert [device.k[0][p, 0, 0, 0].item() for p in seq.block_table[:2]] == [1.0, 3.0]
    assert host.lookup(kv.hashes(seq, 2)[1]) is not None
    kv.free(seq)
    assert all(rc == 0 for rc in host.pool.ref_counts) and all(rc == 0 for rc in kv.pool.ref_counts)


def test_host_pages_predicted_slower_to_restore_than_to_compute_are_computed():
    device, host, kv = setup()
    a = [10, 11, 12, 13, 14, 15, 9]
    run(kv, device, a, "a")
    run(kv, device, [20, 21, 22, 23, 24, 25, 9], "b")  # a's pages go to the host tier
    run(kv, device, [30, 31, 32, 33, 9], "c")
    asked = []
    kv.restore_worth = lambda n: asked.append(n) or False
    hit, pages = run(kv, device, a, "a2")
    assert asked == [3] and hit.num_pages == 0  # computed, as without a tier
    assert host.stats().num_restored_pages == 0 and host.stats().num_skipped_restores == 1
    assert [device.k[0][p, 0, 0, 0].item() for p in pages[:3]] == [10.0, 12.0, 14.0]
    assert all(rc == 0 for rc in host.pool.ref_counts) and all(rc == 0 for rc in kv.pool.ref_counts)


def test_the_restore_rate_is_measured_and_predicts_a_restores_time():
    device, host, kv = setup()
    assert host.restore_s(4) is None  # nothing measured: the engine restores
    a = [10, 11, 12, 13, 14, 15, 9]
    run(kv, device, a, "a")
    run(kv, device, [20, 21, 22, 23, 24, 25, 9], "b")
    run(kv, device, [30, 31, 32, 33, 9], "c")
    run(kv, device, a, "a2")  # restores 3 pages
    assert host.restore_s(4) > 0 and host.restore_s(8) == pytest.approx(2 * host.restore_s(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_restore_to_cuda_is_asynchronous_and_the_next_reader_waits_for_it():
    shape = (3, 2, 64, 16, 2, 64)
    dev = KVPages.of(torch.zeros(shape, device="cuda"))
    hst = KVPages.host(dev, 64)
    assert hst.stacked.is_pinned()
    hst.stacked.copy_(torch.randn(shape))
    slots, pages = list(range(0, 64, 2)), list(range(32))
    want = hst.stacked[:, :, slots].clone()
    copy_pages(hst, slots, dev, pages)  # queued on the write stream
    hst.stacked.zero_()  # the host pages were read when the call returned
    dev.wait_written()  # this stream now waits for the copy, on the GPU
    assert torch.equal(dev.stacked[:, :, :32].cpu(), want)
    dev.stacked.zero_()
    copy_pages(hst, slots, dev, pages)  # the staging buffer again: zeros now
    dev.wait_written()
    assert not dev.stacked.any()


def cuda_setup(device_pages=6, host_pages=8):
    dev = KVPages.of(torch.zeros((2, 2, device_pages, PS, 1, 2), device="cuda"))
    host = HostTier(dev, host_pages, PS, "r")
    return dev, host, KVCacheManager(PagePool(device_pages, PS, replica_id="r"), "m", host)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_store_from_cuda_runs_beside_the_steps_and_its_pages_come_back_intact():
    device, host, kv = cuda_setup()
    a = [10, 11, 12, 13, 14, 15, 9]
    run(kv, device, a, "a")
    # b's pages are a's, reused at once: written on the step's stream right after a's were gathered
    run(kv, device, [20, 21, 22, 23, 24, 25, 9], "b")
    run(kv, device, [30, 31, 32, 33, 9], "c")
    with kv.lock:
        host.drain()
    assert host.num_stores_in_flight == 0 and host.stats().num_stored_pages >= 3
    hit, pages = run(kv, device, a, "a2")
    assert hit.locations == [PageLocation.HOST] * 3
    assert [device.k[0][p, 0, 0, 0].item() for p in pages[:3]] == [10.0, 12.0, 14.0]
    assert all(rc == 0 for rc in host.pool.ref_counts) and all(rc == 0 for rc in kv.pool.ref_counts)
    host.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_page_evicted_again_while_its_store_travels_is_stored_once():
    from kvstore.hashing import page_hashes

    device, host, kv = cuda_setup(host_pages=8)
    hashes = page_hashes(list(range(8)), PS, "m", None)
    device.stacked[:, :, :4] = torch.arange(4, device="cuda", dtype=torch.float32).view(1, 1, 4, 1, 1, 1)
    with kv.lock:
        for _ in range(MAX_STORES_IN_FLIGHT + 2):  # beyond the cap: a store waits for the oldest
            host.store([0, 1, 2, 3], hashes)
        host.drain()
    assert host.stats().num_stored_pages == 4 and host.pool.num_cached_pages == 4
    slots = [host.lookup(h) for h in hashes]
    assert [host.host.stacked[0, 0, s, 0, 0, 0].item() for s in slots] == [0.0, 1.0, 2.0, 3.0]
    host.close()
