"""The page index reads Redis as untrusted input: keys written straight into a real server with
redis-py (as anyone with access to it could) are skipped and counted, never fatal, and only
heartbeats in the documented schema make a replica."""

from __future__ import annotations

import logging

import pytest
import redis

from kvstore.index import AsyncPageIndex, ReplicaLoad
from kvstore.page_pool import KVEvent, KVEventKind

GOOD = ReplicaLoad(num_waiting=1, num_running=2, num_free_pages=30, num_total_pages=64)
FIELDS = {
    "num_waiting": 0,
    "num_running": 0,
    "num_free_pages": 9,
    "num_total_pages": 9,
    "prefix_cache_queries": 0,
    "prefix_cache_hits": 0,
    "num_requests_finished": 0,
    "num_requests_aborted": 0,
}

# Each writes one forged or broken `live:` key with redis-py; none of them is a replica.
BAD_HEARTBEATS = {
    "non-number field": lambda r, key: r.hset(key, mapping={**FIELDS, "num_running": "lots"}),
    "numbers, a field missing": lambda r, key: r.hset(key, mapping={k: 1 for k in list(FIELDS)[:4]}),
    "numbers, an extra field": lambda r, key: r.hset(key, mapping={**FIELDS, "admin": 1}),
    "negative number": lambda r, key: r.hset(key, mapping={**FIELDS, "num_waiting": -1}),
    "spaces shifting the reply": lambda r, key: r.hset(key, mapping={**FIELDS, "num_waiting": "1 2 3"}),
    "number too long": lambda r, key: r.hset(key, mapping={**FIELDS, "num_free_pages": "9" * 5000}),
    "empty field": lambda r, key: r.hset(key, mapping={**FIELDS, "num_total_pages": ""}),
    "a string, not a hash": lambda r, key: r.set(key, "1 2 3 4"),
    "a list, not a hash": lambda r, key: r.rpush(key, 1, 2, 3, 4),
    "a sorted set, not a hash": lambda r, key: r.zadd(key, {"num_waiting": 1}),
}


@pytest.fixture
def admin(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def two_good_replicas(index) -> None:
    for r in ("a", "b"):
        index.heartbeat(r, GOOD)
        index.publish([KVEvent(KVEventKind.STORED, (1, 2, 3), r)])


@pytest.mark.parametrize("mode", ["search", "exact"])
@pytest.mark.parametrize("write", BAD_HEARTBEATS.values(), ids=BAD_HEARTBEATS.keys())
def test_a_malformed_heartbeat_is_skipped_and_counted_and_the_valid_replicas_still_answer(
    make_index, admin, mode, write
):
    index = make_index(lookup_mode=mode)
    two_good_replicas(index)
    write(admin, index.keys.live("forged"))
    index.publish([KVEvent(KVEventKind.STORED, (1, 2, 3), "forged")])  # it would hold the whole prompt

    assert index.lookup([1, 2, 3], ["a", "forged", "b"]) == {"a": 3, "forged": 0, "b": 3}
    answer = index.lookup_with_load([1, 2, 3], ["a", "forged", "b"])
    assert answer == {"a": answer["a"], "b": answer["b"]}
    assert answer["a"].matched_pages == 3 and answer["b"].load == GOOD
    assert sorted(index.live_replicas()) == ["a", "b"]
    assert index.metrics.malformed == 3  # two lookups, one status read
    assert index.metrics.errors == index.metrics.timeouts == 0  # the index did answer


def test_a_forged_heartbeat_in_the_schema_is_believed(make_index, admin):
    # The schema is the contract: a key that keeps it is a replica (Redis access is trusted that far).
    index = make_index()
    admin.hset(index.keys.live("x"), mapping=FIELDS)
    assert index.live_replicas() == {"x": ReplicaLoad(0, 0, 9, 9)}
    assert index.metrics.malformed == 0


@pytest.mark.parametrize("mode", ["search", "exact"])
def test_a_pages_key_of_another_type_holds_nothing_and_the_next_publish_replaces_it(make_index, admin, mode):
    index = make_index(lookup_mode=mode)
    two_good_replicas(index)
    admin.delete(index.keys.pages("a"))
    admin.hset(index.keys.pages("a"), "page", "1")
    answer = index.lookup_with_load([1, 2, 3], ["a", "b"])
    assert answer["a"].matched_pages == 0 and answer["a"].load == GOOD  # still a live replica, holding nothing
    assert answer["b"].matched_pages == 3
    assert index.lookup([1, 2, 3], ["a", "b"]) == {"a": 0, "b": 3}
    assert index.metrics.malformed == 2
    index.publish([KVEvent(KVEventKind.STORED, (1, 2), "a")])  # the replica owns its key: repaired
    assert index.lookup([1, 2, 3], ["a", "b"]) == {"a": 2, "b": 3}
    assert index.metrics.malformed == 2


def test_a_heartbeat_replaces_whatever_was_left_under_its_key(make_index, admin):
    index = make_index()
    admin.hset(index.keys.live("a"), mapping={**FIELDS, "extra": 1})
    index.heartbeat("a", GOOD)
    assert index.live_replicas()["a"] == GOOD
    admin.delete(index.keys.live("a"))
    admin.set(index.keys.live("a"), "not a hash")
    index.heartbeat("a", GOOD)
    assert index.live_replicas()["a"] == GOOD and index.metrics.malformed == 0


def test_status_reads_skip_garbage_key_names_and_types_under_the_live_prefix(make_index, admin):
    index = make_index()
    two_good_replicas(index)
    prefix = index.keys.live("").encode()
    admin.hset(prefix + b"\xff\xfe", mapping=FIELDS)  # a name that is not UTF-8
    admin.set(prefix + b"str", "x")
    admin.sadd(prefix + b"set", "x")
    admin.set(prefix.replace(b"live", b"lives") + b"a", "x")  # another prefix: not even scanned
    assert sorted(index.live_replicas()) == ["a", "b"]
    assert index.metrics.malformed == 3


def test_malformed_entries_are_logged_at_most_once_a_minute(make_index, admin, caplog):
    index = make_index()
    two_good_replicas(index)
    admin.hset(index.keys.live("forged"), "num_waiting", "x")
    with caplog.at_level(logging.WARNING, logger="kvstore.index"):
        for _ in range(5):
            assert index.lookup([1, 2, 3], ["a", "forged"]) == {"a": 3, "forged": 0}
            assert sorted(index.live_replicas()) == ["a", "b"]
    lines = [r.getMessage() for r in caplog.records if "outside kvfleet's schema" in r.getMessage()]
    assert len(lines) == 1 and "live:forged" in lines[0], lines
    assert index.metrics.malformed == 10


async def test_the_router_side_async_index_skips_malformed_heartbeats_too(make_index, admin):
    index = make_index()
    two_good_replicas(index)
    admin.hset(index.keys.live("forged"), mapping={**FIELDS, "num_running": "1e9"})
    aindex = AsyncPageIndex(index.config, index.model_id)
    try:
        answer = await aindex.try_lookup_with_load([1, 2, 3], ["a", "forged", "b"])
        assert sorted(answer) == ["a", "b"] and answer["a"].matched_pages == 3
        assert aindex.metrics.malformed == 1 and aindex.metrics.errors == 0
    finally:
        await aindex.aclose()
