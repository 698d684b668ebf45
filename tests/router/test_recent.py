"""The router's memory of where it just sent prompts: a leading run of recently sent pages counts as
held by the replica they went to, until the index knows more; it expires and stays bounded."""

from router.policy import Reason, ReplicaView, RoutingConfig, choose
from router.prefix_router import with_recent
from router.recent import RecentRoutes


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_leading_run_sent_to_a_replica_counts_until_it_expires():
    clock = Clock()
    recent = RecentRoutes(ttl_s=5.0, clock=clock)
    recent.record([1, 2, 3, 4], "a")
    assert recent.leading([1, 2, 3, 9]) == {"a": 3}
    assert recent.leading([9, 1, 2]) == {}
    recent.record([1, 2, 7], "b")  # the same prefix went elsewhere later: the latest route counts
    assert recent.leading([1, 2, 3, 4]) == {"b": 2}
    clock.now += 5.1
    assert recent.leading([1, 2, 3, 4]) == {}
    recent.record([8], "c")  # a record drops what expired
    assert len(recent) == 1


def test_it_keeps_at_most_max_pages_and_is_off_at_ttl_zero():
    recent = RecentRoutes(ttl_s=5.0, max_pages=3, clock=Clock())
    recent.record([1, 2, 3, 4, 5], "a")
    assert len(recent) == 3 and recent.leading([3, 4, 5]) == {"a": 3} and recent.leading([1]) == {}
    off = RecentRoutes(ttl_s=0.0)
    off.record([1, 2], "a")
    assert len(off) == 0 and off.leading([1, 2]) == {}


def test_a_second_request_for_a_new_prefix_follows_the_first_to_the_replica_computing_it():
    config = RoutingConfig()
    views = [ReplicaView("a", 1.0), ReplicaView("b", 0.0), ReplicaView("c", 0.0)]
    recent = RecentRoutes(ttl_s=10.0, clock=Clock())
    recent.record(list(range(64)), "a")  # the first request, still prefilling on a: index knows nothing
    matched, host = with_recent({}, {}, recent.leading([*range(64), 99]))
    d = choose(views, matched, config, host_pages=host)
    assert (d.replica_id, d.reason, d.matched_pages) == ("a", Reason.PREFIX_HIT, 64)


def test_the_index_wins_where_it_knows_more_and_host_pages_stay_where_recent_adds_nothing():
    matched, host = with_recent({"a": 10, "b": 4}, {"b": 6}, {"b": 8})
    assert (matched, host) == ({"a": 10, "b": 4}, {"b": 6})  # b: 4 + 6 already > 8
    matched, host = with_recent({"a": 10, "b": 4}, {"b": 6}, {"b": 20})
    assert (matched, host) == ({"a": 10, "b": 20}, {})
    matched, host = with_recent({}, {}, {"c": 3})
    assert (matched, host) == ({"c": 3}, {})
