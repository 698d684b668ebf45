"""The Redis page index against a real server on loopback: leading-run counts in both lookup
modes (and where search mode over-reports), TTLs, liveness, clearing, and what lookups do when
the server dies or hangs."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from pydantic import ValidationError

from kvstore.hashing import hash_to_str, page_hashes
from kvstore.index import AsyncPageIndex, IndexConfig, ReplicaLoad, decode_member, encode_hashes
from kvstore.page_pool import KVEvent, KVEventKind, PagePool
from kvstore.redis_server import LocalRedisServer
from tests.conftest import scaled

PAGE = 4
MODEL = "m"


def serve(pool: PagePool, tokens: list[int]) -> list[int]:
    """Run one prompt through the pool as the scheduler would (reuse the cached prefix, compute
    and commit the rest, finish); returns the prompt's page hashes."""
    hashes = page_hashes(tokens, PAGE, MODEL)
    hit = pool.lookup_prefix(hashes)
    pool.acquire(hit)
    fresh = pool.allocate(len(hashes) - len(hit))
    pool.commit(fresh, hashes[len(hit) :])
    pool.free(hit + fresh)
    return hashes


@pytest.fixture
def big_redis():
    with LocalRedisServer() as server:
        yield server


def test_lookup_counts_leading_pages_of_shared_and_diverging_prompts_from_two_replicas(make_index):
    index = make_index()
    a, b = PagePool(64, PAGE, replica_id="a"), PagePool(64, PAGE, replica_id="b")
    system = list(range(100, 124))  # 6 pages shared by both prompts
    p1 = serve(a, [*system, *range(1, 17)])  # 10 pages on a
    p2 = serve(b, [*system, *range(50, 58)])  # 8 pages on b, diverging after page 6
    serve(b, list(range(500, 540)))  # unrelated pages on b
    for pool in (a, b):
        index.heartbeat(pool.replica_id, ReplicaLoad())
        index.publish(pool.take_events())

    assert index.lookup(p1, ["a", "b"]) == {"a": 10, "b": 6}
    assert index.lookup(p2, ["a", "b"]) == {"a": 6, "b": 8}
    p3 = page_hashes([*system[:8], 999, *system[9:], *range(1, 17)], PAGE, MODEL)  # differs in page 2
    assert index.lookup(p3, ["a", "b"]) == {"a": 2, "b": 2}
    assert index.lookup(page_hashes(list(range(7, 47)), PAGE, MODEL), ["a", "b"]) == {"a": 0, "b": 0}
    assert index.metrics.lookups == 4 and index.metrics.hits == 3


def test_a_page_missing_in_the_middle_ends_the_leading_run_in_exact_mode(make_index):
    index = make_index(lookup_mode="exact")
    index.heartbeat("a", ReplicaLoad())
    index.publish([KVEvent(KVEventKind.STORED, (1, 2, 3, 4, 5), "a"), KVEvent(KVEventKind.REMOVED, (3,), "a")])
    assert index.lookup([1, 2, 3, 4, 5], ["a"]) == {"a": 2}
    assert index.lookup([2, 1, 4, 5], ["a"]) == {"a": 4}  # held pages in any order count
    index.publish([KVEvent(KVEventKind.STORED, (3,), "a")])
    assert index.lookup([1, 2, 3, 4, 5], ["a"]) == {"a": 5}


def test_pool_eviction_removes_pages_from_the_index(make_index):
    index = make_index()
    pool = PagePool(6, PAGE, replica_id="a")
    index.heartbeat("a", ReplicaLoad())
    first = serve(pool, list(range(24)))  # fills all 6 pages
    second = serve(pool, list(range(1000, 1008)))  # evicts 2 pages of `first`, LRU = its tail
    index.publish(pool.take_events())
    assert index.lookup(first, ["a"]) == {"a": 4}
    assert index.lookup(second, ["a"]) == {"a": 2}


@pytest.mark.parametrize("held", [0, 1, 7, 8, 9, 24, 25, 120, 1000, 2047, 2048])
def test_exact_mode_counts_long_prompts_exactly_across_scan_chunks(make_index, held):
    index = make_index(lookup_mode="exact")
    prompt = list(range(1, 2049))
    index.heartbeat("a", ReplicaLoad())
    index.publish([KVEvent(KVEventKind.STORED, tuple(prompt[:held]) + tuple(prompt[held + 1 :]), "a")])
    assert index.lookup(prompt, ["a"]) == {"a": held}


def test_search_mode_finds_every_run_length_of_short_prompts(make_index):
    """Every (prompt length, run length) up to 33 pages: both ends, powers of two and the pages
    either side of them, where galloping hands over to bisection."""
    index = make_index()
    prompt = list(range(1, 34))
    replicas = [f"r{held}" for held in range(len(prompt) + 1)]
    for held, r in enumerate(replicas):
        index.heartbeat(r, ReplicaLoad())
        index.publish([KVEvent(KVEventKind.STORED, (*prompt[:held], 5000 + held), r)])  # and a page of its own
    for n in range(len(prompt) + 1):
        assert index.lookup(prompt[:n], replicas) == {r: min(held, n) for held, r in enumerate(replicas)}, n


def test_search_mode_finds_long_runs_in_a_2048_page_prompt(make_index):
    index = make_index()
    prompt = list(range(1, 2049))
    runs = [0, 1, 2, 3, 511, 512, 513, 1000, 1023, 1024, 1025, 2046, 2047, 2048]
    replicas = [f"r{held}" for held in runs]
    for held, r in zip(runs, replicas, strict=True):
        index.heartbeat(r, ReplicaLoad())
        index.publish([KVEvent(KVEventKind.STORED, tuple(prompt[:held]), r)])
    assert index.lookup(prompt, replicas) == dict(zip(replicas, runs, strict=True))
    diverging = [*prompt[:700], *range(100_001, 101_349)]  # chained hashes: all differ after page 700
    assert index.lookup(diverging, replicas) == {r: min(held, 700) for held, r in zip(runs, replicas, strict=True)}


def test_search_mode_over_reports_past_a_hole_from_a_dropped_event_until_the_hole_is_stored_again(make_index):
    """Pins search mode's known error: entries that are not prefix-closed (here the publisher
    dropped the event of a middle chunk) make a probe past the hole hit. Exact mode is right."""
    exact, search = make_index(lookup_mode="exact"), make_index()  # same namespace and model: same keys
    prompt = list(range(1, 41))
    search.heartbeat("a", ReplicaLoad())
    # Chunked prefill stored pages 1-8, 9-15 and 16-40 (counting from 1 here); the second event
    # was dropped. No probe (pages 1, 2, 4, 8, 16, 32, 40) falls in the hole.
    search.publish([KVEvent(KVEventKind.STORED, tuple(prompt[:8]), "a")])
    search.publish([KVEvent(KVEventKind.STORED, tuple(prompt[15:]), "a")])
    assert exact.lookup(prompt, ["a"]) == {"a": 8}
    assert search.lookup(prompt, ["a"]) == {"a": 40}
    # A probe that lands in the hole bounds the error: the run ends at the hole, as it should.
    assert search.lookup(prompt[:12], ["a"]) == {"a": 8}
    # The next prefix hit touches the whole run the replica holds, which fills the hole.
    search.publish([KVEvent(KVEventKind.TOUCHED, tuple(prompt), "a")])
    assert exact.lookup(prompt, ["a"]) == search.lookup(prompt, ["a"]) == {"a": 40}


def test_a_recomputed_cached_page_leaves_no_hole_for_search_mode(make_index):
    """A fully cached, page-aligned prompt has its last page recomputed (the scheduler needs its
    logits); `commit` swaps the copy for the cached page, so the sequence keeps that page
    referenced, the pool cannot evict it under the sequence's later pages, and both modes agree."""
    exact, search = make_index(lookup_mode="exact"), make_index()
    pool = PagePool(10, PAGE, replica_id="a")
    search.heartbeat("a", ReplicaLoad())
    tokens = list(range(100, 132))  # 8 pages: a 5-page prompt and the 3 pages its answer fills
    hashes = page_hashes(tokens, PAGE, MODEL)
    serve(pool, tokens[:20])  # the 5-page prompt, cached on pages P0..P4, then freed
    hit = pool.lookup_prefix(hashes[:4])  # the same prompt again: pages 0-3 hit, page 4 is recomputed
    pool.acquire(hit)
    cached_page_4 = pool.lookup_prefix(hashes[:5])[4]
    fresh = pool.allocate(4)  # page 4's copy, then the decoded pages 5-7
    pool.commit(fresh, hashes[4:])
    assert fresh[0] == cached_page_4  # the copy was swapped for the cached page
    pool.allocate(pool.num_free_pages)  # another request takes every free page: nothing held is evicted
    search.publish(pool.take_events())
    assert pool.lookup_prefix(hashes) == hit + fresh
    assert exact.lookup(hashes, ["a"]) == {"a": 8}
    assert search.lookup(hashes, ["a"]) == {"a": 8}


def test_search_mode_over_reports_when_ancestors_expire_before_later_stored_pages(make_index):
    """Pins the other pool case (see kvstore.index): a `stored` event refreshes only the new pages,
    so pages cached later in a sequence's life outlive its earlier ones, and a hit on a shorter
    prefix refreshes only that prefix, leaving a hole of expired pages between two live runs."""
    now = [1_700_000_000_000]
    exact = make_index(lookup_mode="exact", ttl_s=100, clock=lambda: now[0])
    search = make_index(ttl_s=100, clock=lambda: now[0])
    pool = PagePool(64, PAGE, replica_id="a")
    search.heartbeat("a", ReplicaLoad())
    hashes = page_hashes(list(range(128)), PAGE, MODEL)  # 32 pages
    pages = pool.allocate(32)
    pool.commit(pages[:10], hashes[:10])  # the prompt's prefill, at t0
    search.publish(pool.take_events())
    now[0] += 50_000
    pool.commit(pages[10:], hashes[10:])  # the pages its decode filled, cached by t0 + 50 s
    search.publish(pool.take_events())
    now[0] += 10_000
    pool.acquire(pool.lookup_prefix(hashes[:9]))  # another request shares the first 9 pages
    search.publish(pool.take_events())
    now[0] += 40_001  # t0 + 100 s: page 9 (stored at t0) has expired; pages 0-8 and 10-31 live on
    assert exact.lookup(hashes, ["a"]) == {"a": 9}
    assert search.lookup(hashes, ["a"]) == {"a": 32}


def test_replica_without_heartbeat_counts_zero_and_is_left_out_of_the_load_answer(make_index):
    index = make_index()
    index.publish([KVEvent(KVEventKind.STORED, (1, 2, 3), "a"), KVEvent(KVEventKind.STORED, (1, 2, 3), "b")])
    index.heartbeat("a", ReplicaLoad(num_waiting=2, num_running=5, num_free_pages=70, num_total_pages=128))
    assert index.lookup([1, 2, 3], ["a", "b"]) == {"a": 3, "b": 0}
    answer = index.lookup_with_load([1, 2, 3], ["a", "b"])
    assert list(answer) == ["a"]
    assert answer["a"].matched_pages == 3
    assert answer["a"].load == ReplicaLoad(2, 5, 70, 128)


def test_lookup_with_no_live_candidate_is_all_zeros_not_empty(make_index):
    index = make_index()
    assert index.lookup([1, 2], ["x", "y"]) == {"x": 0, "y": 0}
    assert index.lookup_with_load([1, 2], ["x", "y"]) == {}
    assert index.lookup([1, 2], []) == {}
    assert index.lookup([], ["x"]) == {"x": 0}


def test_entries_expire_after_ttl_and_refreshed_entries_survive(make_index, redis_server):
    index = make_index(ttl_s=1.0, heartbeat_ttl_s=30, heartbeat_interval_s=10)
    index.heartbeat("a", ReplicaLoad())
    index.publish([KVEvent(KVEventKind.STORED, (1, 2, 3, 4), "a")])
    time.sleep(0.5)
    index.publish([KVEvent(KVEventKind.TOUCHED, (1, 2), "a")])
    assert index.lookup([1, 2, 3, 4], ["a"]) == {"a": 4}
    time.sleep(0.7)  # 1.2 s: pages 3, 4 expired, 1, 2 live until 1.5 s
    assert index.lookup([1, 2, 3, 4], ["a"]) == {"a": 2}
    client = redis.Redis.from_url(redis_server.url)
    pages_key = index.keys.pages("a")
    assert client.zcard(pages_key) == 4  # expired members stay until trimmed ...
    index.trim("a")
    assert sorted(decode_member(m) for m in client.zrange(pages_key, 0, -1)) == [1, 2]  # ... and then go
    time.sleep(0.5)  # 1.7 s: everything expired, and the key itself is gone
    assert index.lookup([1, 2], ["a"]) == {"a": 0}
    assert client.exists(pages_key) == 0


def test_replica_drops_out_of_lookups_within_the_heartbeat_ttl(make_index):
    index = make_index(heartbeat_interval_s=0.1, heartbeat_ttl_s=0.3)
    index.publish([KVEvent(KVEventKind.STORED, (1, 2), "a"), KVEvent(KVEventKind.STORED, (1, 2), "b")])
    index.heartbeat("a", ReplicaLoad())
    index.heartbeat("b", ReplicaLoad())
    assert index.lookup([1, 2], ["a", "b"]) == {"a": 2, "b": 2}
    time.sleep(0.2)
    index.heartbeat("a", ReplicaLoad())  # b stops heartbeating
    time.sleep(0.2)
    assert index.lookup([1, 2], ["a", "b"]) == {"a": 2, "b": 0}
    index.leave("a")  # a graceful exit drops out at once
    assert index.lookup([1, 2], ["a", "b"]) == {"a": 0, "b": 0}


def test_clear_forgets_a_replica_that_restarts_under_the_same_id(make_index):
    index = make_index()
    index.heartbeat("a", ReplicaLoad())
    index.publish([KVEvent(KVEventKind.STORED, (1, 2, 3), "a"), KVEvent(KVEventKind.STORED, (1, 2, 3), "b")])
    index.heartbeat("b", ReplicaLoad())
    index.clear("a")
    assert index.lookup([1, 2, 3], ["a", "b"]) == {"a": 0, "b": 3}
    index.heartbeat("a", ReplicaLoad())
    assert index.lookup([1, 2, 3], ["a", "b"]) == {"a": 0, "b": 3}  # alive again, but holds nothing


def test_models_and_namespaces_do_not_see_each_other(make_index, redis_server):
    m1, m2 = make_index("llama"), make_index("qwen")
    other_ns = make_index("llama", namespace="elsewhere")
    for index in (m1, m2, other_ns):
        index.heartbeat("a", ReplicaLoad())
    m1.publish([KVEvent(KVEventKind.STORED, (1, 2), "a")])
    assert m1.lookup([1, 2], ["a"]) == {"a": 2}
    assert m2.lookup([1, 2], ["a"]) == {"a": 0}
    assert other_ns.lookup([1, 2], ["a"]) == {"a": 0}
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert client.exists(f"{m1.config.namespace}:{{llama}}:pages:a", f"{m1.config.namespace}:{{llama}}:live:a") == 2


def test_members_are_16_byte_hashes_readable_as_hash_to_str(make_index, redis_server):
    index = make_index()
    h = page_hashes(list(range(8)), PAGE, MODEL)
    index.publish([KVEvent(KVEventKind.STORED, tuple(h), "a")])
    members = redis.Redis.from_url(redis_server.url).zrange(index.keys.pages("a"), 0, -1)
    assert sorted(m.hex() for m in members) == sorted(hash_to_str(x) for x in h)
    assert encode_hashes([0, 2**128 - 1]) == bytes(16) + b"\xff" * 16


@pytest.mark.parametrize("mode", ["search", "exact"])
def test_lookup_is_one_command_to_redis_whatever_the_prompt_length(make_index, redis_server, mode):
    index = make_index(lookup_mode=mode)
    replicas = [f"r{i}" for i in range(8)]
    prompt = list(range(1, 2049))
    for i, r in enumerate(replicas):
        index.heartbeat(r, ReplicaLoad())
        index.publish([KVEvent(KVEventKind.STORED, tuple(prompt[: 2048 - 100 * i]), r)])
    index.lookup(prompt, replicas)  # loads the script and opens the connection
    admin = redis.Redis.from_url(redis_server.url)
    admin.config_resetstat()
    assert index.lookup(prompt, replicas) == {r: 2048 - 100 * i for i, r in enumerate(replicas)}
    assert "r0" in index.lookup_with_load(prompt, replicas)
    inside_the_script = {"zmscore", "zscore", "hlen", "hmget", "time", "config|resetstat"}
    stats = admin.info("commandstats")
    assert {k: v["calls"] for k, v in stats.items() if k.removeprefix("cmdstat_") not in inside_the_script} == {
        "cmdstat_evalsha": 2
    }


def test_lookup_returns_empty_within_budget_when_redis_dies_and_recovers_after_restart(make_index, big_redis):
    index = make_index(server=big_redis, timeout_ms=20, retry_after_s=0.05)
    index.heartbeat("a", ReplicaLoad())
    index.publish([KVEvent(KVEventKind.STORED, (1, 2, 3), "a")])
    assert index.lookup([1, 2, 3], ["a"]) == {"a": 3}

    big_redis.kill()
    for _ in range(3):
        start = time.perf_counter()
        assert index.lookup([1, 2, 3], ["a"]) == {}
        assert time.perf_counter() - start < scaled(0.05)  # refused at once; 50 ms = the 20 ms budget + slack
        time.sleep(0.06)
    assert index.metrics.errors == 3

    big_redis.start()  # same port, empty, scripts unknown (NOSCRIPT is handled)
    time.sleep(0.06)
    assert index.lookup([1, 2, 3], ["a"]) == {"a": 0}
    index.heartbeat("a", ReplicaLoad())
    index.publish([KVEvent(KVEventKind.STORED, (1, 2), "a")])
    assert index.lookup([1, 2, 3], ["a"]) == {"a": 2}


def test_lookup_times_out_on_a_hung_redis_then_skips_it_and_recovers(make_index, big_redis):
    index = make_index(server=big_redis, timeout_ms=20, retry_after_s=0.2)
    index.heartbeat("a", ReplicaLoad())
    index.publish([KVEvent(KVEventKind.STORED, (1, 2, 3), "a")])
    assert index.lookup([1, 2, 3], ["a"]) == {"a": 3}

    big_redis.pause()
    try:
        start = time.perf_counter()
        assert index.lookup([1, 2, 3], ["a"]) == {}
        assert time.perf_counter() - start < scaled(0.06)  # the 20 ms budget, plus scheduling slack
        start = time.perf_counter()
        assert index.lookup([1, 2, 3], ["a"]) == {}  # within retry_after_s: not even asked
        assert time.perf_counter() - start < scaled(0.002)
    finally:
        big_redis.resume()
    assert (index.metrics.timeouts, index.metrics.skipped) == (1, 1)
    time.sleep(0.25)
    assert index.lookup([1, 2], ["a"]) == {"a": 2}  # a fresh connection: no stale reply from before
    assert index.lookup([1, 2, 3], ["a"]) == {"a": 3}


def test_wrong_password_makes_lookups_answer_empty_not_raise(make_index):
    with LocalRedisServer(password="s3cret") as server:
        url = f"redis://127.0.0.1:{server.port}/0"  # the password comes from the config, not the URL
        good = make_index(redis_url=url, password="s3cret")
        good.heartbeat("a", ReplicaLoad())
        good.publish([KVEvent(KVEventKind.STORED, (1,), "a")])
        assert good.lookup([1], ["a"]) == {"a": 1}
        bad = make_index(redis_url=url, password="wrong")
        assert bad.lookup([1], ["a"]) == {}
        assert bad.metrics.errors == 1


def test_the_password_can_come_from_a_file_like_a_mounted_secret(make_index, tmp_path):
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")  # `kubectl create secret --from-file` keeps a trailing newline
    with LocalRedisServer(password="s3cret") as server:
        index = make_index(redis_url=f"redis://127.0.0.1:{server.port}/0", password_file=str(secret))
        index.publish([KVEvent(KVEventKind.STORED, (1, 2), "a")])
        index.heartbeat("a", ReplicaLoad())
        assert index.lookup([1, 2], ["a"]) == {"a": 2}
    with pytest.raises(ValueError, match="password_file"):
        make_index(redis_url="redis://127.0.0.1:1/0", password_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not both"):
        IndexConfig(password="x", password_file=str(secret))


async def test_async_lookup_matches_sync_and_answers_empty_when_redis_hangs(make_index, big_redis):
    index = make_index(server=big_redis, timeout_ms=20, retry_after_s=0.1)
    for r, pages in (("a", (1, 2, 3)), ("b", (1, 2))):
        index.heartbeat(r, ReplicaLoad(num_running=len(pages)))
        index.publish([KVEvent(KVEventKind.STORED, pages, r)])
    aindex = AsyncPageIndex(index.config, "m")
    try:
        assert await aindex.lookup([1, 2, 3], ["a", "b", "c"]) == index.lookup([1, 2, 3], ["a", "b", "c"])
        assert (await aindex.lookup_with_load([1, 2, 3], ["a", "b"]))["b"].load.num_running == 2
        big_redis.pause()
        try:
            start = time.perf_counter()
            assert await aindex.lookup([1, 2, 3], ["a", "b"]) == {}
            assert time.perf_counter() - start < scaled(0.06)
        finally:
            big_redis.resume()
        assert aindex.metrics.timeouts == 1
        big_redis.kill()
        await asyncio.sleep(index.config.retry_after_s)
        assert await aindex.lookup([1, 2, 3], ["a", "b"]) == {}
        assert aindex.metrics.errors == 1
    finally:
        await aindex.aclose()


def test_config_rejects_a_heartbeat_ttl_within_the_interval_and_braces_in_names():
    with pytest.raises(ValidationError, match="heartbeat_ttl_s"):
        IndexConfig(heartbeat_interval_s=2, heartbeat_ttl_s=2)
    with pytest.raises(ValidationError, match="namespace"):
        IndexConfig(namespace="a{b}")
    with pytest.raises(ValueError, match="model_id"):
        AsyncPageIndex(IndexConfig(), "m{1}")


@pytest.mark.parametrize("mode", ["search", "exact"])
def test_host_tier_entries_continue_the_device_run_only_when_asked_with_tiers(make_index, mode):
    from kvstore.page_pool import KVTier

    index = make_index(lookup_mode=mode)
    prompt = list(range(1, 11))  # 10 pages
    index.publish(
        [
            KVEvent(KVEventKind.STORED, tuple(prompt[:4]), "a"),  # device: pages 0-3
            KVEvent(KVEventKind.STORED, tuple(prompt[2:8]), "a", KVTier.HOST),  # host: pages 2-7
            KVEvent(KVEventKind.STORED, tuple(prompt[:3]), "b"),  # b: device only
            KVEvent(KVEventKind.STORED, tuple(prompt[:9]), "c", KVTier.HOST),  # c: host only
        ]
    )
    for r in "abc":
        index.heartbeat(r, ReplicaLoad())
    # the device run alone, as routers without tiers (and older ones) read it
    assert index.lookup(prompt, ["a", "b", "c"]) == {"a": 4, "b": 3, "c": 0}
    plain = index.lookup_with_load(prompt, ["a", "b", "c"])
    assert {r: (m.matched_pages, m.host_pages) for r, m in plain.items()} == {"a": (4, 0), "b": (3, 0), "c": (0, 0)}
    tiered = index.lookup_with_load(prompt, ["a", "b", "c", "gone"], with_tiers=True)
    assert {r: (m.matched_pages, m.host_pages) for r, m in tiered.items()} == {"a": (4, 4), "b": (3, 0), "c": (0, 9)}
    # a removed host entry ends the host run; the device run is untouched
    index.publish([KVEvent(KVEventKind.REMOVED, (prompt[6],), "a", KVTier.HOST)])
    assert index.lookup_with_load(prompt, ["a"], with_tiers=True)["a"].host_pages == 2
    index.clear("c")
    index.heartbeat("c", ReplicaLoad())
    assert index.lookup_with_load(prompt, ["c"], with_tiers=True)["c"].host_pages == 0
