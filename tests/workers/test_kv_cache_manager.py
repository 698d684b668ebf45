"""The KV-cache manager alone: a sequence's pages over a small page pool."""

from kvstore.hashing import page_hashes
from kvstore.page_pool import PagePool
from workers.kv_cache_manager import KVCacheManager, PageLocation, cdiv
from workers.request import SamplingParams
from workers.sequence import Sequence

PS = 4


def make(num_pages=8):
    return KVCacheManager(PagePool(num_pages, PS), "m")


def seq(rid, tokens, hashes=None):
    return Sequence(rid, list(tokens), SamplingParams(), hashes)


def test_cdiv_counts_the_pages_that_hold_n_tokens():
    assert [cdiv(n, PS) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_is_all_or_nothing():
    kv = make(num_pages=3)
    a = seq("a", range(9))
    assert kv.allocate(a, 9) and len(a.block_table) == 3
    b = seq("b", range(5))
    assert not kv.allocate(b, 5)
    assert b.block_table == [] and kv.num_free_pages == 0
    kv.free(a)
    assert a.block_table == [] and kv.num_free_pages == 3


def test_committed_pages_are_found_by_the_next_sequence_and_shared():
    kv = make()
    a = seq("a", range(10))
    kv.allocate(a, 10)
    kv.commit(a, 10)  # two full pages
    assert a.num_committed_pages == 2
    b = seq("b", [*range(8), 99, 98, 97])
    hit = kv.lookup(b, (b.num_tokens - 1) // PS)
    assert hit.locations == [PageLocation.GPU] * 2 and hit.gpu_pages == a.block_table[:2]
    assert kv.allocate(b, b.num_tokens, hit)
    assert b.block_table[:2] == a.block_table[:2] and b.num_committed_pages == 2
    assert kv.pool.ref_counts[b.block_table[0]] == 2
    kv.free(a)
    kv.free(b)
    assert kv.num_free_pages == kv.pool.num_pages


def test_trim_gives_back_the_pages_past_the_kept_tokens():
    kv = make()
    a = seq("a", range(6))
    kv.allocate(a, 6 + 5)  # 6 tokens and 5 drafts: 3 pages
    kv.trim(a, 7)  # one draft accepted
    assert len(a.block_table) == 2 and kv.num_free_pages == kv.pool.num_pages - 2


def test_hashes_the_request_carries_are_used_and_extended_as_tokens_come():
    kv = make()
    tokens = list(range(9))
    carried = page_hashes(tokens, PS, "m")
    a = seq("a", tokens, hashes=[*carried])
    assert kv.hashes(a, 2) == carried
    a.token_ids += [50, 51, 52]
    assert kv.hashes(a, 3) == page_hashes(a.token_ids, PS, "m")
