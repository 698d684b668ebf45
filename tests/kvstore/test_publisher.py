"""The publisher thread against a real server: events reach the index in order, the queue is
bounded, heartbeats carry load, and a dead or hung Redis never blocks or raises into the engine."""

from __future__ import annotations

import time

import pytest

from kvstore.hashing import page_hashes
from kvstore.index import ReplicaLoad
from kvstore.page_pool import KVEvent, KVEventKind, PagePool
from kvstore.publisher import Publisher
from kvstore.redis_server import LocalRedisServer
from tests.conftest import scaled

PAGE = 4
FAST = dict(heartbeat_interval_s=0.05, heartbeat_ttl_s=1.0, retry_after_s=0.05, publish_timeout_ms=1000)


def stored(replica: str, *hashes: int) -> KVEvent:
    return KVEvent(KVEventKind.STORED, hashes, replica)


@pytest.fixture
def publishers():
    started = []

    def start(index, replica_id, load_fn=None) -> Publisher:
        pub = Publisher(index, replica_id, load_fn).start()
        started.append(pub)
        return pub

    yield start
    for pub in started:
        pub.close()


def test_pool_events_reach_the_index_including_evictions(make_index, publishers):
    index = make_index(**FAST)
    pool = PagePool(6, PAGE, replica_id="a")
    pub = publishers(index, "a")
    first = page_hashes(list(range(24)), PAGE, "m")
    pages = pool.allocate(6)
    pool.commit(pages, first)
    pool.free(pages)
    pub.submit(pool.take_events())
    assert pub.flush(scaled(2.0))
    assert index.lookup(first, ["a"]) == {"a": 6}

    pool.free(pool.allocate(2))  # evicts the two tail pages of `first`
    pub.submit(pool.take_events())
    assert pub.flush(scaled(2.0))
    assert index.lookup(first, ["a"]) == {"a": 4}
    assert pub.metrics.published_pages == 8 and pub.metrics.dropped_events == 0


def test_a_full_queue_drops_the_oldest_events_and_counts_them(make_index):
    index = make_index(max_queued_pages=10, **FAST)
    pub = Publisher(index, "a")  # not started: nothing drains the queue
    for base in (0, 10, 20, 30):
        pub.submit([stored("a", *range(base + 1, base + 5))])  # 4 pages each
    assert (pub.metrics.dropped_events, pub.metrics.dropped_pages) == (2, 8)
    pub.start()
    try:
        assert pub.flush(scaled(2.0))
        assert index.lookup([1], ["a"]) == {"a": 0} and index.lookup([11], ["a"]) == {"a": 0}
        assert index.lookup([21, 22, 23, 24, 31, 32, 33, 34], ["a"]) == {"a": 8}
    finally:
        pub.close()


def test_large_events_are_split_into_batches_and_applied_in_order(make_index, publishers):
    index = make_index(max_batch_pages=16, lookup_mode="exact", **FAST)  # exact: page 51's hole ends the run
    pub = publishers(index, "a")
    prompt = tuple(range(1, 101))
    pub.submit([stored("a", *prompt), KVEvent(KVEventKind.REMOVED, (51,), "a"), stored("a", 200)])
    assert pub.flush(scaled(2.0))
    assert index.lookup(prompt, ["a"]) == {"a": 50}
    assert pub.metrics.published_pages == 102 and pub.metrics.published_events == 9  # 7 parts + 2


def test_heartbeat_reports_the_load_that_load_fn_returns(make_index, publishers):
    index = make_index(**FAST)
    load = ReplicaLoad(num_waiting=3, num_running=4, num_free_pages=50, num_total_pages=64)
    publishers(index, "a", lambda: load)
    deadline = time.monotonic() + 2
    while "a" not in index.lookup_with_load([], ["a"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert index.lookup_with_load([], ["a"])["a"].load == load
    load = ReplicaLoad(num_waiting=0, num_running=1, num_free_pages=60, num_total_pages=64)
    time.sleep(0.2)  # a few heartbeat intervals
    assert index.lookup_with_load([], ["a"])["a"].load == load


def test_start_clears_what_an_earlier_life_of_the_replica_left(make_index, publishers):
    index = make_index(**FAST)
    index.heartbeat("a", ReplicaLoad())
    index.publish([stored("a", 1, 2, 3)])
    assert index.lookup([1, 2, 3], ["a"]) == {"a": 3}
    pub = publishers(index, "a")
    assert pub.flush(scaled(2.0))
    assert index.lookup([1, 2, 3], ["a"]) == {"a": 0}
    assert "a" in index.lookup_with_load([1], ["a"])  # alive, holding nothing


def test_close_withdraws_the_heartbeat_at_once(make_index):
    index = make_index(**FAST)
    pub = Publisher(index, "a").start()
    pub.submit([stored("a", 1, 2)])
    assert pub.flush(scaled(2.0))
    assert index.lookup([1, 2], ["a"]) == {"a": 2}
    pub.close()
    assert index.lookup([1, 2], ["a"]) == {"a": 0}
    assert index.lookup_with_load([1, 2], ["a"]) == {}


def test_submit_rejects_events_of_another_replica(make_index):
    pub = Publisher(make_index(), "a")
    with pytest.raises(ValueError, match="replica 'b'"):
        pub.submit([stored("b", 1)])


def wait_until(cond, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + scaled(timeout_s)
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_publishing_neither_blocks_nor_raises_while_redis_is_dead_and_refills_after_restart(make_index, publishers):
    with LocalRedisServer() as server:
        index = make_index(server=server, **FAST)
        pub = publishers(index, "a")
        pub.submit([stored("a", 1, 2)])
        assert pub.flush(scaled(2.0))
        assert index.lookup([1, 2], ["a"]) == {"a": 2}

        server.kill()
        worst = 0.0
        for i in range(200):
            start = time.perf_counter()
            pub.submit([stored("a", 1000 + i)])
            worst = max(worst, time.perf_counter() - start)
            time.sleep(0.001)
        assert worst < min(scaled(0.02), 0.5)  # a write blocked on Redis would take publish_timeout_ms (1 s)
        assert wait_until(lambda: pub.metrics.dropped_events > 0 and pub.metrics.publish_errors > 0)

        server.start()  # same port, empty
        assert wait_until(lambda: "a" in index.lookup_with_load([], ["a"]))  # heartbeats resumed
        pub.submit([stored("a", 7, 8, 9)])
        assert pub.flush(scaled(2.0))
        assert wait_until(lambda: index.lookup([7, 8, 9], ["a"]) == {"a": 3})
        # The index forgot; the publisher saw its heartbeat gone and wrote back everything the replica
        # holds, the pages stored before the crash and those whose events were dropped meanwhile.
        assert wait_until(lambda: index.lookup([1, 2], ["a"]) == {"a": 2})
        assert index.lookup([1000, 1001], ["a"]) == {"a": 2} and pub.metrics.resyncs >= 1


def test_after_redis_loses_its_data_the_replica_republishes_what_its_cache_holds_not_what_it_evicted(
    make_index, publishers
):
    with LocalRedisServer() as server:
        index = make_index(server=server, **FAST)
        pool = PagePool(6, PAGE, replica_id="a")
        pub = publishers(index, "a")
        first = page_hashes(list(range(24)), PAGE, "m")
        pages = pool.allocate(6)
        pool.commit(pages, first)
        pool.free(pages)
        pool.free(pool.allocate(2))  # evicts the two tail pages of `first`
        pub.submit(pool.take_events())
        assert pub.flush(scaled(2.0))
        assert index.lookup(first, ["a"]) == {"a": 4}

        server.kill()
        server.start()  # same port, empty, back before the publisher noticed anything
        assert wait_until(lambda: index.lookup(first, ["a"]) == {"a": 4}, timeout_s=10)
        assert pub.metrics.resyncs >= 1  # more if a loaded machine delayed a heartbeat past its TTL
        assert index.lookup(first[4:], ["a"]) == {"a": 0}  # evicted pages stay forgotten


def test_submit_stays_fast_while_redis_hangs(make_index, publishers):
    with LocalRedisServer() as server:
        index = make_index(server=server, **FAST)
        pub = publishers(index, "a")
        assert pub.flush(scaled(2.0))
        server.pause()
        try:
            worst = 0.0
            for i in range(100):
                start = time.perf_counter()
                pub.submit([stored("a", i + 1)])
                worst = max(worst, time.perf_counter() - start)
                time.sleep(0.002)
            assert worst < min(scaled(0.02), 0.5)  # a write blocked on Redis would take publish_timeout_ms (1 s)
            assert wait_until(lambda: pub.metrics.publish_errors > 0)
        finally:
            server.resume()
        pub.submit([stored("a", 500)])
        assert wait_until(lambda: index.lookup([500], ["a"]) == {"a": 1})


def test_a_resync_republishes_each_tier_under_its_own_key(make_index, publishers):
    from kvstore.page_pool import KVTier

    with LocalRedisServer() as server:
        index = make_index(server=server, **FAST)
        pub = publishers(index, "a")
        hashes = page_hashes(list(range(24)), PAGE, "m")
        pub.submit([stored("a", *hashes[:2]), KVEvent(KVEventKind.STORED, tuple(hashes[2:5]), "a", KVTier.HOST)])
        assert pub.flush(scaled(2.0))

        def tiers():
            m = index.lookup_with_load(hashes, ["a"], with_tiers=True).get("a")
            return m and (m.matched_pages, m.host_pages)

        assert tiers() == (2, 3)
        server.kill()
        server.start()
        assert wait_until(lambda: tiers() == (2, 3), timeout_s=10)
