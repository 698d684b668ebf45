import pytest

from kvstore.page_pool import KVEventKind, NoFreePagesError, PagePool


def test_allocate_and_free_restore_the_free_count():
    pool = PagePool(8, 4)
    pages = pool.allocate(5)
    assert len(set(pages)) == 5 and pool.num_free_pages == 3
    pool.free(pages)
    assert pool.num_free_pages == 8


def test_allocate_more_than_free_raises():
    pool = PagePool(2, 4)
    with pytest.raises(NoFreePagesError):
        pool.allocate(3)


def test_committed_pages_are_found_by_prefix_lookup_and_shared():
    pool = PagePool(8, 4)
    pages = pool.allocate(3)
    pool.commit(pages, [11, 12, 13])
    pool.free(pages)
    assert pool.lookup_prefix([11, 12, 99, 13]) == pages[:2]  # leading run only
    hit = pool.lookup_prefix([11, 12])
    assert pool.num_pages_to_acquire(hit) == 2
    pool.acquire(hit)
    pool.acquire(hit)  # a second sequence shares them
    assert [pool.ref_counts[p] for p in hit] == [2, 2]
    assert pool.num_pages_to_acquire(hit) == 0
    pool.free(hit)
    pool.free(hit)
    assert pool.num_free_pages == 8


def test_eviction_takes_uncached_pages_first_then_least_recently_freed():
    pool = PagePool(4, 4)
    old, new, plain = pool.allocate(1), pool.allocate(1), pool.allocate(1)
    pool.commit(old, [1])
    pool.commit(new, [2])
    pool.free(old)
    pool.free(new)
    pool.free(plain)
    pool.take_events()
    got = pool.allocate(2)
    # the never-cached spare page and the uncached freed page go first
    assert set(got) == {plain[0], 3}
    assert pool.lookup_prefix([1]) == old and pool.lookup_prefix([2]) == new
    got = pool.allocate(1)
    assert got == old  # least recently freed cached page is evicted first
    assert pool.lookup_prefix([1]) == [] and pool.lookup_prefix([2]) == new
    assert [(e.kind, e.hashes) for e in pool.take_events()] == [(KVEventKind.REMOVED, (1,))]


def test_a_sequence_tail_is_evicted_before_its_head():
    pool = PagePool(3, 4)
    pages = pool.allocate(3)
    pool.commit(pages, [1, 2, 3])
    pool.free(pages)
    assert pool.allocate(1) == [pages[2]]


def test_events_report_stores_and_removals_in_order():
    pool = PagePool(2, 4, replica_id="r1")
    a = pool.allocate(2)
    pool.commit(a, [7, 8])
    pool.free(a)
    pool.allocate(2)
    events = pool.take_events()
    assert [(e.kind, e.hashes, e.replica_id) for e in events] == [
        (KVEventKind.STORED, (7, 8), "r1"),
        (KVEventKind.REMOVED, (8, 7), "r1"),
    ]
    assert pool.take_events() == []


def test_prefix_hits_emit_touched_events():
    pool = PagePool(4, 4, replica_id="r1")
    a = pool.allocate(2)
    pool.commit(a, [7, 8])
    pool.free(a)
    pool.take_events()
    pool.acquire(pool.lookup_prefix([7, 8]))
    assert [(e.kind, e.hashes) for e in pool.take_events()] == [(KVEventKind.TOUCHED, (7, 8))]


def test_committing_a_duplicate_hash_swaps_in_the_cached_page():
    pool = PagePool(4, 4)
    a, b = pool.allocate(1), pool.allocate(1)
    copy = b[0]
    pool.commit(a, [5])
    pool.commit(b, [5])
    assert b == a and pool.ref_counts[a[0]] == 2  # the second holder now shares the cached page
    assert pool.ref_counts[copy] == 0 and pool.page_hash[copy] is None
    assert pool.num_free_pages == 3
    pool.free(a)
    pool.free(b)
    assert pool.num_free_pages == 4 and pool.lookup_prefix([5]) == a


def test_prefix_caching_off_caches_nothing():
    pool = PagePool(4, 4, enable_prefix_caching=False)
    a = pool.allocate(1)
    pool.commit(a, [5])
    pool.free(a)
    assert pool.lookup_prefix([5]) == [] and pool.take_events() == []


def test_reset_prefix_cache_forgets_only_unreferenced_pages():
    pool = PagePool(4, 4)
    held, idle = pool.allocate(1), pool.allocate(1)
    pool.commit(held + idle, [1, 2])
    pool.free(idle)
    pool.take_events()
    pool.reset_prefix_cache()
    assert pool.lookup_prefix([1]) == held and pool.lookup_prefix([2]) == []
    assert [e.hashes for e in pool.take_events()] == [(2,)]


def test_double_free_is_caught():
    pool = PagePool(2, 4)
    a = pool.allocate(1)
    pool.free(a)
    with pytest.raises(AssertionError):
        pool.free(a)
